"""sensor_msgs/Image <-> numpy arrays for the policy: any supported camera image -> RGB uint8.

The conversion goes through cv_bridge's API, but two different cv_bridge builds exist and only
part of what they accept is converted correctly by both:

- the compiled ROS 2 bridge (vision_opencv, on every ROS 2 workstation) honours `step`;
- the `cv-bridge` package from the Python index (installed in this venv) is a pure-Python port
  of the ROS 1 bridge: `imgmsg_to_cv2` ignores `step` (rows of a padded image are misread),
  maps the `16UC*` encodings to 8-bit types, calls `ndarray.newbyteorder` (gone in numpy 2)
  whenever `is_bigendian` differs from the host, and raises KeyError instead of CvBridgeError
  for unknown encodings; its `cv2_to_imgmsg` calls `ndarray.tostring` (gone in numpy 2).

So one code path serves both, with no need to tell them apart:

1. this module validates the message itself (encoding, size, `step`, data length) and raises
   `ImageConversionError` naming what was wrong and what was expected;
2. only 8-bit encodings are accepted (rgb8, bgr8, rgba8, bgra8, mono8): the policy wants a
   colour camera; 16-bit and float images (depth, IR) are refused with a reason;
3. a message whose rows are padded (`step` > width x channels) or that carries the
   `is_bigendian` flag (meaningless for 1-byte samples) is repacked with numpy into tight rows
   and the flag cleared -- the form both bridges read correctly. A tight message (what camera
   drivers publish) is handed over as is, with no copy;
4. cv_bridge's `imgmsg_to_cv2(msg, 'rgb8')` does the colour conversion and the result is
   checked to be [H, W, 3] uint8.

The reverse direction (`array_to_imgmsg`, used by tools and tests that play a camera) is plain
numpy: the port's `cv2_to_imgmsg` does not run on numpy 2.
"""

from builtin_interfaces.msg import Time
from cv_bridge import CvBridge
import numpy as np
from sensor_msgs.msg import Image

from rsd_ros.excerpt import excerpt

# Encodings the policy accepts -> channels (all 8-bit).
CHANNELS = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1}

_bridge: CvBridge | None = None


class ImageConversionError(ValueError):
    """An Image message the policy cannot use; the text says what was wrong."""


def default_bridge() -> CvBridge:
    """One shared CvBridge (constructing one imports cv2)."""
    global _bridge
    if _bridge is None:
        _bridge = CvBridge()
    return _bridge


def check_image_message(msg: Image) -> None:
    """Raise ImageConversionError unless `msg` is a well-formed image of a supported encoding."""
    if msg.encoding not in CHANNELS:
        raise ImageConversionError(
            f'unsupported image encoding {excerpt(msg.encoding)}: expected one of '
            f'{", ".join(CHANNELS)} (an 8-bit colour or mono camera image; 16-bit and float '
            'images such as depth are not policy input)')
    if msg.height == 0 or msg.width == 0:
        raise ImageConversionError(
            f'empty image: height {msg.height} x width {msg.width}; expected both > 0')
    row_bytes = msg.width * CHANNELS[msg.encoding]
    if msg.step < row_bytes:
        raise ImageConversionError(
            f'step {msg.step} bytes is shorter than a row: width {msg.width} x '
            f'{CHANNELS[msg.encoding]} bytes ({msg.encoding}) = {row_bytes}')
    if len(msg.data) != msg.height * msg.step:
        raise ImageConversionError(
            f'data has {len(msg.data)} bytes; expected height {msg.height} x step {msg.step} '
            f'= {msg.height * msg.step}')


def tight_message(msg: Image) -> Image:
    """`msg` with rows packed to width x channels bytes and `is_bigendian` cleared.

    Returns `msg` itself when it already is in that form. `msg` must pass `check_image_message`.
    """
    row_bytes = msg.width * CHANNELS[msg.encoding]
    if msg.step == row_bytes and not msg.is_bigendian:
        return msg
    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(msg.height, msg.step)  # [H, step]
    return Image(header=msg.header, height=msg.height, width=msg.width, encoding=msg.encoding,
                 is_bigendian=0, step=row_bytes, data=rows[:, :row_bytes].tobytes())


def imgmsg_to_rgb(msg: Image) -> np.ndarray:
    """Convert a camera image message to RGB uint8 [H, W, 3] (C-contiguous).

    Raises ImageConversionError for anything malformed or unsupported (see the module doc).
    """
    check_image_message(msg)
    return checked_imgmsg_to_rgb(msg)


def checked_imgmsg_to_rgb(msg: Image) -> np.ndarray:
    """`imgmsg_to_rgb` of a message that already passed `check_image_message` (where it
    entered: the node's subscription), without checking its header again."""
    try:
        rgb = default_bridge().imgmsg_to_cv2(tight_message(msg), desired_encoding='rgb8')
    except Exception as error:  # CvBridgeError, cv2.error, KeyError (the port) alike
        raise ImageConversionError(
            f'cv_bridge could not convert {msg.encoding} {msg.width}x{msg.height} to rgb8: '
            f'{type(error).__name__}: {error}') from error
    if rgb.shape != (msg.height, msg.width, 3) or rgb.dtype != np.uint8:
        raise ImageConversionError(
            f'cv_bridge returned {rgb.dtype} {rgb.shape} for a {msg.encoding} image; '
            f'expected uint8 {(msg.height, msg.width, 3)}')
    return np.ascontiguousarray(rgb)


def array_to_imgmsg(image: np.ndarray, encoding: str = 'rgb8', stamp: Time | None = None,
                    frame_id: str = '') -> Image:
    """Pack uint8 [H, W, C] (or [H, W] for mono8) in `encoding`'s channel order into an Image."""
    if encoding not in CHANNELS:
        raise ValueError(
            f'unsupported encoding {excerpt(encoding)}; expected one of {", ".join(CHANNELS)}')
    channels = CHANNELS[encoding]
    expected = 'H, W' if channels == 1 else f'H, W, {channels}'
    shape_ok = image.ndim == 2 if channels == 1 else image.ndim == 3 and image.shape[2] == channels
    if image.dtype != np.uint8 or not shape_ok:
        raise ValueError(f'{encoding} needs a uint8 [{expected}] array; got {image.dtype} '
                         f'{list(image.shape)}')
    msg = Image(height=image.shape[0], width=image.shape[1], encoding=encoding, is_bigendian=0,
                step=image.shape[1] * channels, data=np.ascontiguousarray(image).tobytes())
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg
