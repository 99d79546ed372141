"""Episode recordings in MCAP: the recorder alone (files read back with mcap_ros2), then real
episodes through the real bridge over DDS with recording on, each file decoded and checked
against the episode record and what the playing policy saw."""

from collections import defaultdict
import json
import sys

from mcap.reader import make_reader
from mcap_ros2.reader import read_ros2_messages
import numpy as np
import pytest
from test_bridge import (
    PlayedPolicy,
    read_results,
    spin_until_finished,
    stamp_ns,
    start_bridge,
    trajectory,
)

from sim_bridge.chunk_executor import EXECUTION_HORIZON
from sim_bridge.episode_recorder import (
    EpisodeRecorder,
    message_definition,
    msg_dependencies,
)

NAMESPACE = '/robot1'
TYPES = {'camera/image_raw': 'sensor_msgs/msg/Image', 'instruction': 'std_msgs/msg/String',
         'joint_states': 'sensor_msgs/msg/JointState',
         'action_chunk': 'trajectory_msgs/msg/JointTrajectory',
         'episode_result': 'std_msgs/msg/String'}


def read(path):
    """(header, {topic: [McapROS2Message]} in log-time order, {metadata name: dict})."""
    with open(path, 'rb') as stream:
        reader = make_reader(stream)
        header = reader.get_header()
        metadata = {m.name: m.metadata for m in reader.iter_metadata()}
    by_topic = defaultdict(list)
    for message in read_ros2_messages(path):
        by_topic[message.channel.topic].append(message)
    return header, dict(by_topic), metadata


def time_msg(ns):
    from builtin_interfaces.msg import Time

    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


# --- message definitions ----------------------------------------------------------------------

def test_dependencies_of_a_msg_text():
    text = ('# comment naming other_msgs/Thing x\nuint8 KIND=3\nstring NAME = "a#b"\n'
            'std_msgs/Header header\nPoint[] points  # same package\nfloat64[3] xyz\n'
            'string<=8 tag\nbuiltin_interfaces/Duration[<=4] waits\n\nbool flag true\n')
    assert msg_dependencies(text, 'geometry_msgs') == [
        'builtin_interfaces/Duration', 'geometry_msgs/Point', 'std_msgs/Header']


def test_message_definitions_are_complete_ros2msg_texts():
    from mcap_ros2._dynamic import generate_dynamic

    text = message_definition('trajectory_msgs/msg/JointTrajectory')
    assert [line for line in text.splitlines() if line.startswith('MSG: ')] == [
        'MSG: std_msgs/Header', 'MSG: builtin_interfaces/Time',
        'MSG: trajectory_msgs/JointTrajectoryPoint', 'MSG: builtin_interfaces/Duration']
    assert text.count('=' * 80 + '\n') == 4 and 'float64[] positions' in text
    decoders = generate_dynamic('trajectory_msgs/msg/JointTrajectory', text)
    assert 'trajectory_msgs/JointTrajectoryPoint' in decoders
    assert message_definition('std_msgs/msg/String').split('\n=')[0].strip().endswith(
        'string data')
    with pytest.raises(LookupError, match='no .msg definition of nonexistent_msgs/msg/Foo'):
        message_definition('nonexistent_msgs/msg/Foo')


# --- the recorder alone -----------------------------------------------------------------------

