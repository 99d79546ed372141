"""Fast DDS shared-memory files in /dev/shm: which ones a process holds, and which of them
outlive it (the shutdown tests of test/test_policy_node.py).

Fast DDS names them fastdds_* / fastrtps_* (segments, ports, their `_el` lock files),
sem.fastdds_* (port mutexes) and fast_datasharing* (data sharing). A port file stays while any
process that writes to that port maps it, so a file counts as left behind only when no live
process maps it or holds it open: other processes on the machine (and the test process, a peer)
may own files of their own, which are never looked at.
"""

import os
from pathlib import Path

SHM = Path('/dev/shm')
PREFIXES = ('fastdds_', 'fastrtps_', 'fast_datasharing', 'sem.fastdds_', 'sem.fastrtps_')


def held_files(pid: int | str) -> set[str]:
    """Names of the Fast DDS files in /dev/shm that process `pid` maps or holds open (empty
    once it has ended or when it may not be read)."""
    names = set()
    try:
        with open(f'/proc/{pid}/maps') as maps:
            names |= {line.split(f'{SHM}/', 1)[1].split()[0] for line in maps
                      if f' {SHM}/' in line}
        fds = list(Path(f'/proc/{pid}/fd').iterdir())
    except OSError:
        fds = []
    for fd in fds:
        try:
            target = Path(os.readlink(fd))
        except OSError:                     # closed since the listing
            continue
        if target.parent == SHM:
            names.add(target.name)
    return {name for name in names if name.startswith(PREFIXES)}


def left_behind(names: set[str]) -> list[str]:
    """Those of `names` still in /dev/shm that no live process maps or holds open."""
    present = {name for name in names if (SHM / name).exists()}
    if not present:
        return []
    held = set().union(*(held_files(pid) for pid in os.listdir('/proc') if pid.isdigit()))
    return sorted(present - held)
