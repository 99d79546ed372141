"""What the expert moves where: the `(On obj target)` goal of a LIBERO task's BDDL file.

Every libero_spatial task is "pick up the black bowl <somewhere> and place it on the plate";
the BDDL goal, e.g. `(On akita_black_bowl_1 plate_1)`, names which bowl and which plate.
`parse_bddl_goal` and `normalize_instruction` are plain string functions; `resolve_goal` looks
the instruction up in LIBERO's benchmark (imported lazily).
"""

from dataclasses import dataclass
import re

from sim_bridge.expert.scene import cut


@dataclass(frozen=True)
class Goal:
    """What to move where: the BDDL goal `(On obj target)`."""
    obj: str      # e.g. 'akita_black_bowl_1'
    target: str   # e.g. 'plate_1'


_GOAL_ON = re.compile(r'\(\s*on\s+([\w.-]+)\s+([\w.-]+)\s*\)', re.IGNORECASE)


def parse_bddl_goal(bddl_text: str) -> Goal:
    """The `(On obj target)` predicate of a BDDL problem's `(:goal ...)` section."""
    start = bddl_text.lower().find('(:goal')
    if start < 0:
        raise ValueError('BDDL text has no (:goal ...) section')
    match = _GOAL_ON.search(bddl_text, start)
    if match is None:
        raise ValueError(f'BDDL goal has no (On obj target) predicate: '
                         f'{bddl_text[start:start + 200]!r}')
    return Goal(obj=match.group(1), target=match.group(2))


def normalize_instruction(text: str) -> str:
    """Lower case, underscores as spaces, no final period, single spaces."""
    return ' '.join(text.lower().replace('_', ' ').strip().rstrip('.').split())


def resolve_goal(instruction: str, suite: str = 'libero_spatial') -> Goal:
    """Goal of the LIBERO task whose language is `instruction`, from that task's BDDL file.

    Matches the task language (as LIBERO's benchmark and the bridge state it) or the BDDL's own
    `(:language ...)`, case- and whitespace-insensitively. Imports LIBERO (lazily).
    """
    from libero.libero import benchmark, get_libero_path
    import libero.libero.envs.bddl_utils as bddl_utils

    suites = benchmark.get_benchmark_dict()
    if suite not in suites:
        raise ValueError(f'unknown LIBERO suite {suite!r}; expected one of {sorted(suites)}')
    bench = suites[suite]()
    wanted = normalize_instruction(instruction)
    languages = []
    for task_id in range(bench.get_num_tasks()):
        task = bench.get_task(task_id)
        path = f"{get_libero_path('bddl_files')}/{task.problem_folder}/{task.bddl_file}"
        bddl_language = bddl_utils.get_problem_info(path)['language_instruction']
        languages.append(task.language)
        if wanted in (normalize_instruction(task.language), normalize_instruction(bddl_language)):
            with open(path) as bddl:
                return parse_bddl_goal(bddl.read())
    raise ValueError(f'no {suite} task has the instruction {cut(instruction)}; known: '
                     + '; '.join(languages))
