"""`rsd eval-libero`: the summary arithmetic, the child-process plumbing, the episodes dealt to
several arms, a real run with the bridge and a stand-in policy as separate processes over DDS,
and one with two bridges against one rsd_policy serving both arms."""

import argparse
import json
import os
from pathlib import Path
import random
import subprocess
import sys
import time

import pytest

from sim_bridge import eval_arms, eval_processes, eval_summary, evaluate
from sim_bridge.chunk_executor import EXECUTION_HORIZON
from sim_bridge.eval_arms import Run

# A stand-in policy process: answers every image with a chunk that raises the hand, publishes
# policy_stats with a cumulative `dropped` counter, records its pid.
STAND_IN_POLICY = """
import json, os, sys
import rclpy
from builtin_interfaces.msg import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

NAMES = ['dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper']
open(sys.argv[1], 'w').write(str(os.getpid()))
try:
    with rclpy.init():
        node = rclpy.create_node('stand_in_policy')
        chunks = node.create_publisher(JointTrajectory, 'action_chunk', 1)
        stats = node.create_publisher(String, 'policy_stats', 10)
        count = [0]

        def answer(image):
            count[0] += 1
            msg = JointTrajectory(joint_names=NAMES)
            msg.header.stamp = image.header.stamp
            msg.points = [JointTrajectoryPoint(
                positions=[0.0, 0.0, 0.5, 0.0, 0.0, 0.0, -1.0],
                time_from_start=Duration(nanosec=50_000_000 * (k + 1))) for k in range(8)]
            stats.publish(String(data=json.dumps({
                'layers_proposed': 3, 'layers_accepted': 1, 'dropped': 2 * count[0]})))
            chunks.publish(msg)

        node.create_subscription(Image, 'camera/image_raw', answer, qos_profile_sensor_data)
        rclpy.spin(node)
except (KeyboardInterrupt, ExternalShutdownException):
    pass
"""


def record(task_id, success, steps, latencies, proposed=None, accepted=None, dropped=None):
    stats = None
    if proposed is not None:
        last = {} if dropped is None else {'dropped': dropped}
        stats = {'chunks': len(latencies), 'last': last,
                 'sums': {'layers_proposed': proposed, 'layers_accepted': accepted}}
    return {'task_id': task_id, 'task': f'task_{task_id}', 'success': success, 'steps': steps,
            'latencies_ms': latencies, 'latency_ms': {'p50': None}, 'held_steps': 1,
            'skipped_steps': 2, 'rejected_chunks': 0, 'wall_time_s': 1.5,
            'policy_stats': stats}


def test_summary_per_task_and_overall():
    records = [
        record(0, True, 100, [10.0, 20.0, 30.0], proposed=9, accepted=6, dropped=4),
        record(0, False, 220, [40.0], proposed=3, accepted=0, dropped=5),
        record(3, True, 80, [50.0, 60.0], proposed=6, accepted=6, dropped=9),
    ]
    summary = eval_summary.summarize(records, [0, 3], {'suite': 's', 'policy': 'p', 'mode': 'm'})
    first, second = summary['tasks']
    assert (first['episodes'], first['successes'], first['success_rate']) == (2, 1, 0.5)
    assert first['mean_steps'] == 160.0
    assert first['latency_p50_ms'] == pytest.approx(25.0)
    assert first['acceptance_rate'] == pytest.approx(0.5)
    assert (first['dropped_frames'], second['dropped_frames']) == (5, 4)  # cumulative counter
    overall = summary['overall']
    assert (overall['episodes'], overall['successes'], overall['chunks']) == (3, 2, 6)
    assert overall['acceptance_rate'] == pytest.approx(12 / 18)
    assert (overall['held_steps'], overall['dropped_frames']) == (3, 9)
    table = eval_summary.markdown_table(summary)
    assert '| 0 | 2 | 1/2 (50%) | 160.0 | 25.0 |' in table
    assert '| all | 3 | 2/3 (67%) |' in table


