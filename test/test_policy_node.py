"""The rsd_policy node over real DDS with the real engine on the tiny bundle.

Each test runs a PolicyNode in its own rclpy context (its own DDS participant), spun on a
background thread, and talks to it from a test node in another context through the topics,
in a namespace of its own. Waits are event-driven (spin until a message arrives) with generous
timeouts; nothing asserts on durations.
"""

from collections.abc import Iterator
from contextlib import contextmanager
import os
from pathlib import Path
import re
import signal
import subprocess
import sys
import time

from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
from policy_harness import INSTRUCTION, Camera
import psutil
import pytest
from rcl_interfaces.msg import Log
import rclpy
from rclpy.duration import Duration
from rclpy.exceptions import InvalidParameterValueException
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_rosout_default, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from shared_memory import held_files, left_behind
import torch

from rsd_core.bundle import DEFAULT_ACTION_NAMES
from rsd_ros.image_conversion import array_to_imgmsg
from rsd_ros.policy_node import PolicyNode
from rsd_ros.policy_parameters import PARAMETERS, instruction_problem, parameter_problem
from rsd_ros.topics import stamp_ns


@pytest.fixture(scope='module')
def draft_dir(tiny_bundle, tmp_path_factory) -> Path:
    """An untrained draft that fits the tiny bundle (proposals rarely accepted, but real)."""
    from rsd_core.draft import DraftConfig, DraftModel
    from rsd_core.main_model import MainModel

    main = MainModel.from_dir(tiny_bundle)
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig(hidden_size=main.hidden_size))
    directory = tmp_path_factory.mktemp('draft')
    draft.save(directory, {'main_weights_sha256': main.weights_hash, 'trained': False})
    return directory


def test_image_and_instruction_give_a_chunk_stamped_with_the_image(run_policy):
    camera, _ = run_policy(frame_id='robot_base', control_period=0.1, hardware_id='')
    early = camera.send()                        # before any instruction: held, not acted on
    assert camera.spin_until(lambda: camera.diagnostics and
                             'waiting for an instruction' in camera.diagnostics[-1].message)
    assert not camera.chunks
    camera.instruct()
    chunk, record = camera.chunk_for(early)      # the held frame runs once the task is known
    assert chunk.header.frame_id == 'robot_base'
    assert chunk.joint_names == list(DEFAULT_ACTION_NAMES)
    assert len(chunk.points) == 8 and all(len(p.positions) == 7 for p in chunk.points)
    assert all(-1.0 <= x <= 1.0 for p in chunk.points for x in p.positions)
    assert [stamp_ns(p.time_from_start) for p in chunk.points] == [
        (i + 1) * 100_000_000 for i in range(8)]
    assert record['main_passes'] == 8 and record['used_draft'] is False
    assert record['latency_ms'] >= record['total_ms'] > 0

    stamp = camera.send(size=(224, 224))
    camera.chunk_for(stamp)
    camera.wait_counter('chunks', 2)
    status = camera.diagnostics[-1]
    assert status.name == 'rsd_policy: inference' and status.hardware_id == 'cpu'
    assert status.level == DiagnosticStatus.OK and camera.value('mode') == 'main-only'
    assert float(camera.value('latency p50 ms')) > 0


def test_bad_input_is_skipped_and_the_next_good_frame_still_gets_its_chunk(run_policy):
    camera, policy = run_policy()
    camera.instruct()
    camera.chunk_for(camera.send())
    bad_images = [
        Image(height=4, width=4, encoding='yuv422', step=8, data=bytes(32)),   # encoding
        Image(height=4, width=4, encoding='mono16', step=8, data=bytes(32)),   # depth-like
        Image(height=4, width=4, encoding='rgb8', step=12, data=bytes(40)),    # data length
        Image(height=0, width=0, encoding='rgb8', step=0, data=b''),           # zero size
        Image(height=4, width=4, encoding='rgb8', step=10, data=bytes(40)),    # step < row
    ]
    for count, bad in enumerate(bad_images, start=1):
        camera.send(bad)
        camera.wait_counter('bad images', count)
        camera.chunk_for(camera.send())

    huge = array_to_imgmsg(np.full((1080, 1920, 3), 90, np.uint8))       # resized by the model
    camera.chunk_for(camera.send(huge))
    padded = Image(height=3, width=5, encoding='bgr8', step=17, data=bytes(51))
    camera.chunk_for(camera.send(padded))

    # Bad instructions are refused; the one in force stays (and is used for the next frame).
    non_utf8 = b'\xff\xfe bowl \xc3('
    raw = bytes([0, 1, 0, 0]) + (len(non_utf8) + 1).to_bytes(4, 'little') + non_utf8 + b'\0'
    for count, publish in enumerate([lambda: camera.instruct(''), lambda: camera.instruct(' \t\n'),
                                     lambda: camera.instruction_pub.publish(raw)], start=1):
        publish()
        camera.wait_counter('bad instructions', count)
        camera.chunk_for(camera.send())

    # An engine exception (corrupt weights -> NaN logits, refused by the engine) is logged,
    # turns the diagnostics to ERROR, and the node goes on with the next good frame.
    bias = policy.node._engine.main.rfsq_head.proj.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.fill_(float('nan'))
    camera.send()
    camera.wait_counter('errors', 1)
    assert camera.spin_until(lambda: camera.diagnostics[-1].level == DiagnosticStatus.ERROR)
    assert 'NonFiniteLogitsError' in camera.diagnostics[-1].message
    with torch.no_grad():
        bias.copy_(saved)
    _, record = camera.chunk_for(camera.send())
    assert (record['bad_images'], record['bad_instructions'], record['errors']) == (5, 3, 1)
    assert camera.spin_until(lambda: camera.diagnostics[-1].level != DiagnosticStatus.ERROR)


