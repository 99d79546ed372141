"""The parameters of the `rsd_policy` node: declarations, checks, and one immutable snapshot.

Each parameter is declared with a descriptor (type, description, read-only flag, ranges) in
`PARAMETERS`; `parameter_problem` says why a value cannot be used (the node's on-set callback
refuses it with that reason), `read_settings` turns the values in force into a `Settings`
snapshot the inference worker reads once per batch of frames, and `engine_config` the part of it
the engine takes. Pure functions and data: unit-tested without a node.

The run-time rule (any peer on the DDS domain can call the parameter services): whatever
changes what the arm is commanded (action limits and names, control period, staleness bound,
frame id, the arms served and the batching window) is read-only; the decoding mode and its
tolerance can only be tightened at run time, never past the ceilings set at start
(`acceptance_ceiling`, `tolerance_ceiling`, read-only, defaulting to the start values);
strings that go out in messages are bounded; the diagnostics rate has a floor. To change a
read-only value, restart the node (or cleanup and configure it again through its lifecycle
with new parameters).
"""

from dataclasses import dataclass
import math
import re

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.parameter import Parameter

from rsd_core.acceptance import MODES
from rsd_core.main_model import DTYPES
from rsd_ros.excerpt import excerpt
from rsd_ros.topics import LIBERO_ACTION_NAMES

ACTION_DIM = len(LIBERO_ACTION_NAMES)
DEVICE_PATTERN = re.compile(r'cpu|cuda(:\d+)?')
ARM_PATTERN = re.compile(r'[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*')   # relative ns
MAX_ARMS = 32                    # arms one node serves (the largest batch it decodes)
RUNTIME_ENGINE_PARAMETERS = ('use_draft', 'adaptive_proposals', 'acceptance', 'tolerance')

@dataclass(frozen=True)
class Settings:
    """The run-time parameters, one immutable snapshot (the worker reads one per batch)."""

    use_draft: bool
    adaptive_proposals: bool
    acceptance: str
    tolerance: tuple[float, ...]          # action units, one per dim or one for all
    control_period: float                 # s
    action_names: tuple[str, ...]
    frame_id: str
    max_image_age: float                  # s, 0 = no limit
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    diagnostics_period: float             # s
    hardware_id: str
    stats_window: int                     # chunks
    state_joint_names: tuple[str, ...]    # the robot's names of the model's state, () = own
    max_instruction_bytes: int            # UTF-8 bytes
    max_clock_skew: float                 # s an image stamp may lie in the future
    max_state_abs: float                  # rad or m, the largest |robot-state value|
    arms: tuple[str, ...]                 # arm namespaces, () = one arm on the node's topics
    batch_window: float                   # s the worker waits for the other arms' frames


def _descriptor(kind: int, description: str, read_only: bool = False,
                constraints: str = '', floats: tuple[float, float] | None = None,
                ints: tuple[int, int] | None = None) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(type=kind, description=description, read_only=read_only,
                                     additional_constraints=constraints)
    if floats:
        descriptor.floating_point_range = [FloatingPointRange(from_value=floats[0],
                                                              to_value=floats[1])]
    if ints:
        descriptor.integer_range = [IntegerRange(from_value=ints[0], to_value=ints[1], step=1)]
    return descriptor


P = ParameterType
MAX_STRING = 128                 # characters of a string that goes out in every message
# Decoding modes from the strictest: exact (main-only actions), bounded (certified within the
# tolerance of main-only), tolerance (each draft layer within the tolerance of the main's).
STRICTNESS = {'exact': 0, 'bounded': 1, 'tolerance': 2}
RUNTIME = ('use_draft', 'adaptive_proposals', 'acceptance', 'tolerance', 'diagnostics_period',
           'stats_window')       # every other parameter is read-only
