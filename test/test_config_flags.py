"""Flags generated from a config dataclass parse back into the same dataclass."""

import argparse
from dataclasses import dataclass, field

import pytest

from rsd_core.config_flags import add_dataclass_arguments, args_to_config


@dataclass
class Example:
    demos: list[str] = field(metadata={'help': 'demo files', 'metavar': 'PATH'})
    steps: int = field(default=10, metadata={'help': 'optimiser steps'})
    lr: float = 3e-4
    warmup: int | None = None
    augment: bool = True
    mode: str = field(default='a', metadata={'choices': ('a', 'b')})


def parse(argv: list[str]) -> Example:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Example)
    return args_to_config(parser.parse_args(argv), Example)


def test_flags_round_trip_with_types_and_defaults():
    assert parse(['--demos', 'a.hdf5']) == Example(demos=['a.hdf5'])
    config = parse(['--demos', 'a', 'b', '--steps', '5', '--lr', '0.1', '--warmup', '3',
                    '--no-augment', '--mode', 'b'])
    assert config == Example(['a', 'b'], 5, 0.1, 3, False, 'b')


def test_required_fields_and_choices_are_enforced(capsys):
    with pytest.raises(SystemExit):
        parse([])
    assert '--demos' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(['--demos', 'a', '--mode', 'c'])


def test_help_carries_the_default():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Example)
    assert 'optimiser steps (default 10)' in parser.format_help()