def test_frames_older_than_max_image_age_get_no_chunk(run_policy):
    camera, _ = run_policy(max_image_age=0.5)
    camera.instruct()
    old = camera.send(age=2.0)
    camera.wait_counter('stale', 1)
    fresh = camera.send()
    _, record = camera.chunk_for(fresh)
    assert record['stale'] == 1
    assert all(stamp_ns(c.header.stamp) != old for c in camera.chunks)


def test_a_model_with_proprioception_acts_on_image_plus_joint_states(run_policy,
                                                                     proprio_bundle):
    """The node subscribes joint_states only for such a model, picks the model's joints by
    name, and does not act (counted, not crashed) without a usable joint state."""
    from conftest import TEST_JOINTS

    camera, policy = run_policy(model_dir=str(proprio_bundle), max_image_age=1.0)
    joints = camera.create_publisher(JointState, 'joint_states', qos_profile_sensor_data)
    assert camera.spin_until(lambda: joints.get_subscription_count() > 0)
    camera.instruct()
    camera.send()
    camera.wait_counter('no state', 1)                         # nothing received yet

    def publish(names, positions, age=0.0):
        msg = JointState(name=list(names), position=[float(v) for v in positions])
        msg.header.stamp = (camera.get_clock().now() - Duration(seconds=age)).to_msg()
        joints.publish(msg)
        mailbox = policy.node._mailbox
        assert camera.spin_until(lambda: mailbox.joints(0) is not None
                                 and mailbox.joints(0).header.stamp == msg.header.stamp)

    publish(TEST_JOINTS[:2], [0.1, 0.2])                       # a joint missing
    camera.send()
    camera.wait_counter('no state', 2)
    publish(('extra',) + TEST_JOINTS[::-1], [9.0, 0.04, -1.2, 0.3], age=3.0)   # stale
    camera.send()
    camera.wait_counter('no state', 3)
    publish(('extra',) + TEST_JOINTS[::-1], [9.0, 0.04, -1.2, 0.3])  # any order, extras ignored
    chunk, record = camera.chunk_for(camera.send())
    assert len(chunk.points) == 8 and record['no_state'] == 3
    picture = camera.rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    state = np.array([0.3, -1.2, 0.04], np.float32)
    expected, _ = policy.node._engine.predict(picture, INSTRUCTION, proprio=state)
    stamp = camera.send(array_to_imgmsg(picture))
    chunk, _ = camera.chunk_for(stamp)
    np.testing.assert_allclose([p.positions for p in chunk.points],
                               np.clip(expected, -1, 1), atol=1e-6)