PARAMETERS = {
    'model_dir': ('', _descriptor(
        P.PARAMETER_STRING, 'main model bundle directory', read_only=True,
        constraints="'' = the built-in default bundle ($RSD_MODEL_DIR, the installed share "
                    'directory, or <repo>/models/default)')),
    'draft_dir': ('default', _descriptor(
        P.PARAMETER_STRING, 'draft model directory', read_only=True,
        constraints="'default' = the bundle's draft/ if present, '' = no draft")),
    'autostart': (True, _descriptor(
        P.PARAMETER_BOOL, 'configure and activate on start (false: wait for the lifecycle '
        'transitions, as a managed node)', read_only=True)),
    'state_joint_names': (Parameter.Type.STRING_ARRAY, _descriptor(
        P.PARAMETER_STRING_ARRAY, "the robot's joint_states names of the model's state values, "
        "in the model's order (unset = the model's own names)", read_only=True,
        constraints="as many names as the model's state (heads.json proprio_names)")),
    'device': ('cpu', _descriptor(P.PARAMETER_STRING, 'torch device', read_only=True,
                                  constraints="'cpu', 'cuda' or 'cuda:N'")),
    'dtype': ('float32', _descriptor(P.PARAMETER_STRING, 'model dtype', read_only=True,
                                     constraints='one of ' + ', '.join(DTYPES))),
    'use_draft': (True, _descriptor(
        P.PARAMETER_BOOL, 'let the draft propose layers (K chosen per chunk from measured '
        'acceptance and costs; false = never)', constraints='true needs a loaded draft')),
    'adaptive_proposals': (True, _descriptor(
        P.PARAMETER_BOOL, 'choose the number of draft proposals per chunk (0..K) from measured '
        'acceptance and costs; false = always K')),
    'acceptance': ('exact', _descriptor(
        P.PARAMETER_STRING, 'decoding mode: exact (= main-only actions), tolerance (draft '
        "layers within tolerance of the main's), bounded (certified depth: within tolerance "
        'of main-only in every action value)',
        constraints='one of ' + ', '.join(MODES) + '; at run time no looser than '
                    'acceptance_ceiling')),
    'acceptance_ceiling': ('', _descriptor(
        P.PARAMETER_STRING, 'loosest decoding mode a run-time change may set (exact < bounded '
        "< tolerance); '' = the start acceptance", read_only=True)),
    'tolerance': ([0.02], _descriptor(
        P.PARAMETER_DOUBLE_ARRAY, 'bound on the change of any action value in tolerance and '
        'bounded modes, action units', constraints=f'1 value (all dims) or {ACTION_DIM}, '
        'finite, >= 0; at run time no larger than tolerance_ceiling')),
    'tolerance_ceiling': (Parameter.Type.DOUBLE_ARRAY, _descriptor(
        P.PARAMETER_DOUBLE_ARRAY, 'largest tolerance a run-time change may set, action units '
        '(1 value or one per dim); unset = the start tolerance', read_only=True)),
    'control_period': (0.05, _descriptor(P.PARAMETER_DOUBLE, 'duration of one chunk step, s',
                                         read_only=True, floats=(0.001, 10.0))),
    'action_names': (list(LIBERO_ACTION_NAMES), _descriptor(
        P.PARAMETER_STRING_ARRAY, 'action dimension names (JointTrajectory.joint_names)',
        read_only=True, constraints=f'{ACTION_DIM} non-empty distinct names')),
    'frame_id': ('base_link', _descriptor(P.PARAMETER_STRING, 'header.frame_id of action_chunk',
                                          read_only=True,
                                          constraints=f'at most {MAX_STRING} characters')),
    'max_image_age': (0.5, _descriptor(
        P.PARAMETER_DOUBLE, 'images older than this (now - header.stamp, s) are not acted on',
        read_only=True, constraints='0 = no limit', floats=(0.0, 3600.0))),
    'action_low': ([-1.0] * ACTION_DIM, _descriptor(
        P.PARAMETER_DOUBLE_ARRAY, 'lower action limits, action units (clipped to)',
        read_only=True, constraints=f'{ACTION_DIM} finite values, <= action_high')),
    'action_high': ([1.0] * ACTION_DIM, _descriptor(
        P.PARAMETER_DOUBLE_ARRAY, 'upper action limits, action units (clipped to)',
        read_only=True, constraints=f'{ACTION_DIM} finite values, >= action_low')),
    'diagnostics_period': (1.0, _descriptor(P.PARAMETER_DOUBLE, '/diagnostics period, s',
                                            floats=(0.1, 60.0))),
    'hardware_id': ('', _descriptor(P.PARAMETER_STRING, 'DiagnosticStatus.hardware_id',
                                    read_only=True, constraints=f"'' = the device; at most "
                                                                f'{MAX_STRING} characters')),
    'max_instruction_bytes': (2048, _descriptor(
        P.PARAMETER_INTEGER, 'longest instruction accepted, UTF-8 bytes (refused at the '
        "subscription; the model's prompt budget bounds its tokens as well)", read_only=True,
        ints=(1, 1_000_000))),
    'max_clock_skew': (0.5, _descriptor(
        P.PARAMETER_DOUBLE, 'images stamped more than this in the future (s) are not acted on',
        read_only=True, floats=(0.0, 60.0))),
    'max_state_abs': (10.0, _descriptor(
        P.PARAMETER_DOUBLE, 'robot-state values beyond +- this (rad or m) are refused before the '
        'model sees them', read_only=True, floats=(0.0, 1e6))),
    'stats_window': (100, _descriptor(P.PARAMETER_INTEGER,
                                      'chunks in the diagnostics latency/acceptance window',
                                      ints=(1, 100_000))),
    'arms': (Parameter.Type.STRING_ARRAY, _descriptor(
        P.PARAMETER_STRING_ARRAY, 'namespaces of the arms this node serves with one model, '
        'relative to its own: each arm has its own camera/image_raw, instruction, joint_states, '
        "action_chunk and policy_stats under '<arm>/' (unset = one arm on the node's own "
        'topics)', read_only=True,
        constraints=f'at most {MAX_ARMS} distinct relative names (letters, digits, _ and /), '
                    f'each at most {MAX_STRING} characters')),
    'batch_window': (0.015, _descriptor(
        P.PARAMETER_DOUBLE, 'several arms: once a first frame is ready, the longest the worker '
        "waits for the other arms' frames to decode them in one batch, s (a silent arm costs "
        'the others at most this)', read_only=True, floats=(0.0, 1.0))),
}


