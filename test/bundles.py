"""Test bundles: the tiny main bundle the fixtures of conftest.py build once per session."""

from pathlib import Path

from rsd_core.bundle_build import build_main_bundle
from rsd_core.training.tokenizer_fit import fit_tokenizer, synthetic_chunks


def make_test_bundle(directory: str | Path, seed: int = 0,
                     proprio_names: tuple[str, ...] = ()) -> Path:
    """A complete tiny bundle for tests (no draft): 'tiny' preset, action tokenizer fitted for a
    few steps on synthetic chunks, robot-state inputs `proprio_names` (none by default). Builds
    in a few seconds; returns the bundle directory."""
    # fit_tokenizer trains on one thread (two spin-wait on a busy machine: 10x slower).
    tokenizer, _ = fit_tokenizer(synthetic_chunks(256, seed=seed), steps=40, seed=seed,
                                 progress=False, source='synthetic: 256 chunks (test bundle)')
    return build_main_bundle(directory, 'tiny', tokenizer, seed=seed,
                             provenance={'purpose': 'tests', 'action_tokenizer': 'synthetic'},
                             proprio_names=proprio_names)