def test_parameters_switch_at_run_time_and_bad_values_are_refused(run_policy, draft_dir):
    # Ceilings set at start allow the tolerance rule and a huge tolerance at run time.
    camera, _ = run_policy(draft_dir=str(draft_dir), adaptive_proposals=False,
                           acceptance_ceiling='tolerance', tolerance_ceiling=[100.0],
                           action_high=[0.5] * 7)
    camera.instruct()
    _, record = camera.chunk_for(camera.send())
    assert record['used_draft'] is True and record['acceptance'] == 'exact'
    assert record['layers_proposed'] == 3

    assert all(r.successful for r in camera.set_parameters(use_draft=False))
    _, record = camera.chunk_for(camera.send())
    assert record['used_draft'] is False and record['main_passes'] == 8

    # A bound far above any action change accepts every proposal of the untrained draft;
    # a zero bound accepts only proposals that change nothing.
    results = camera.set_parameters(use_draft=True, acceptance='tolerance', tolerance=[100.0])
    assert all(r.successful for r in results)
    chunk, record = camera.chunk_for(camera.send())
    assert record['used_draft'] is True and record['acceptance'] == 'tolerance'
    assert record['layers_accepted'] == 3
    assert max(x for p in chunk.points for x in p.positions) <= 0.5
    assert all(r.successful for r in camera.set_parameters(tolerance=[0.0] * 7))
    _, record = camera.chunk_for(camera.send())
    assert record['layers_accepted'] < 3 and record['max_deviation'] == 0.0

    refused = {
        'acceptance': ('fuzzy', 'expected one of exact, tolerance, bounded'),
        'tolerance': ([-0.1], 'finite values >= 0'),
        'action_names': (['a', 'b', 'c', 'd', 'e', 'f', 'g'], 'read-only'),
        'action_low': ([-2.0] * 7, 'read-only'),
        'model_dir': ('/elsewhere', 'read-only'),
        'control_period': (10.0, 'read-only'),
        'diagnostics_period': (0.05, 'range'),
    }
    for name, (value, reason) in refused.items():
        (result,) = camera.set_parameters(**{name: value})
        assert not result.successful and reason in result.reason, (name, result.reason)
    (result,) = camera.set_parameters(tolerance=[0.1, 0.2, 0.3])
    assert not result.successful and 'expected 1 (all dims) or 7' in result.reason
    (result,) = camera.set_parameters(tolerance=[100.5])
    assert not result.successful and 'exceeds the ceiling' in result.reason


def test_no_peer_can_widen_what_the_arm_is_commanded(run_policy):
    """Every declared parameter, tried as a hostile peer would: what changes the commanded
    motion is read-only, the decoding can only be tightened, strings are bounded."""
    camera, _ = run_policy(acceptance='bounded', tolerance=[0.05])
    widening = {
        'model_dir': '/elsewhere', 'draft_dir': '', 'autostart': False, 'device': 'cuda',
        'dtype': 'float64', 'state_joint_names': ['a'], 'control_period': 10.0,
        'action_names': [f'j{i}' for i in range(7)], 'frame_id': 'x' * 1_000_000,
        'max_image_age': 0.0, 'action_low': [-2.0] * 7, 'action_high': [2.0] * 7,
        'hardware_id': 'x' * 1_000_000, 'acceptance_ceiling': 'tolerance',
        'tolerance_ceiling': [1e308], 'acceptance': 'tolerance', 'tolerance': [1e308],
        'diagnostics_period': 0.01, 'stats_window': 0, 'max_instruction_bytes': 1_000_000,
        'max_clock_skew': 60.0, 'max_state_abs': 1e6, 'arms': ['arm0', 'arm1'],
        'batch_window': 1.0,
    }
    allowed = {'use_draft': False, 'adaptive_proposals': False}      # no change of actions
    assert set(widening) | set(allowed) == set(PARAMETERS), 'a parameter is not tried here'
    for name, value in widening.items():
        (result,) = camera.set_parameters(**{name: value})
        assert not result.successful, f'{name}={str(value)[:40]} was accepted'
    for name, value in allowed.items():
        (result,) = camera.set_parameters(**{name: value})
        assert result.successful, (name, result.reason)
    tightened = camera.set_parameters(acceptance='exact', tolerance=[0.01])
    assert all(r.successful for r in tightened)
    (result,) = camera.set_parameters(acceptance='bounded')         # back up to the ceiling
    assert result.successful


def test_bounded_mode_reports_depth_bound_and_k_over_dds(run_policy, draft_dir):
    camera, _ = run_policy(draft_dir=str(draft_dir), acceptance='bounded', tolerance=[0.5])
    camera.instruct()
    records = [camera.chunk_for(camera.send())[1] for _ in range(3)]
    for previous, record in zip([None] + records, records, strict=False):
        assert record['acceptance'] == 'bounded'
        assert 1 <= record['layers_decoded'] < 8 and record['main_passes'] >= 1
        assert 0 < record['certified_bound'] <= 0.5
        if previous is not None:          # proposals cover only the depth last needed
            assert record['layers_proposed'] <= max(0, previous['layers_decoded'] - 2)
    camera.wait_counter('chunks', 3)
    assert camera.value('mode') == 'bounded'
    assert 1 <= float(camera.value('layers decoded')) < 8
    assert 0 < float(camera.value('certified bound max')) <= 0.5
    assert float(camera.value('K chosen mean')) >= 0
    # tightened at run time: every layer is decoded again (the certificate cannot pass)
    assert all(r.successful for r in camera.set_parameters(tolerance=[0.0]))
    _, record = camera.chunk_for(camera.send())
    assert record['layers_decoded'] == 8 and record['certified_bound'] == 0.0


