"""The expert's phase machine: `SpatialExpert.act` turns observed state into action chunks.

Phases: settle -> approach (above the grasp point, hand yawed) -> descend -> grasp (close) ->
lift -> carry (bowl above the plate) -> lower -> release (open) -> retreat -> done, with
recover (open, back off, settle, re-plan) when the descent does not converge or the bowl slips
out of the hand. Decisions that need the real state (settled, grasp reached, bowl slipped,
bowl over the plate) are taken once per chunk on the observation (`_observe`); the step-wise
targets inside a chunk are taken on the predicted hand (`_command`, `HandModel`). World frame,
metres, radians, control steps.
"""

from dataclasses import dataclass, field
import enum
import logging

import numpy as np

from sim_bridge.expert.config import GRIPPER_CLOSED, GRIPPER_OPEN, ExpertConfig
from sim_bridge.expert.control import HandModel, learn_drift, servo
from sim_bridge.expert.goal import Goal
from sim_bridge.expert.grasp import Grasp, plan_grasp
from sim_bridge.expert.rotations import hand_yaw, quat_to_matrix, wrap_angle
from sim_bridge.expert.scene import SceneState

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Phases of the expert: SETTLE through RETREAT in pick-and-place order, RECOVER
    (back off after a failed descent or a slipped bowl, then retry), DONE."""

    SETTLE = 'settle'
    APPROACH = 'approach'
    DESCEND = 'descend'
    GRASP = 'grasp'
    LIFT = 'lift'
    CARRY = 'carry'
    LOWER = 'lower'
    RELEASE = 'release'
    RETREAT = 'retreat'
    RECOVER = 'recover'
    DONE = 'done'


@dataclass
class _Plan:
    """Targets fixed when a phase starts (world frame)."""
    grasp: Grasp | None = None
    grasp_site: np.ndarray | None = None
    grasp_yaw: float = 0.0
    hold: np.ndarray | None = None
    carry_target: np.ndarray | None = None     # grip site with the bowl above the plate
    lift_xy: np.ndarray | None = None          # where the hand lifts the bowl
    lower_z: float = 0.0
    pick_z: float = 0.0                        # bowl origin height when the grasp was planned
    settle_ref: dict[str, np.ndarray] = field(default_factory=dict)


class SpatialExpert:
    """Phase machine for "pick up the black bowl ... and place it on the plate".

    `act(state)` -> actions [T, 7] (float32, clipped to [-1, 1]); call it once per chunk with
    the state observed after the previous chunk was executed.
    """

    def __init__(self, goal: Goal, config: ExpertConfig | None = None) -> None:
        self.goal = goal
        self.config = config or ExpertConfig()
        self.reset()

    def reset(self) -> None:
        """Start a new episode (same goal)."""
        self.phase = Phase.SETTLE
        self.phase_steps = 0
        self.steps = 0
        self.attempts = 0
        self.plan = _Plan()
        self.history: list[tuple[int, str]] = []   # (step, phase) at each phase change
        self._velocity = np.zeros(3)               # predicted hand velocity at chunk end
        self._spin = np.zeros(3)
        self._drift = np.zeros(3)                  # learnt model bias, m/step
        self._predicted: np.ndarray | None = None  # predicted hand position at chunk end
        self._enter(Phase.SETTLE)

    @property
    def done(self) -> bool:
        """True in phase DONE: the bowl released and the hand retreated, or the attempts
        used up."""
        return self.phase == Phase.DONE

    # ------------------------------------------------------------ public step

    def act(self, state: SceneState) -> np.ndarray:
        """Next chunk of actions [T, 7] for the observed `state`."""
        for name in (self.goal.obj, self.goal.target):
            if name not in state.poses:
                raise ValueError(f'privileged state has no pose for {name!r}; it has '
                                 f'{sorted(state.poses)}')
        self._drift = learn_drift(self._drift, self._predicted, state.eef_pos, self.config)
        self._observe(state)
        model = HandModel(position=state.eef_pos.copy(), rotation=quat_to_matrix(state.eef_quat),
                          velocity=self._velocity, spin=self._spin, drift=self._drift)
        rows = []
        for _ in range(self.config.chunk_len):
            target, yaw, gripper = self._command(model)
            speed = self.config.fine_speed if self._near(target, model) else 1.0
            action = servo(model, target, yaw, gripper, speed, self.config)
            model.advance(action, self.config)
            rows.append(action)
            self.phase_steps += 1
            self.steps += 1
        self._velocity, self._spin = model.velocity, model.spin
        self._predicted = model.position
        return np.clip(np.stack(rows), -1.0, 1.0).astype(np.float32)  # [T, 7]

    def disturbed(self) -> None:
        """The last chunk was executed with an offset this expert did not plan (DART
        demonstrations): the next `act` does not fold that miss into its drift, which models
        the hand's own bias. The hand velocity and spin carried into the next chunk's model
        stay the planned ones (the offset's share of them decays within a few steps)."""
        self._predicted = None

    # ------------------------------------------------------------ phase bookkeeping

    def _enter(self, phase: Phase) -> None:
        """Start `phase` (its step count from 0) and record it in `history`."""
        if phase != self.phase or not self.history:
            logger.debug('step %d: %s -> %s', self.steps, self.phase.value, phase.value)
        self.phase = phase
        self.phase_steps = 0
        self.history.append((self.steps, phase.value))

    def _bowl(self, state: SceneState) -> tuple[np.ndarray, np.ndarray]:
        """The goal object's position [3] and rotation [3, 3]."""
        return state.position(self.goal.obj), state.rotation(self.goal.obj)

    # ------------------------------------------------------------ decisions on observed state

    def _observe(self, state: SceneState) -> None:
        """Phase changes that need the real state; refresh closed-loop targets."""
        cfg = self.config
        bowl, bowl_rot = self._bowl(state)
        plate = state.position(self.goal.target)
        eef = state.eef_pos
        if self.phase == Phase.DONE and not self._placed(bowl, plate):
            if self.attempts + 1 < cfg.max_attempts:
                logger.debug('step %d: bowl not on the plate after release; trying again',
                             self.steps)
                self.attempts += 1
                self.plan = _Plan(hold=eef.copy())
                self._enter(Phase.SETTLE)
        if self.phase == Phase.SETTLE:
            positions = {n: state.position(n) for n in state.poses if not n.endswith('_region')}
            moved = max((np.linalg.norm(positions[n] - p) for n, p in
                         self.plan.settle_ref.items() if n in positions), default=np.inf)
            self.plan.settle_ref = positions
            if self.plan.hold is None:
                self.plan.hold = eef.copy()
            at_rest = moved < cfg.settle_tolerance and self.phase_steps >= cfg.settle_min_steps
            if at_rest or self.phase_steps >= cfg.settle_max_steps:
                self._plan_grasp(state)
                self._enter(Phase.APPROACH)
        if self.phase in (Phase.APPROACH, Phase.DESCEND):
            site, yaw = self.plan.grasp.site(bowl, bowl_rot, cfg.wall_radius)
            if np.linalg.norm(site - self.plan.grasp_site) > 0.03:
                logger.debug('bowl moved %.3f m before the grasp; re-planning',
                             np.linalg.norm(site - self.plan.grasp_site))
                self._plan_grasp(state)
            else:
                self.plan.grasp_site, self.plan.grasp_yaw = site, yaw
            if self.phase == Phase.DESCEND:
                error = self.plan.grasp_site - eef
                logger.debug('step %d: descend error %s', self.steps, np.round(error, 4))
                # Close when on target; after a long descent accept twice the error.
                scale = 2.0 if self.phase_steps >= cfg.descend_patience else 1.0
                if (np.linalg.norm(error[:2]) < scale * cfg.grasp_tolerance
                        and abs(error[2]) < scale * cfg.grasp_z_tolerance):
                    self.plan.hold = self.plan.grasp_site.copy()
                    self._enter(Phase.GRASP)
                elif self.phase_steps >= 2 * cfg.descend_patience:
                    logger.debug('step %d: descent does not converge; backing off', self.steps)
                    self.plan.hold = eef + np.array([0.0, 0.0, 0.06])
                    self._enter(Phase.RECOVER)
        if self.phase in (Phase.LIFT, Phase.CARRY, Phase.LOWER) and (
                np.linalg.norm(eef - bowl) > cfg.lost_distance):
            logger.debug('step %d: bowl slipped (%.3f m from the hand)', self.steps,
                         np.linalg.norm(eef - bowl))
            self.plan.hold = eef + np.array([0.0, 0.0, 0.06])
            self._enter(Phase.RECOVER)
            return
        if self.phase in (Phase.GRASP, Phase.LIFT, Phase.CARRY, Phase.LOWER):
            # Where the hand must be for the bowl to hang above the plate, assuming it moves
            # with the hand.
            to_plate = plate[:2] - bowl[:2]
            carry_z = eef[2] + self._carry_bowl_z(plate) - bowl[2]
            self.plan.carry_target = np.array([eef[0] + to_plate[0], eef[1] + to_plate[1],
                                               carry_z])
            self.plan.lower_z = eef[2] + plate[2] + cfg.place_height - bowl[2]
            low = bowl[2] < plate[2] + cfg.place_height + 0.01
            # The arm may not reach lower near the edge of its workspace: after a while,
            # drop the bowl from where it is if it is over the plate.
            stalled = self.phase_steps >= cfg.lower_patience
            if self.phase == Phase.LOWER and (
                    (low and np.linalg.norm(to_plate) < 0.015)
                    or (stalled and np.linalg.norm(to_plate) < cfg.placed_tolerance)):
                self.plan.hold = eef.copy()
                self._enter(Phase.RELEASE)

    def _placed(self, bowl: np.ndarray, plate: np.ndarray) -> bool:
        """The bowl rests on the plate, near its centre (LIBERO's On: < 3 cm and contact)."""
        return (np.linalg.norm(bowl[:2] - plate[:2]) < self.config.placed_tolerance
                and bowl[2] < plate[2] + self.config.place_height)

    def _carry_bowl_z(self, plate: np.ndarray) -> float:
        """Height (m) of the bowl origin while carried: above the plate [3] and the pick."""
        return max(plate[2] + self.config.carry_clearance, self.plan.pick_z
                   + self.config.lift_clearance)

    def _plan_grasp(self, state: SceneState) -> None:
        """Choose the grasp for the bowl as it is now; fix its site, yaw and pick height."""
        grasp = plan_grasp(state, self.goal, self.config)
        bowl, bowl_rot = self._bowl(state)
        self.plan.grasp = grasp
        self.plan.grasp_site, self.plan.grasp_yaw = grasp.site(bowl, bowl_rot,
                                                               self.config.wall_radius)
        self.plan.pick_z = float(bowl[2])
        logger.debug('grasp %s -> site %s yaw %.2f', grasp, np.round(self.plan.grasp_site, 3),
                     self.plan.grasp_yaw)

    # ------------------------------------------------------------ targets on the predicted hand

    def _command(self, model: HandModel) -> tuple[np.ndarray, float | None, float]:
        """(target grip-site position [3], target yaw or None to keep it, gripper) for the
        next step."""
        cfg = self.config
        plan = self.plan
        phase = self.phase
        if phase == Phase.APPROACH:
            target = plan.grasp_site + np.array([0.0, 0.0, cfg.approach_height])
            error = target - model.position
            yaw_error = abs(wrap_angle(plan.grasp_yaw - hand_yaw(model.rotation)))
            if np.linalg.norm(error[:2]) < 0.01 and abs(error[2]) < 0.015 and yaw_error < 0.1:
                self._enter(Phase.DESCEND)
                return self._command(model)
            return target, plan.grasp_yaw, GRIPPER_OPEN
        if phase == Phase.DESCEND:
            # A funnel: the further off in xy, the higher the hand stays over the grasp.
            target = plan.grasp_site.copy()
            xy_error = np.linalg.norm(target[:2] - model.position[:2])
            target[2] += min(4.0 * max(0.0, xy_error - 0.004), cfg.approach_height)
            return target, plan.grasp_yaw, GRIPPER_OPEN
        if phase == Phase.GRASP:
            if self.phase_steps >= cfg.close_steps:
                self._enter(Phase.LIFT)
                plan.lift_xy = model.position[:2].copy()
                return self._command(model)
            return plan.hold, plan.grasp_yaw, GRIPPER_CLOSED
        if phase == Phase.LIFT:
            if abs(plan.carry_target[2] - model.position[2]) < 0.02:
                self._enter(Phase.CARRY)
                return self._command(model)
            return np.append(plan.lift_xy, plan.carry_target[2]), None, GRIPPER_CLOSED
        if phase == Phase.CARRY:
            if np.linalg.norm(plan.carry_target[:2] - model.position[:2]) < 0.015:
                self._enter(Phase.LOWER)
                return self._command(model)
            return plan.carry_target, None, GRIPPER_CLOSED
        if phase == Phase.LOWER:
            # Funnel again: a bowl lowered off-centre catches the plate's rim and drags.
            xy_error = np.linalg.norm(plan.carry_target[:2] - model.position[:2])
            lower_z = plan.lower_z + min(4.0 * max(0.0, xy_error - 0.006), cfg.fine_height)
            target = np.array([plan.carry_target[0], plan.carry_target[1], lower_z])
            return target, None, GRIPPER_CLOSED
        if phase == Phase.RELEASE:
            if self.phase_steps >= cfg.open_steps:
                self._enter(Phase.RETREAT)
                plan.hold = plan.hold + np.array([0.0, 0.0, cfg.retreat_height])
                return self._command(model)
            return plan.hold, None, GRIPPER_OPEN
        if phase == Phase.RETREAT:
            if abs(plan.hold[2] - model.position[2]) < 0.01:
                self._enter(Phase.DONE)
            return plan.hold, None, GRIPPER_OPEN
        if phase == Phase.RECOVER:
            if self.phase_steps >= cfg.recover_steps:
                self.attempts += 1
                plan.settle_ref = {}
                self._enter(Phase.SETTLE if self.attempts < cfg.max_attempts else Phase.DONE)
            return plan.hold, None, GRIPPER_OPEN
        # SETTLE, DONE: keep still with the hand open.
        hold = plan.hold if plan.hold is not None else model.position
        return hold, None, GRIPPER_OPEN

    def _near(self, target: np.ndarray, model: HandModel) -> bool:
        """Close above the grasp or the plate: move slowly (precise, little coupling)."""
        return (self.phase in (Phase.DESCEND, Phase.LOWER)
                and model.position[2] - target[2] < self.config.fine_height)