def test_summary_without_policy_stats_shows_dashes():
    summary = eval_summary.summarize([record(1, False, 50, [])], [1, 2],
                                 {'suite': 's', 'policy': 'p', 'mode': 'm'})
    assert summary['tasks'][1]['episodes'] == 0
    line = [row for row in eval_summary.markdown_table(summary).splitlines()
            if row.startswith('| 1 ')][0]
    assert line == '| 1 | 1 | 0/1 (0%) | 50.0 | - | - | - | 1 | 2 | 0 | - |'


def test_ros_param_keeps_types():
    assert eval_processes.ros_param('draft_dir', '') == ['-p', "draft_dir:=''"]
    assert eval_processes.ros_param('model_dir', '123') == ['-p', "model_dir:='123'"]
    assert eval_processes.ros_param('use_draft', False) == ['-p', 'use_draft:=false']
    assert eval_processes.ros_param('task_id', 3) == ['-p', 'task_id:=3']
    assert eval_processes.ros_param('names', ['a', 'b']) == ['-p', 'names:=["a", "b"]']


def parse(*argv):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_policy_command_for_the_rsd_policy(tmp_path):
    argv = evaluate.policy_command(parse('--no-draft', '--model', str(tmp_path)))
    assert Path(argv[0]).name == 'rsd_policy' and argv[1] == '--ros-args'
    assert "draft_dir:=''" in argv and 'use_draft:=false' in argv
    assert f"model_dir:='{tmp_path.resolve()}'" in argv
    argv = evaluate.policy_command(parse('--acceptance', 'tolerance'))
    assert "draft_dir:='default'" in argv and "acceptance:='tolerance'" in argv


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match='out of range'):
        evaluate.check_args(parse('--tasks', '0', '10'))
    with pytest.raises(ValueError, match='contradict'):
        evaluate.check_args(parse('--no-draft', '--draft', 'x'))
    with pytest.raises(ValueError, match='--trials'):
        evaluate.check_args(parse('--trials', '0'))


def test_episodes_are_dealt_to_the_arms_in_consecutive_blocks():
    assert eval_arms.deal_runs([0, 1, 2], 1, 0, 1) == [[Run(0, 0, 0, 1), Run(0, 1, 0, 1),
                                                        Run(0, 2, 0, 1)]]
    assert eval_arms.deal_runs([4], 2, 3, 2) == [[Run(0, 4, 3, 1)], [Run(1, 4, 4, 1)]]
    assert eval_arms.deal_runs([0, 1], 3, 0, 2) == [[Run(0, 0, 0, 3)], [Run(1, 1, 0, 3)]]
    assert eval_arms.deal_runs([0, 1], 2, 5, 3) == [   # 4 episodes: 2 + 1 + 1
        [Run(0, 0, 5, 2)], [Run(1, 1, 5, 1)], [Run(2, 1, 6, 1)]]
    with pytest.raises(ValueError, match='expected 1 to 2'):
        eval_arms.deal_runs([0], 2, 0, 3)


def test_several_arms_get_one_policy_and_a_namespace_per_bridge(tmp_path):
    args = parse('--arms', '2', '--batch-window', '0.05', '--tasks', '3', '--trials', '2')
    tasks, dealt = evaluate.check_args(args)
    assert tasks == [3] and dealt == [[Run(0, 3, 0, 1)], [Run(1, 3, 1, 1)]]
    policy = evaluate.policy_command(args)
    assert 'arms:=["arm0", "arm1"]' in policy and 'batch_window:=0.05' in policy
    bridge = evaluate.bridge_command(args, dealt[1][0], tmp_path / 'r.jsonl', None)
    assert bridge[bridge.index('-r') + 1] == '__ns:=/arm1'
    assert 'init_state:=1' in bridge and 'episodes:=1' in bridge
    single = evaluate.bridge_command(parse(), Run(0, 0, 0, 1), tmp_path / 'r.jsonl', None)
    assert '-r' not in single and 'arms' not in ' '.join(evaluate.policy_command(parse()))
    with pytest.raises(ValueError, match='scripted expert serves one arm'):
        evaluate.check_args(parse('--arms', '2', '--policy', 'expert'))
    with pytest.raises(ValueError, match='--arms 3'):
        evaluate.check_args(parse('--arms', '3', '--tasks', '0', '--trials', '2'))


