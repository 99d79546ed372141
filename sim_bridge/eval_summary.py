"""The arithmetic of `rsd eval-libero`: episode records -> per-task rows, an overall row and a
markdown report. Pure functions of the records (the bridges' JSON lines), tested alone."""

import numpy as np


def _stat_sum(records: list[dict], key: str) -> float | None:
    values = [r['policy_stats']['sums'][key] for r in records
              if r.get('policy_stats') and key in r['policy_stats']['sums']]
    return sum(values) if values else None


def _mean_batch(records: list[dict]) -> float | None:
    """Frames decoded together per chunk, over the chunks whose policy_stats say (`batch`)."""
    total = _stat_sum(records, 'batch')
    chunks = sum(r['policy_stats']['chunks'] for r in records
                 if r.get('policy_stats') and 'batch' in r['policy_stats']['sums'])
    return total / chunks if total is not None and chunks else None


def dropped_increments(records: list[dict]) -> list[float | None]:
    """Per record, in order: the frames the policy dropped for the record's arm since that
    arm's previous record (None when the record has no `dropped` counter). The counter is the
    policy's cumulative count in the arm's policy_stats, so it is differenced per arm."""
    last: dict = {}
    increments: list[float | None] = []
    for record in records:
        stats = record.get('policy_stats')
        value = stats['last'].get('dropped') if stats else None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            increments.append(None)
            continue
        arm = record.get('arm')
        increments.append(value - last.get(arm, 0.0))
        last[arm] = value
    return increments


def summarize_records(records: list[dict]) -> dict:
    """Aggregate episode records: success, steps, latency, acceptance, batch size, bridge
    counters."""
    latencies = [v for r in records for v in r.get('latencies_ms', [])]
    proposed = _stat_sum(records, 'layers_proposed')
    accepted = _stat_sum(records, 'layers_accepted')
    successes = sum(bool(r['success']) for r in records)
    p50, p90 = np.percentile(latencies, [50, 90]) if latencies else (None, None)
    return {
        'episodes': len(records), 'successes': successes,
        'success_rate': successes / len(records) if records else None,
        'mean_steps': float(np.mean([r['steps'] for r in records])) if records else None,
        'latency_p50_ms': None if p50 is None else float(p50),
        'latency_p90_ms': None if p90 is None else float(p90),
        'chunks': len(latencies),
        'acceptance_rate': accepted / proposed if proposed else None,
        'mean_batch': _mean_batch(records),
        'held_steps': sum(r['held_steps'] for r in records),
        'skipped_steps': sum(r['skipped_steps'] for r in records),
        'rejected_chunks': sum(r['rejected_chunks'] for r in records),
        'wall_time_s': sum(r['wall_time_s'] for r in records),
    }


def summarize(records: list[dict], tasks: list[int], config: dict) -> dict:
    """Per-task rows (in `tasks` order) and an overall row.

    Dropped frames come from the policy's cumulative `dropped` counter of each arm
    (`dropped_increments`), summed over a task's episodes.
    """
    increments = dropped_increments(records)
    rows = []
    for task_id in tasks:
        mine = [r for r in records if r['task_id'] == task_id]
        row = {'task_id': task_id, 'task': mine[0]['task'] if mine else None,
               **summarize_records(mine)}
        dropped = [d for r, d in zip(records, increments, strict=True)
                   if r['task_id'] == task_id and d is not None]
        row['dropped_frames'] = sum(dropped) if dropped else None
        rows.append(row)
    overall = summarize_records(records)
    dropped = [row['dropped_frames'] for row in rows if row['dropped_frames'] is not None]
    overall['dropped_frames'] = sum(dropped) if dropped else None
    return {'config': config, 'tasks': rows, 'overall': overall}


def _cell(value, fmt: str = '{:.1f}') -> str:
    return '-' if value is None else fmt.format(value)


def markdown_table(summary: dict) -> str:
    """The summary as a markdown report: settings, then one row per task."""
    config = summary['config']
    lines = [
        f"# LIBERO evaluation: {config['suite']}, policy {config['policy']}, {config['mode']}",
        '',
        ', '.join(f'{k}: {v}' for k, v in config.items() if k not in ('suite', 'policy')),
        '',
        '| task | episodes | success | mean steps | latency p50 (ms) | latency p90 (ms) '
        '| acceptance | held | skipped | rejected | dropped frames |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for row in [*summary['tasks'], {'task_id': 'all', **summary['overall']}]:
        rate = row['success_rate']
        success = '-' if rate is None else f"{row['successes']}/{row['episodes']} ({rate:.0%})"
        lines.append(
            f"| {row['task_id']} | {row['episodes']} | {success} | {_cell(row['mean_steps'])} "
            f"| {_cell(row['latency_p50_ms'])} | {_cell(row['latency_p90_ms'])} "
            f"| {_cell(row['acceptance_rate'], '{:.1%}')} | {row['held_steps']} "
            f"| {row['skipped_steps']} | {row['rejected_chunks']} "
            f"| {_cell(row['dropped_frames'], '{:.0f}')} |")
    names = [f"{row['task_id']}: {row['task']}" for row in summary['tasks'] if row['task']]
    if names:
        lines += ['', 'Tasks: ' + '; '.join(names)]
    if config.get('arms', 1) > 1:
        lines += ['', f"{config['arms']} arms against one policy; frames decoded together per "
                      f"chunk: {_cell(summary['overall']['mean_batch'], '{:.2f}')} on average"]
    recordings = summary.get('recordings')
    if recordings:
        lines += ['', f"Episode recordings: {len(recordings['files'])} MCAP files in "
                      f"{recordings['dir']} (ros2 bag info FILE, Foxglove, mcap info FILE)"]
    return '\n'.join(lines) + '\n'
