"""Image messages -> RGB uint8 [H, W, 3] through cv_bridge, for every layout a camera may send."""

import cv_bridge
import numpy as np
import pytest
from sensor_msgs.msg import Image

from rsd_ros.image_conversion import (
    ImageConversionError,
    array_to_imgmsg,
    check_image_message,
    imgmsg_to_rgb,
    tight_message,
)

H, W = 5, 7


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def as_encoding(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """The same picture laid out in `encoding`'s channel order."""
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    return {'rgb8': rgb, 'bgr8': rgb[..., ::-1],
            'rgba8': np.concatenate([rgb, alpha], -1),
            'bgra8': np.concatenate([rgb[..., ::-1], alpha], -1)}[encoding]


def message(pixels: np.ndarray, encoding: str, pad: int = 0, **fields) -> Image:
    """Image msg with `pad` garbage bytes after every row."""
    rows = pixels.reshape(pixels.shape[0], -1)                      # [H, W*C]
    garbage = np.full((rows.shape[0], pad), 0xAB, np.uint8)
    data = np.concatenate([rows, garbage], axis=1).tobytes()
    msg = Image(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding,
                step=rows.shape[1] + pad, data=data)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
@pytest.mark.parametrize('pad', [0, 5])
def test_colour_encodings_become_rgb(rgb, encoding, pad):
    out = imgmsg_to_rgb(message(as_encoding(rgb, encoding), encoding, pad=pad))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags['C_CONTIGUOUS']
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('pad', [0, 3])
def test_mono8_is_replicated_to_three_channels(rgb, pad):
    gray = rgb[..., 0].copy()
    out = imgmsg_to_rgb(message(gray, 'mono8', pad=pad))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))


def test_big_endian_flag_is_irrelevant_for_8_bit_samples(rgb):
    for encoding in ('rgb8', 'bgra8'):
        pixels = as_encoding(rgb, encoding)
        flagged = imgmsg_to_rgb(message(pixels, encoding, is_bigendian=1))
        np.testing.assert_array_equal(flagged, rgb)
        np.testing.assert_array_equal(flagged, imgmsg_to_rgb(message(pixels, encoding)))


def test_tight_message_is_passed_through_without_copy(rgb):
    msg = message(rgb, 'rgb8')
    assert tight_message(msg) is msg
    padded = tight_message(message(rgb, 'rgb8', pad=2, is_bigendian=1))
    assert (padded.step, padded.is_bigendian, len(padded.data)) == (W * 3, 0, H * W * 3)


def test_huge_image_converts_at_full_size():
    big = np.zeros((1080, 1920, 3), np.uint8)
    big[-1, -1] = (1, 2, 3)
    out = imgmsg_to_rgb(message(big[..., ::-1], 'bgr8'))
    assert out.shape == (1080, 1920, 3) and tuple(out[-1, -1]) == (1, 2, 3)


@pytest.mark.parametrize('encoding', ['mono16', '16UC1', '32FC1', 'yuv422', 'bayer_rggb8',
                                      'jpeg', '', 'RGB8'])
def test_unsupported_encodings_are_refused_with_a_reason(encoding):
    msg = Image(height=2, width=2, encoding=encoding, step=4, data=bytes(8))
    with pytest.raises(ImageConversionError, match='unsupported image encoding.*expected one of'):
        imgmsg_to_rgb(msg)


def test_mono16_big_endian_is_refused_not_misread():
    msg = Image(height=2, width=2, encoding='mono16', is_bigendian=1, step=4, data=bytes(8))
    with pytest.raises(ImageConversionError, match='mono16'):
        imgmsg_to_rgb(msg)


@pytest.mark.parametrize('fields, match', [
    (dict(height=0, width=0, step=0, data=b''), 'empty image'),
    (dict(height=2, width=0, step=0, data=b''), 'empty image'),
    (dict(height=2, width=3, step=9, data=bytes(17)), r'17 bytes; expected height 2 x step 9'),
    (dict(height=2, width=3, step=9, data=bytes(19)), r'19 bytes; expected height 2 x step 9'),
    (dict(height=2, width=3, step=8, data=bytes(16)), r'step 8 bytes is shorter than a row'),
])
def test_malformed_messages_are_refused_with_a_reason(fields, match):
    msg = Image(encoding='rgb8', **fields)
    with pytest.raises(ImageConversionError, match=match):
        check_image_message(msg)
    with pytest.raises(ImageConversionError, match=match):
        imgmsg_to_rgb(msg)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_array_to_imgmsg_round_trips(rgb, encoding):
    msg = array_to_imgmsg(as_encoding(rgb, encoding), encoding, frame_id='cam')
    assert (msg.height, msg.width, msg.step, msg.header.frame_id) == (H, W, W * len(encoding[:-1]),
                                                                       'cam')
    np.testing.assert_array_equal(imgmsg_to_rgb(msg), rgb)


def test_array_to_imgmsg_rejects_wrong_shapes(rgb):
    with pytest.raises(ValueError, match=r'rgba8 needs a uint8 \[H, W, 4\]'):
        array_to_imgmsg(rgb, 'rgba8')
    with pytest.raises(ValueError, match='uint8'):
        array_to_imgmsg(rgb.astype(np.float32))


@pytest.mark.skipif(not cv_bridge.boost.cv_bridge_boost.__file__.endswith('.py'),
                    reason='only the pure-Python port of cv_bridge ignores step')
def test_the_python_port_alone_misreads_padded_rows(rgb):
    """Why padded rows are repacked before cv_bridge sees them (fails once the port is fixed)."""
    raw = cv_bridge.CvBridge().imgmsg_to_cv2(message(rgb, 'rgb8', pad=3), 'rgb8')
    assert not np.array_equal(raw, rgb)