def test_use_draft_is_refused_without_a_draft(run_policy):
    camera, _ = run_policy()
    (result,) = camera.set_parameters(use_draft=True)
    assert not result.successful and 'no draft is loaded' in result.reason


@pytest.mark.parametrize('name, value, reason', [
    ('device', 'gpu0', "expected 'cpu', 'cuda' or 'cuda:N'"),
    ('dtype', 'float8', 'expected one of float32'),
    ('tolerance', [float('nan')], 'finite values >= 0'),
    ('action_names', ['a'] * 7, 'distinct'),
    ('action_high', [1.0] * 6 + [float('inf')], '7 finite values'),
])
def test_bad_start_values_stop_the_node_with_a_reason(ros_context, name, value, reason):
    with pytest.raises(InvalidParameterValueException, match=re.escape(reason)):
        PolicyNode(context=ros_context, parameter_overrides=[Parameter(name, value=value)])


def test_parameter_and_instruction_checks():
    current = {'action_low': [-1.0] * 7, 'action_high': [1.0] * 7}
    assert parameter_problem('device', 'cuda:1', current) is None
    assert parameter_problem('tolerance', [0.1] * 7, current) is None
    assert 'exceeds' in parameter_problem('action_high', [-2.0] * 7, current)
    assert instruction_problem('  pick up the bowl ') is None
    assert 'empty' in instruction_problem('\t')
    assert 'UTF-8' in instruction_problem('bowl \ufffd')


