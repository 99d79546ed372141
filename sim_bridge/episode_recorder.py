"""Episode recordings: one MCAP file per episode, as `ros2 bag record -s mcap` would write it.

An `EpisodeRecorder` holds at most one open episode file. The bridge opens it when an episode
starts (`begin`), hands it every message it sends or receives on the recorded topics (`write`,
from any thread) and closes it after the episode's result (`finish`). What lands in the file
follows rosbag2's MCAP storage, so `ros2 bag info/play`, Foxglove and the `mcap` CLI read it:

- header profile `ros2`; one channel per topic (the fully qualified name the node resolved,
  namespace and remapping included), message encoding `cdr`;
- one schema per message type, named `pkg/msg/Type`, encoding `ros2msg`: the type's .msg text
  followed by every type it uses, each after a line of 80 '=' and `MSG: pkg/Type`, found in
  the packages' share directories as rosbag2 finds them (`message_definition`);
- message data = `rclpy.serialization.serialize_message`: the CDR bytes the rmw puts on the
  wire, which is what rosbag2 stores. We chose it over mcap_ros2's writer, which re-encodes
  each message in Python from the schema text, field by field; the schema text then only
  describes the bytes, and `mcap_ros2.reader` decoding them back checks that it does;
- log_time = when the bridge sent or received the message (ns, the node's clock, the stamps'
  clock); publish_time = the message's `header.stamp` where it has one, else log_time;
- chunks compressed with zstd (rosbag2's `zstd_fast` preset does the same; readers of MCAP
  handle it). Not written: the channel metadata rosbag2 adds (`offered_qos_profiles`,
  `topic_type_hash`), so `ros2 bag play` offers its default QoS (reliable, volatile) on every
  topic; `--qos-profile-overrides-path` makes `instruction` latched again.

A file is written as `<name>.mcap.part` and renamed to `<name>.mcap` by `finish` only, so a
finished name always holds a complete episode. `abort` (the bridge stopped mid-episode) closes
the stream properly but keeps the `.part` name; a crash leaves a `.part` file without its
summary section (the `mcap recover` command rebuilds one).
"""

from collections.abc import Iterator, Mapping
import importlib
import logging
import os
from pathlib import Path
import re
import sys
import threading
from typing import Any, BinaryIO

from rclpy.serialization import serialize_message

logger = logging.getLogger(__name__)

SUFFIX = '.mcap'
PART_SUFFIX = '.mcap.part'
DELIMITER = '=' * 80
# .msg field types that are not messages (rosidl's primitive types).
PRIMITIVE_TYPES = frozenset((
    'bool', 'byte', 'char', 'float32', 'float64', 'int8', 'uint8', 'int16', 'uint16', 'int32',
    'uint32', 'int64', 'uint64', 'string', 'wstring'))


def episode_name(suite: str, task_id: int, init_state: int, episode: int) -> str:
    """The file name (without suffix) of one episode: unique per suite, task, initial state
    and episode index of a bridge run."""
    return f'{suite}_task{task_id}_init{init_state}_ep{episode}'


# --- message definitions ----------------------------------------------------------------------

def type_name(message_class: type) -> str:
    """A generated rclpy message class -> its ROS 2 type name 'pkg/msg/Type'."""
    package = message_class.__module__.split('.')[0]
    return f'{package}/msg/{message_class.__name__}'


def share_directories(package: str) -> Iterator[Path]:
    """Where `package`'s share directory may be: under each AMENT_PREFIX_PATH prefix (how
    rosbag2 looks), then under every ancestor of its Python package (a venv or a colcon
    install without the environment sourced), then under sys.prefix."""
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if prefix:
            yield Path(prefix) / 'share' / package
    try:
        module = importlib.import_module(package)
    except ImportError:
        module = None
    if module is not None and getattr(module, '__file__', None):
        for ancestor in Path(module.__file__).resolve().parents:
            yield ancestor / 'share' / package
    yield Path(sys.prefix) / 'share' / package


def msg_file_text(name: str) -> str:
    """The .msg text of 'pkg/Type' or 'pkg/msg/Type'. LookupError naming the places tried."""
    package, *_, message = name.split('/')
    tried = []
    for share in share_directories(package):
        path = share / 'msg' / f'{message}.msg'
        if path.is_file():
            return path.read_text()
        tried.append(str(path))
    raise LookupError(f'no .msg definition of {name}; tried {", ".join(dict.fromkeys(tried))}')


def msg_dependencies(text: str, package: str) -> list[str]:
    """The message types ('pkg/Type', sorted) that the fields of .msg `text` of `package`
    use; constants and primitive fields are skipped."""
    found = set()
    for line in text.splitlines():
        words = line.split('#', 1)[0].split()
        if len(words) < 2 or '=' in words[1]:
            continue
        field_type = re.sub(r'(\[[^\]]*\]|<=\d+)+$', '', words[0])
        if field_type in PRIMITIVE_TYPES:
            continue
        found.add(field_type if '/' in field_type else f'{package}/{field_type}')
    return sorted(found)