def test_recorder_writes_ros2_messages_that_read_back(tmp_path):
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    from rsd_ros.topics import LIBERO_ACTION_NAMES, pack_chunk

    recorder = EpisodeRecorder(tmp_path / 'rec')
    path = recorder.begin('libero_spatial_task1_init2_ep0')
    assert path == tmp_path / 'rec' / 'libero_spatial_task1_init2_ep0.mcap'
    part = tmp_path / 'rec' / 'libero_spatial_task1_init2_ep0.mcap.part'
    assert part.exists() and not path.exists() and recorder.path == path

    stamp = 1_700_000_000_123_456_789
    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    image = Image(height=4, width=6, encoding='rgb8', step=18, data=pixels.tobytes())
    image.header.stamp, image.header.frame_id = time_msg(stamp), 'agentview'
    joints = JointState(name=['j1', 'j2'], position=[0.5, -1.25])
    joints.header.stamp = time_msg(stamp)
    chunk = pack_chunk([[0.1 * k] * 7 for k in range(8)], time_msg(stamp), 'agentview',
                       LIBERO_ACTION_NAMES, 0.05)
    recorder.write('/ns/instruction', String(data='put the bowl on the plate'), stamp - 5)
    recorder.write('/ns/camera/image_raw', image, stamp + 10)
    recorder.write('/ns/joint_states', joints, stamp + 11)
    recorder.write('/ns/action_chunk', chunk, stamp + 42_000_000)
    recorder.write('/ns/camera/image_raw', image, stamp + 50_000_000)
    record = {'success': True, 'steps': 8, 'instruction': 'put the bowl on the plate',
              'latency_ms': {'p50': 42.0}}
    recorder.write('/ns/episode_result', String(data=json.dumps(record)), stamp + 60_000_000)
    assert recorder.finish(record) == path
    assert path.exists() and not part.exists() and recorder.path is None

    header, topics, metadata = read(path)
    assert header.profile == 'ros2'
    assert {t: [m.schema.name for m in ms][0] for t, ms in topics.items()} == {
        f'/ns/{t}': name for t, name in TYPES.items()}
    for messages in topics.values():
        assert {(m.schema.encoding, m.channel.message_encoding) for m in messages} == \
            {('ros2msg', 'cdr')}
    assert {t: len(ms) for t, ms in topics.items()} == {
        '/ns/instruction': 1, '/ns/camera/image_raw': 2, '/ns/joint_states': 1,
        '/ns/action_chunk': 1, '/ns/episode_result': 1}
    # log_time as given; publish_time = header stamp, else log_time
    first, second = topics['/ns/camera/image_raw']
    assert (first.log_time_ns, first.publish_time_ns) == (stamp + 10, stamp)
    assert (second.log_time_ns, second.publish_time_ns) == (stamp + 50_000_000, stamp)
    (instruction,) = topics['/ns/instruction']
    assert instruction.publish_time_ns == instruction.log_time_ns == stamp - 5
    # decoded by mcap_ros2 from the schema text: the fields we wrote
    decoded = first.ros_msg
    assert (decoded.height, decoded.width, decoded.encoding, decoded.header.frame_id) == \
        (4, 6, 'rgb8', 'agentview')
    assert stamp_ns(decoded.header.stamp) == stamp and bytes(decoded.data) == pixels.tobytes()
    (trajectory_,) = topics['/ns/action_chunk']
    assert list(trajectory_.ros_msg.joint_names) == list(LIBERO_ACTION_NAMES)
    points = trajectory_.ros_msg.points
    assert len(points) == 8 and list(points[3].positions) == pytest.approx([0.3] * 7)
    assert (points[7].time_from_start.sec, points[7].time_from_start.nanosec) == (0, 400_000_000)
    assert list(topics['/ns/joint_states'][0].ros_msg.position) == [0.5, -1.25]
    assert json.loads(topics['/ns/episode_result'][0].ros_msg.data) == record
    assert metadata['result'] == {'success': 'true', 'steps': '8',
                                  'instruction': 'put the bowl on the plate'}
    # the stored bytes are rclpy's CDR: they deserialize to the message written
    with open(path, 'rb') as stream:
        raw = [m for _, c, m in make_reader(stream).iter_messages()
               if c.topic == '/ns/camera/image_raw']
    assert deserialize_message(raw[0].data, Image) == image


def test_an_unfinished_episode_keeps_its_part_name_and_off_records_nothing(tmp_path):
    from std_msgs.msg import String

    recorder = EpisodeRecorder(tmp_path)
    recorder.begin('ep0')
    recorder.write('/instruction', String(data='a'), 5)
    recorder.begin('ep1')        # a new episode closes the unfinished one
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ep0.mcap.part', 'ep1.mcap.part']
    assert recorder.abort() == tmp_path / 'ep1.mcap.part' and recorder.abort() is None
    assert recorder.finish() is None
    _, topics, _ = read(tmp_path / 'ep0.mcap.part')     # closed properly: readable
    assert [m.ros_msg.data for m in topics['/instruction']] == ['a']

    off = EpisodeRecorder('')
    assert not off.enabled and off.begin('ep') is None and off.path is None
    off.write('/instruction', String(data='a'), 5)
    assert off.finish({'success': True}) is None and off.abort() is None