def parameter_problem(name: str, value, current: dict) -> str | None:
    """Why `value` is not acceptable for parameter `name` (None if it is).

    current: the values in force (or being set together) of the other parameters.
    """
    if name == 'device' and not DEVICE_PATTERN.fullmatch(value):
        return f"device {value!r}: expected 'cpu', 'cuda' or 'cuda:N'"
    if name == 'dtype' and value not in DTYPES:
        return f'dtype {value!r}: expected one of {", ".join(DTYPES)}'
    if name == 'acceptance' and value not in MODES:
        return f'acceptance {value!r}: expected one of {", ".join(MODES)}'
    if name == 'tolerance':
        if len(value) not in (1, ACTION_DIM):
            return f'tolerance has {len(value)} values; expected 1 (all dims) or {ACTION_DIM}'
        if not all(map(math.isfinite, value)) or min(value) < 0:
            return f'tolerance {list(value)}: expected finite values >= 0 (action units)'
    if name in ('frame_id', 'hardware_id', 'acceptance_ceiling') and len(value) > MAX_STRING:
        return f'{name} has {len(value)} characters; at most {MAX_STRING}'
    if name == 'acceptance_ceiling' and value and value not in MODES:
        return f'acceptance_ceiling {value!r}: expected one of {", ".join(MODES)} or empty'
    if name == 'tolerance_ceiling' and value is not None and (
            len(value) not in (1, ACTION_DIM) or not all(map(math.isfinite, value))
            or min(value) < 0):
        return f'tolerance_ceiling {list(value)}: expected 1 or {ACTION_DIM} finite values >= 0'
    if name == 'state_joint_names' and value is not None and (
            not all(n.strip() for n in value) or len(set(value)) != len(value)):
        return f'state_joint_names {list(value)}: expected non-empty, distinct names'
    if name == 'arms' and value is not None:
        if len(value) > MAX_ARMS:
            return f'arms lists {len(value)} arms; at most {MAX_ARMS}'
        bad = [arm for arm in value if len(arm) > MAX_STRING or not ARM_PATTERN.fullmatch(arm)]
        if bad:
            return (f'arms {excerpt(bad)}: expected relative names of letters, digits, _ and / '
                    f'(at most {MAX_STRING} characters each)')
        if len(set(value)) != len(value):
            return f'arms {excerpt(list(value))}: an arm is listed twice'
    if name == 'action_names':
        if len(value) != ACTION_DIM:
            return f'action_names has {len(value)} names; expected {ACTION_DIM}'
        if not all(n.strip() for n in value) or len(set(value)) != len(value):
            return f'action_names {list(value)}: expected non-empty, distinct names'
    if name in ('action_low', 'action_high'):
        if len(value) != ACTION_DIM or not all(map(math.isfinite, value)):
            return f'{name} {list(value)}: expected {ACTION_DIM} finite values'
        low, high = (value, current.get('action_high', value)) if name == 'action_low' else (
            current.get('action_low', value), value)
        if len(low) == len(high) and any(lo > hi for lo, hi in zip(low, high, strict=True)):
            return f'action_low {list(low)} exceeds action_high {list(high)} in some dimension'
    return None