def test_dropped_frames_are_counted_per_arm_and_batches_averaged():
    def arm_record(arm, task_id, dropped, batches):
        result = record(task_id, True, 10, [1.0] * len(batches), proposed=0, accepted=0,
                        dropped=dropped)
        result['policy_stats']['sums']['batch'] = sum(batches)
        result['policy_stats']['chunks'] = len(batches)
        return {**result, 'arm': arm}

    records = [arm_record(0, 0, 3, [2, 2]), arm_record(1, 1, 10, [2, 1]),
               arm_record(0, 1, 4, [1, 1])]           # each arm's own cumulative counter
    summary = eval_summary.summarize(records, [0, 1], {'suite': 's', 'policy': 'p',
                                                       'mode': 'm', 'arms': 2})
    first, second = summary['tasks']
    assert (first['dropped_frames'], second['dropped_frames']) == (3, 10 + 1)
    assert first['mean_batch'] == 2.0 and summary['overall']['mean_batch'] == pytest.approx(1.5)
    assert 'decoded together per chunk: 1.50' in eval_summary.markdown_table(summary)


def test_domain_picking_avoids_a_domain_in_use(ros_context):
    from rclpy.node import Node

    node = Node('domain_probe', context=ros_context)
    try:
        assert eval_processes.domain_in_use(int(os.environ['ROS_DOMAIN_ID']))
        picked = eval_processes.pick_domain_id(random.Random(0))
        assert 1 <= picked <= 101 and not eval_processes.domain_in_use(picked)
    finally:
        node.destroy_node()


def test_results_follower_reads_only_complete_lines(tmp_path):
    path = tmp_path / 'results.jsonl'
    follower = eval_arms.ResultsFollower(path)
    assert follower.new_records() == []
    path.write_text('{"a": 1}\n{"b": ')
    assert follower.new_records() == [{'a': 1}]
    with open(path, 'a') as stream:
        stream.write('2}\n')
    assert follower.new_records() == [{'b': 2}]


def rsd(*argv, timeout=300):
    return subprocess.run([str(Path(sys.executable).parent / 'rsd'), *argv],
                          capture_output=True, text=True, timeout=timeout)


def test_infrastructure_failure_exits_non_zero(tmp_path):
    result = rsd('eval-libero', '--tasks', '0', '--out', str(tmp_path / 'out'),
                 '--policy-command', f'{sys.executable} -c "import sys; sys.exit(3)"')
    assert result.returncode == 1, result.stderr
    assert 'the policy exited with status 3' in result.stderr
    summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
    assert summary['complete'] is False and summary['overall']['episodes'] == 0


@pytest.mark.slow
def test_eval_runs_bridge_and_policy_processes(tmp_path):
    script = tmp_path / 'stand_in_policy.py'
    script.write_text(STAND_IN_POLICY)
    pid_file = tmp_path / 'policy.pid'
    out = tmp_path / 'out'
    result = rsd('eval-libero', '--suite', 'libero_spatial', '--tasks', '0', '--trials', '2',
                 '--max-steps', '16', '--camera-size', '64', '--execute', '0',  # whole chunks
                 '--out', str(out), '--video', '--json',
                 '--policy-command', f'{sys.executable} {script} {pid_file}')
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads(result.stdout)
    assert summary == json.loads((out / 'summary.json').read_text())
    assert summary['complete'] is True
    (row,) = summary['tasks']
    assert (row['episodes'], row['mean_steps'], row['chunks']) == (2, 16.0, 4)
    assert row['latency_p50_ms'] > 0 and row['acceptance_rate'] == pytest.approx(1 / 3)
    assert row['dropped_frames'] == 8          # the stand-in's counter after 4 chunks
    records = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
    assert [r['init_state'] for r in records] == [0, 1]
    assert (out / 'summary.md').read_text().startswith('# LIBERO evaluation')
    assert (out / 'episode.mp4').stat().st_size > 1000
    assert 'init_state 1: failure in 16 steps' in result.stderr   # per-episode progress

    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5.0
    while Path(f'/proc/{pid}').exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f'/proc/{pid}').exists(), 'the policy process was left running'