# --- real episodes through the bridge ---------------------------------------------------------

@pytest.fixture(scope='module')
def task():
    from sim_bridge.libero_env import LiberoTask

    scene = LiberoTask('libero_spatial', task_id=0, camera_size=64)
    yield scene
    scene.close()


def namespaced_context():
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context, args=['--ros-args', '-r', f'__ns:={NAMESPACE}'])
    return context


@pytest.fixture
def contexts():
    """(bridge context, policy context), every node in both in NAMESPACE."""
    pair = namespaced_context(), namespaced_context()
    yield pair
    for context in pair:
        context.try_shutdown()


def test_lockstep_episodes_are_recorded_as_ros2_mcap(task, contexts, tmp_path):
    bridge_context, policy_context = contexts
    policy = PlayedPolicy(policy_context, lambda i, image: trajectory(image.header.stamp))
    mcap_dir = tmp_path / 'mcap'
    bridge, spinner = start_bridge(bridge_context, task, tmp_path, max_steps=16, episodes=2,
                                   init_state=3, mcap_dir=str(mcap_dir))
    spin_until_finished(bridge, spinner, policy)

    records = read_results(tmp_path)
    assert [json.loads(r) for r in policy.results] == records
    names = ['libero_spatial_task0_init3_ep0.mcap', 'libero_spatial_task0_init4_ep1.mcap']
    assert sorted(p.name for p in mcap_dir.iterdir()) == names     # no .part left
    seen = {stamp_ns(image.header.stamp): image for image in policy.images}
    recorded_stamps = []
    for record, name in zip(records, names, strict=True):
        path = mcap_dir / name
        assert record['mcap_file'] == str(path)
        header, topics, metadata = read(path)
        assert header.profile == 'ros2'
        assert {t: ms[0].schema.name for t, ms in topics.items()} == {
            f'{NAMESPACE}/{t}': type_ for t, type_ in TYPES.items()}
        for messages in topics.values():
            assert {(m.schema.encoding, m.channel.message_encoding) for m in messages} == \
                {('ros2msg', 'cdr')}
        images = topics[f'{NAMESPACE}/camera/image_raw']
        joints = topics[f'{NAMESPACE}/joint_states']
        chunks = topics[f'{NAMESPACE}/action_chunk']
        (instruction,) = topics[f'{NAMESPACE}/instruction']
        (result,) = topics[f'{NAMESPACE}/episode_result']

        # counts: every observation published (republished ones too), every chunk received
        assert len(images) == record['observations'] + record['republished_observations'] >= 2
        assert len(joints) == len(images)
        assert len(chunks) == record['executed_chunks'] + record['rejected_chunks'] + \
            record['stale_chunks'] == 16 // EXECUTION_HORIZON
        assert json.loads(result.ros_msg.data) == record
        assert instruction.ros_msg.data == record['instruction'] == task.language
        assert metadata['result']['success'] == 'false'
        assert metadata['result']['steps'] == str(record['steps']) == '16'

        # stamps: publish_time = header stamp; images and joint states share them; the
        # images are the ones the policy received, byte for byte
        stamps = [m.publish_time_ns for m in images]
        assert stamps == [stamp_ns(m.ros_msg.header.stamp) for m in images] == sorted(stamps)
        assert [m.publish_time_ns for m in joints] == stamps
        for message in images:
            assert 0 <= message.log_time_ns - message.publish_time_ns < 1e9   # sent on stamping
            assert bytes(message.ros_msg.data) == bytes(seen[message.publish_time_ns].data)
            assert message.ros_msg.header.frame_id == 'agentview'
        recorded_stamps += stamps

        # chunks: stamped with an observation of this episode; receive - stamp = the
        # record's latencies
        assert all(m.publish_time_ns == stamp_ns(m.ros_msg.header.stamp) for m in chunks)
        assert {m.publish_time_ns for m in chunks} <= set(stamps)
        latencies = [(m.log_time_ns - m.publish_time_ns) * 1e-6 for m in chunks]
        assert latencies == pytest.approx(record['latencies_ms'], abs=2e-3)
        assert [len(m.ros_msg.points) for m in chunks] == [8] * (16 // EXECUTION_HORIZON)

        # the episode in time: instruction first, result last, spanning its wall time
        everything = sorted(m.log_time_ns for ms in topics.values() for m in ms)
        assert everything[0] == instruction.log_time_ns <= images[0].log_time_ns
        assert everything[-1] == result.log_time_ns
        span = (result.log_time_ns - images[0].publish_time_ns) * 1e-9
        assert record['wall_time_s'] - 0.05 <= span <= record['wall_time_s'] + 1.0

    # together the two files hold every image the policy saw, and only those
    assert recorded_stamps == sorted(seen)


def test_a_stopped_episode_leaves_only_a_part_file(task, contexts, tmp_path):
    bridge_context, policy_context = contexts
    policy = PlayedPolicy(policy_context,
                          lambda i, image: trajectory(image.header.stamp) if i == 0 else None)
    mcap_dir = tmp_path / 'mcap'
    bridge, spinner = start_bridge(bridge_context, task, tmp_path, max_steps=24,
                                   mcap_dir=str(mcap_dir))

    def stop_when_unanswered(current):
        if len(current.images) >= 2:
            bridge.stop()          # the second observation is never answered
        return None

    spin_until_finished(bridge, spinner, policy, during=stop_when_unanswered)
    assert not (tmp_path / 'results.jsonl').exists() and policy.results == []
    (part,) = mcap_dir.iterdir()
    assert part.name == 'libero_spatial_task0_init0_ep0.mcap.part'
    _, topics, metadata = read(part)
    assert len(topics[f'{NAMESPACE}/camera/image_raw']) == len(policy.images) >= 2
    assert len(topics[f'{NAMESPACE}/action_chunk']) == 1
    assert f'{NAMESPACE}/episode_result' not in topics and 'result' not in metadata


# --- rsd eval-libero --mcap -------------------------------------------------------------------

def test_eval_libero_mcap_sets_every_bridges_mcap_dir(tmp_path):
    import argparse

    from sim_bridge import eval_summary, evaluate
    from sim_bridge.eval_arms import Run

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    run = Run(arm=0, task_id=3, init_state=0, episodes=1)
    argv = evaluate.bridge_command(parser.parse_args(['--mcap']), run, tmp_path / 'r.jsonl',
                                   None, tmp_path / 'mcap')
    assert f"mcap_dir:='{tmp_path / 'mcap'}'" in argv
    assert "mcap_dir:=''" in evaluate.bridge_command(parser.parse_args([]), run,
                                                     tmp_path / 'r.jsonl', None)
    summary = eval_summary.summarize([], [0], {'suite': 's', 'policy': 'p', 'mode': 'm'})
    summary['recordings'] = {'dir': '/out/mcap', 'files': ['/out/mcap/a.mcap']}
    assert 'Episode recordings: 1 MCAP files in /out/mcap' in eval_summary.markdown_table(summary)


@pytest.mark.slow
def test_eval_libero_mcap_records_every_episode(tmp_path):
    from test_evaluate import STAND_IN_POLICY, rsd

    script = tmp_path / 'stand_in_policy.py'
    script.write_text(STAND_IN_POLICY)
    out = tmp_path / 'out'
    (out / 'mcap').mkdir(parents=True)
    (out / 'mcap' / 'libero_spatial_task0_init9_ep0.mcap').write_bytes(b'an earlier run')
    result = rsd('eval-libero', '--suite', 'libero_spatial', '--tasks', '0', '--trials', '2',
                 '--max-steps', '8', '--camera-size', '64', '--out', str(out), '--mcap',
                 '--json', '--policy-command', f'{sys.executable} {script} {tmp_path / "pid"}')
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads(result.stdout)
    files = [str(out / 'mcap' / f'libero_spatial_task0_init{i}_ep{i}.mcap') for i in (0, 1)]
    assert summary['recordings'] == {'dir': str(out / 'mcap'), 'files': files}
    assert sorted(str(p) for p in (out / 'mcap').iterdir()) == files   # the stale one removed
    assert f'Episode recordings: 2 MCAP files in {out / "mcap"}' in \
        (out / 'summary.md').read_text()
    records = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
    for record, path in zip(records, files, strict=True):
        _, topics, _ = read(path)
        (message,) = topics['/episode_result']
        assert json.loads(message.ros_msg.data) == record and record['mcap_file'] == path
        assert len(topics['/camera/image_raw']) == record['observations'] + \
            record['republished_observations']
