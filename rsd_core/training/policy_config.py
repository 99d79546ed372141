"""The settings of one `rsd train-policy` run (the CLI flags, `rsd_core.training.policy_cli`)."""

from dataclasses import dataclass, field

from rsd_core.bundle_build import PRESETS
from rsd_core.training.distill import DEFAULT_KIND, KINDS
from rsd_core.training.teacher_forcing import AUTOCAST_DTYPES


@dataclass
class TrainPolicyConfig:
    """Settings of one behaviour-cloning run; `rsd train-policy`'s flags are generated from
    these fields (rsd_core.config_flags)."""

    demos: list[str] = field(metadata={
        'help': 'LIBERO HDF5 demo files, or directories of them', 'metavar': 'PATH'})
    out: str = field(metadata={
        'help': 'output bundle directory (checkpoints in <out>/checkpoint)', 'metavar': 'DIR'})
    init: str | None = field(default=None, metadata={
        'help': 'existing bundle to fine-tune (e.g. a larger LLaVA-style backbone on a GPU) '
                'instead of a new preset model', 'metavar': 'DIR'})
    preset: str = 'default'             # size of a new model (the flag: see policy_cli)
    tokenizer: str | None = field(default=None, metadata={
        'help': 'action tokenizer directory (default: fit one on the demos)', 'metavar': 'DIR'})
    tokenizer_steps: int = field(default=2000, metadata={
        'help': 'training steps when fitting the action tokenizer here'})
    steps: int = field(default=5000, metadata={'help': 'optimiser steps'})
    stop_after: int | None = field(default=None, metadata={
        'help': 'end this session at STEP with a checkpoint, without writing the bundle '
                '(continue later with --resume)', 'metavar': 'STEP'})
    batch_size: int = field(default=16, metadata={'help': 'samples per micro-batch'})
    grad_accum: int = field(default=1, metadata={'help': 'micro-batches per optimiser step'})
    lr: float = field(default=3e-4, metadata={'help': 'peak learning rate'})
    weight_decay: float = field(default=0.01, metadata={'help': 'AdamW weight decay'})
    warmup_steps: int | None = field(default=None, metadata={
        'help': 'linear warm-up steps (default: 5 % of --steps)'})
    grad_clip: float = field(default=1.0, metadata={'help': 'gradient norm clip'})
    device: str = field(default='cpu', metadata={'help': "'cpu', 'cuda' or 'cuda:N'"})
    dtype: str = field(default='float32', metadata={
        'help': 'compute dtype (autocast); weights and optimizer stay float32',
        'choices': sorted(AUTOCAST_DTYPES)})
    seed: int = field(default=0, metadata={'help': 'seed of the model, data order and '
                                                   'augmentation'})
    resume: bool = field(default=False, metadata={
        'help': 'continue from the last checkpoint in <out>/checkpoint'})
    heldout_fraction: float = field(default=0.1, metadata={
        'help': "fraction of each task's episodes held out for evaluation"})
    augment: bool = field(default=True, metadata={
        'help': 'random resized crop and colour jitter on training images'})
    eval_every: int = field(default=500, metadata={'help': 'held-out evaluation interval, '
                                                           'steps'})
    eval_samples: int = field(default=256, metadata={'help': 'held-out samples per evaluation'})
    save_every: int = field(default=500, metadata={'help': 'checkpoint interval, steps'})
    cache_mb: float = field(default=1024.0, metadata={
        'help': 'memory for decoded frames (uint8 at the model image size), MB'})
    freeze_vision: bool = field(default=False, metadata={'help': 'do not train the vision '
                                                                 'tower'})
    proprio: bool = field(default=True, metadata={
        'help': 'condition on the robot state: obs/joint_states + obs/gripper_states (the '
                'JointState on joint_states at run time)'})
    gradient_checkpointing: bool = field(default=False, metadata={
        'help': 'recompute activations in the backward pass (less memory)'})
    distill_draft: bool = field(default=True, metadata={
        'help': 'distil the default draft into <out>/draft afterwards'})
    draft_kind: str = field(default=DEFAULT_KIND, metadata={
        'help': "the draft's architecture (see rsd train-draft --kind)", 'choices': KINDS})
    draft_observations: int = field(default=256, metadata={
        'help': 'demo frames used as draft observations'})
    draft_samples: int = field(default=1024, metadata={'help': 'draft distillation samples'})
    draft_epochs: int = field(default=40, metadata={'help': 'draft distillation epochs'})
    threads: int | None = field(default=1, metadata={
        'help': 'torch CPU threads (1 on a shared machine)'})
    progress: bool = True               # progress bars (the flag: --no-progress)

    def check(self) -> None:
        """Raise ValueError listing every out-of-range setting."""
        positive = {'steps': self.steps, 'batch_size': self.batch_size,
                    'grad_accum': self.grad_accum, 'eval_every': self.eval_every,
                    'save_every': self.save_every, 'eval_samples': self.eval_samples,
                    'draft_observations': self.draft_observations,
                    'draft_samples': self.draft_samples, 'draft_epochs': self.draft_epochs}
        bad = [f'{k} = {v}' for k, v in positive.items() if v < 1]
        if self.tokenizer_steps < 0 or self.lr <= 0 or self.weight_decay < 0 \
                or self.grad_clip <= 0 or self.cache_mb < 0:
            bad.append('tokenizer_steps >= 0, lr > 0, weight_decay >= 0, grad_clip > 0 and '
                       'cache_mb >= 0 are required')
        if not 0 <= self.heldout_fraction < 1:
            bad.append(f'heldout_fraction = {self.heldout_fraction} (expected 0 <= f < 1)')
        if self.stop_after is not None and self.stop_after < 1:
            bad.append(f'stop_after = {self.stop_after}')
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad.append(f'warmup_steps = {self.warmup_steps}')
        if self.threads is not None and self.threads < 1:
            bad.append(f'threads = {self.threads}')
        if self.dtype not in AUTOCAST_DTYPES:
            bad.append(f'dtype {self.dtype!r} (expected one of {sorted(AUTOCAST_DTYPES)})')
        if self.init is None and self.preset not in PRESETS:
            bad.append(f'preset {self.preset!r} (expected one of {sorted(PRESETS)})')
        if not self.demos:
            bad.append('no demo files given')
        if bad:
            raise ValueError('invalid training settings: ' + '; '.join(bad))