def message_definition(name: str) -> str:
    """The complete `ros2msg` definition of `name` ('pkg/msg/Type'), as rosbag2 stores it:
    the type's .msg text, then each type it depends on (depth first, each once) after the
    delimiter lines '=' x 80 and 'MSG: pkg/Type'. LookupError if a .msg file is missing."""
    seen: set[str] = set()

    def append(type_: str, depth: int) -> str:
        if depth > 50:
            raise LookupError(f'message definition of {name} nests deeper than 50 types')
        text = msg_file_text(type_)
        for dependency in msg_dependencies(text, type_.split('/')[0]):
            if dependency not in seen:
                seen.add(dependency)
                text += f'\n{DELIMITER}\nMSG: {dependency}\n' + append(dependency, depth + 1)
        return text

    return append(name, 0)


def header_stamp_ns(message: Any) -> int | None:
    """`message.header.stamp` in ns, or None for a message without a header."""
    header = getattr(message, 'header', None)
    stamp = getattr(header, 'stamp', None)
    if stamp is None:
        return None
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def metadata_strings(values: Mapping[str, Any]) -> dict[str, str]:
    """The scalar entries of `values` as MCAP metadata strings (lists and dicts left out:
    the full episode record is the episode_result message)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[str(key)] = 'true' if value else 'false'
        elif isinstance(value, (str, int, float)):
            out[str(key)] = str(value)
    return out


# --- the recorder -----------------------------------------------------------------------------

class EpisodeRecorder:
    """One MCAP file per episode in `directory` ('' or None = recording off: every call does
    nothing). Thread-safe: `write` may come from the executor and the simulator thread.

    `path`: the finished file name of the open episode (None when none is open).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.path: Path | None = None
        self._lock = threading.Lock()
        self._stream: BinaryIO | None = None
        self._writer = None
        self._schemas: dict[str, int] = {}       # type name -> schema id
        self._channels: dict[str, int] = {}      # topic -> channel id
        self._definitions: dict[str, str] = {}   # type name -> ros2msg text (kept across files)

    @property
    def enabled(self) -> bool:
        """Whether episodes are recorded."""
        return self.directory is not None

    def begin(self, name: str) -> Path | None:
        """Open `<directory>/<name>.mcap.part` for a new episode (closing an open one with
        `abort`). Returns the name the file will have once finished, or None when recording
        is off."""
        if self.directory is None:
            return None
        from mcap.writer import LIBRARY_IDENTIFIER, CompressionType, Writer

        self.abort()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f'{name}{SUFFIX}'
        stream = open(self.directory / f'{name}{PART_SUFFIX}', 'wb')
        writer = Writer(stream, compression=CompressionType.ZSTD)
        writer.start(profile='ros2', library=f'rsd sim_bridge; {LIBRARY_IDENTIFIER}')
        with self._lock:
            self._stream, self._writer, self.path = stream, writer, path
            self._schemas, self._channels = {}, {}
        return path

    def write(self, topic: str, message: Any, log_time_ns: int) -> None:
        """Record `message` (any rclpy message) on `topic` (fully qualified), sent or
        received at `log_time_ns`; its publish time is its header stamp if it has one.
        Nothing happens when no episode is open."""
        if self._writer is None:
            return
        data = serialize_message(message)
        stamp = header_stamp_ns(message)
        with self._lock:
            if self._writer is None:
                return
            channel = self._channel(topic, type(message))
            self._writer.add_message(channel_id=channel, log_time=log_time_ns, data=data,
                                     publish_time=log_time_ns if stamp is None else stamp)

    def _channel(self, topic: str, message_class: type) -> int:
        """The channel id of `topic` in the open file, registering it (and its schema)."""
        channel = self._channels.get(topic)
        if channel is not None:
            return channel
        name = type_name(message_class)
        if name not in self._schemas:
            if name not in self._definitions:
                self._definitions[name] = message_definition(name)
            self._schemas[name] = self._writer.register_schema(
                name=name, encoding='ros2msg', data=self._definitions[name].encode())
        channel = self._writer.register_channel(topic=topic, message_encoding='cdr',
                                                schema_id=self._schemas[name])
        self._channels[topic] = channel
        return channel

    def _close(self) -> tuple[Path, Path] | None:
        """Finish the MCAP stream and close the file: (part path, finished path), or None."""
        with self._lock:
            writer, stream, path = self._writer, self._stream, self.path
            self._writer = self._stream = self.path = None
        if writer is None:
            return None
        try:
            writer.finish()
            stream.flush()
            os.fsync(stream.fileno())
        finally:
            stream.close()
        return Path(stream.name), path

    def finish(self, metadata: Mapping[str, Any] | None = None) -> Path | None:
        """Close the episode's file and give it its finished name; `metadata`: scalar facts
        stored as the 'result' metadata record (the episode record). Returns the path, or None
        when no episode was open."""
        if self._writer is not None and metadata:
            with self._lock:
                if self._writer is not None:
                    self._writer.add_metadata('result', metadata_strings(metadata))
        closed = self._close()
        if closed is None:
            return None
        part, path = closed
        os.replace(part, path)
        return path

    def abort(self) -> Path | None:
        """Close an unfinished episode's file under its `.part` name (readable, but not
        mistaken for a complete episode). Returns that path, or None if none was open."""
        closed = self._close()
        if closed is None:
            return None
        logger.warning('episode recording stopped before the episode ended: %s', closed[0])
        return closed[0]