def instruction_problem(text: str, max_bytes: int = 2048) -> str | None:
    """Why an instruction cannot be used (None if it can): longer than `max_bytes` UTF-8
    bytes (checked first, before anything reads the text), empty, or not UTF-8."""
    size = len(text.encode('utf-8', 'surrogatepass'))
    if size > max_bytes:
        return (f'instruction of {size} bytes refused: at most {max_bytes} '
                f'(max_instruction_bytes): {excerpt(text, 40)}')
    if not text.strip():
        return f'empty instruction {excerpt(text)}; expected a task description'
    if '\ufffd' in text:
        return ('instruction is not valid UTF-8 (decoded with replacement characters): '
                f'{excerpt(text)}')
    return None


@dataclass(frozen=True)
class Ceilings:
    """The loosest decoding a run-time change may ask for (set at start, read-only)."""

    acceptance: str
    tolerance: tuple[float, ...]          # action units, one per dim or one for all


def ceilings(values: dict) -> Ceilings:
    """The ceilings of the start values (their own values when not set). ValueError when a
    start value is already beyond its ceiling."""
    result = Ceilings(values['acceptance_ceiling'] or values['acceptance'],
                      tuple(values['tolerance_ceiling'] or values['tolerance']))
    for name in ('acceptance', 'tolerance'):
        problem = widening(name, values[name], result)
        if problem:
            raise ValueError(f'start value: {problem}')
    return result


def widening(name: str, value, limits: Ceilings) -> str | None:
    """Why a run-time `value` of `name` would loosen the decoding past its ceiling (None if
    it does not)."""
    if name == 'acceptance' and value in STRICTNESS and \
            STRICTNESS[value] > STRICTNESS[limits.acceptance]:
        return (f'acceptance {value!r} is looser than the ceiling {limits.acceptance!r} set at '
                'start (acceptance_ceiling); restart the node to allow it')
    if name == 'tolerance':
        ceiling = limits.tolerance * (ACTION_DIM if len(limits.tolerance) == 1 else 1)
        asked = list(value) * (ACTION_DIM if len(value) == 1 else 1)
        if len(asked) == len(ceiling) and any(a > c for a, c in zip(asked, ceiling,
                                                                    strict=True)):
            return (f'tolerance {list(value)} exceeds the ceiling {list(limits.tolerance)} set '
                    'at start (tolerance_ceiling); restart the node to allow it')
    return None


def read_settings(values: dict) -> Settings:
    """The parameter values in force (name -> value) -> one Settings snapshot."""
    v = values
    return Settings(
        use_draft=v['use_draft'], adaptive_proposals=v['adaptive_proposals'],
        acceptance=v['acceptance'], tolerance=tuple(v['tolerance']),
        control_period=v['control_period'], action_names=tuple(v['action_names']),
        frame_id=v['frame_id'], max_image_age=v['max_image_age'],
        action_low=tuple(v['action_low']), action_high=tuple(v['action_high']),
        diagnostics_period=v['diagnostics_period'],
        hardware_id=v['hardware_id'] or v['device'], stats_window=v['stats_window'],
        state_joint_names=tuple(v['state_joint_names'] or ()),
        max_instruction_bytes=v['max_instruction_bytes'], max_clock_skew=v['max_clock_skew'],
        max_state_abs=v['max_state_abs'], arms=tuple(v['arms'] or ()),
        batch_window=v['batch_window'])


def state_names(settings: Settings, model_names: tuple[str, ...]) -> tuple[str, ...]:
    """The joint_states names to read the model's state values from: `state_joint_names`
    mapped one to one onto the model's names, or the model's own. ValueError listing what the
    model needs when the mapping has the wrong length."""
    mapped = settings.state_joint_names
    if not mapped:
        return model_names
    if len(mapped) != len(model_names):
        raise ValueError(f'state_joint_names has {len(mapped)} names {list(mapped)}; the model '
                         f'takes {len(model_names)} state values, in this order: '
                         f'{list(model_names)}')
    return mapped


def engine_config(settings: Settings) -> dict:
    """The EngineConfig fields a Settings snapshot sets."""
    tolerance = settings.tolerance
    return {'use_draft': settings.use_draft, 'adaptive': settings.adaptive_proposals,
            'acceptance': settings.acceptance,
            'tolerance': tolerance[0] if len(tolerance) == 1 else tolerance}