@pytest.fixture(scope='module')
def default_size_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The default-size preset (~15 M parameters): a chunk takes far longer than 33 ms here."""
    from rsd_core.bundle_build import build_main_bundle
    from rsd_core.tokenizer import ActionTokenizer

    tokenizer = ActionTokenizer.load(tiny_bundle / 'action_tokenizer')
    return build_main_bundle(tmp_path_factory.mktemp('default') / 'bundle', 'default', tokenizer)


def test_a_30_hz_camera_faster_than_inference_drops_frames_not_memory(
        run_policy, default_size_bundle):
    camera, _ = run_policy(model_dir=str(default_size_bundle))
    camera.instruct()
    camera.chunk_for(camera.send())                             # warm-up
    process = psutil.Process()
    sent, rss = [], []
    period = 1 / 30
    next_frame = time.monotonic()
    while len(sent) < 150:                                      # 5 s of 640x480 frames
        sent.append(camera.send(size=(480, 640)))
        if len(sent) % 30 == 0:
            rss.append(process.memory_info().rss)
        next_frame += period
        camera.spin_until(lambda due=next_frame: time.monotonic() >= due, timeout=1.0)
    chunks_when_camera_stopped = len(camera.chunks)
    last = sent[-1]
    # The newest frame is the one left; wait for its chunk (or for it to be replaced).
    camera.spin_until(lambda: any(stamp_ns(c.header.stamp) == last for c in camera.chunks), 30)
    camera.spin_until(lambda: False, timeout=1.0)               # let stragglers arrive

    records = camera.stats[1:]
    in_flight = 2               # when the camera stops: the frame in inference and the newest one
    # Every frame the policy did not answer while the camera ran was dropped, none queued (how
    # many that is depends on this machine's inference time, so no fixed count).
    assert records[-1]['dropped'] > 0, 'a slow policy under a 30 Hz camera must drop frames'
    assert records[-1]['dropped'] >= len(sent) - chunks_when_camera_stopped - in_flight
    # The mailbox holds one frame: every image received is a chunk, dropped, stale, refused,
    # failed, or the one still waiting (at most 1) -- at every chunk.
    for r in records:
        assert 0 <= r['frames'] - (r['chunks'] + r['dropped'] + r['stale'] + r['bad_images']
                                   + r['errors']) <= 1
    # No backlog: once the camera stops, at most the frames in flight are still to come.
    assert len(camera.chunks) - chunks_when_camera_stopped <= in_flight
    chunk_stamps = [stamp_ns(c.header.stamp) for c in camera.chunks[1:]]
    assert chunk_stamps == sorted(chunk_stamps) and set(chunk_stamps) <= set(sent)
    # Memory stays flat: 150 leaked 0.9 MB frames would add 130 MB.
    assert max(rss) - rss[0] < 40e6, [f'{r / 1e6:.0f} MB' for r in rss]


def start_policy_process(bundle: Path, namespace: str,
                         code: str | None = None) -> subprocess.Popen:
    """rsd_policy as its own process on `bundle` (`code`: Python run instead of the module,
    reading the same ROS arguments), stdout and stderr together in one text pipe."""
    program = ['-m', 'rsd_ros.policy_main'] if code is None else ['-c', code]
    return subprocess.Popen(
        [sys.executable, *program, '--ros-args', '-r', f'__ns:={namespace}',
         '-p', f'model_dir:={bundle}', '-p', "draft_dir:=''"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@contextmanager
def camera_of(process: subprocess.Popen, namespace: str) -> Iterator[Camera]:
    """A Camera (own rclpy context) on the policy process's namespace; afterwards the camera is
    closed and the process killed if it is still running."""
    context = rclpy.Context()
    rclpy.init(context=context)
    camera = Camera(context, namespace, 'cpu')
    try:
        yield camera
    finally:
        if process.poll() is None:
            process.kill()
        camera.close()
        context.try_shutdown()


def signal_exit(process: subprocess.Popen, sig: signal.Signals) -> tuple[str, float, set]:
    """Send `sig`; (the process's output, s from the signal to its end, the Fast DDS shared
    memory files it held just before)."""
    shared = held_files(process.pid)
    signalled = time.monotonic()
    process.send_signal(sig)
    output, _ = process.communicate(timeout=20)
    return output, time.monotonic() - signalled, shared


def check_no_shared_memory_left(shared: set, sig: signal.Signals) -> None:
    assert shared, 'the process held no Fast DDS shared memory: nothing was checked'
    assert not left_behind(shared), f'{sig.name} left {left_behind(shared)} in /dev/shm'


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_the_node_process_shuts_down_cleanly_on_signals(tiny_bundle, sig):
    namespace = f'/policy_proc_{os.getpid()}_{sig.name}'
    process = start_policy_process(tiny_bundle, namespace)
    with camera_of(process, namespace) as camera:
        camera.connect()
        camera.instruct()
        # The process's writers may match us a little after we match them: resend until a
        # chunk comes back.
        for _ in range(6):
            stamp = camera.send()
            if camera.spin_until(lambda: any(stamp_ns(c.header.stamp) == stamp  # noqa: B023
                                             for c in camera.chunks), 10.0):
                break
        assert camera.chunks, 'the node process never answered'
        camera.send()                          # likely in inference when the signal comes
        output, _, shared = signal_exit(process, sig)
    assert process.returncode == 0, output
    assert 'Traceback' not in output, output
    check_no_shared_memory_left(shared, sig)


# rsd_policy whose inference outlives the shutdown wait: each predict first sleeps 60 s (the
# process, its DDS participant and its exit path are the real ones).
SLOW_POLICY = """
import time
from rsd_core.engine import RSDEngine
import rsd_ros.policy_main as policy_main
predict = RSDEngine.predict
RSDEngine.predict = lambda *args, **kwargs: time.sleep(60) or predict(*args, **kwargs)
policy_main.SHUTDOWN_WAIT = 0.5
policy_main.main()
"""


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGHUP])
def test_exit_during_inference_leaves_no_shared_memory(tiny_bundle, sig):
    """The `os._exit` path (inference still running after SHUTDOWN_WAIT) destroys the ROS
    handles first: without that, 11 of the 13 files the process held stayed in /dev/shm.
    SIGHUP takes the same path as SIGTERM (it used to wait 10 s, then finalise under the
    running thread)."""
    namespace = f'/policy_slow_{os.getpid()}_{sig.name}'
    process = start_policy_process(tiny_bundle, namespace, SLOW_POLICY)
    with camera_of(process, namespace) as camera:
        logs = []
        camera.create_subscription(Log, '/rosout', logs.append, qos_profile_rosout_default)
        camera.connect()
        camera.instruct()
        assert camera.spin_until(lambda: any(
            m.name.endswith('rsd_policy') and m.msg.startswith('instruction:') for m in logs)), \
            'the instruction never came into force'
        received = int(camera.value('frames'))
        camera.send()
        camera.wait_counter('frames', received + 1)    # taken at once: inference for 60 s
        output, took, shared = signal_exit(process, sig)
    assert process.returncode == 0, output
    assert 'exiting without waiting for it' in output, output
    assert took < 10.0, f'{sig.name}: exit {took:.1f} s after the signal'
    check_no_shared_memory_left(shared, sig)