@pytest.mark.slow
def test_eval_runs_two_arms_against_one_policy(tmp_path, tiny_bundle):
    out = tmp_path / 'out'
    result = rsd('eval-libero', '--suite', 'libero_spatial', '--tasks', '0', '--trials', '2',
                 '--arms', '2', '--batch-window', '0.05', '--max-steps', '16', '--execute', '0',
                 '--camera-size', '64', '--model', str(tiny_bundle), '--no-draft',
                 '--out', str(out), '--json', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads(result.stdout)
    assert summary['complete'] is True and summary['config']['arms'] == 2
    (row,) = summary['tasks']
    assert (row['episodes'], row['mean_steps'], row['chunks']) == (2, 16.0, 4)
    assert 1.0 <= row['mean_batch'] <= 2.0
    records = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
    assert sorted((r['arm'], r['init_state']) for r in records) == [(0, 0), (1, 1)]
    for record in records:               # each bridge saw its own arm's chunks and stats
        assert record['policy_stats']['chunks'] == 2 and record['rejected_chunks'] == 0
        assert record['policy_stats']['last']['chunks'] == 2
    policy_log = (out / 'logs' / 'policy.log').read_text()
    assert "2 arms ['arm0', 'arm1']" in policy_log, policy_log[-3000:]
    assert 'arm 1 task 0 init_state 1' in result.stderr


def test_execution_horizon_reaches_the_bridge_as_its_observation_interval(tmp_path):
    bridge = evaluate.bridge_command(parse('--execute', '2', '--temporal-ensemble'),
                                     Run(0, 0, 0, 1), tmp_path / 'r.jsonl', None)
    assert 'observation_interval:=2' in bridge and 'temporal_ensemble:=true' in bridge
    bridge = evaluate.bridge_command(parse(), Run(0, 0, 0, 1), tmp_path / 'r.jsonl', None)
    assert f'observation_interval:={EXECUTION_HORIZON}' in bridge
    assert 'temporal_ensemble:=false' in bridge
    # The scripted expert plans each chunk from where its previous one ends: whole chunks.
    expert = evaluate.bridge_command(parse('--policy', 'expert'), Run(0, 0, 0, 1),
                                     tmp_path / 'r.jsonl', None)
    assert 'observation_interval:=0' in expert
    for argv in (['--temporal-ensemble', '--realtime'], ['--temporal-ensemble', '--execute', '0'],
                 ['--temporal-ensemble', '--policy', 'expert']):
        with pytest.raises(ValueError, match='--temporal-ensemble needs lockstep'):
            evaluate.check_args(parse(*argv))
    with pytest.raises(ValueError, match='--execute must be >= 0'):
        evaluate.check_args(parse('--execute', '-1'))


def test_sigterm_stops_the_evaluation_and_its_policy_process(tmp_path):
    pid_file = tmp_path / 'policy.pid'
    sleeper = (f'{sys.executable} -c "import os, time; '
               f"open('{pid_file}', 'w').write(str(os.getpid())); time.sleep(600)\"")
    evaluation = subprocess.Popen(
        [str(Path(sys.executable).parent / 'rsd'), 'eval-libero', '--tasks', '0',
         '--out', str(tmp_path / 'out'), '--policy-command', sleeper],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60.0
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    policy = int(pid_file.read_text())
    evaluation.terminate()
    _, stderr = evaluation.communicate(timeout=60)
    assert evaluation.returncode == 130, stderr[-2000:]
    assert 'interrupted; stopping the processes' in stderr
    assert not Path(f'/proc/{policy}').exists(), 'the policy process was left running'
    assert json.loads((tmp_path / 'out' / 'summary.json').read_text())['complete'] is False
