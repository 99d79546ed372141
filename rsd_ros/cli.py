"""The `rsd` command line: one subcommand per job, each in the module that does the job.

The executables layer over the three packages (as image_pipeline keeps its console scripts
apart from the algorithm and the node): this table names modules of rsd_core and sim_bridge,
which is why it lives outside rsd_core (the core names nothing of the simulator or of ROS).
Each command module exposes `add_arguments(parser)` and `run(args) -> int`; flags of a command
with a config dataclass are generated from it (rsd_core.config_flags). Modules are imported only
when their command runs, so `rsd inspect` never pays for LIBERO or rclpy.
"""

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    'build-default': ('rsd_core.training.build_default',
                      'build the built-in default model bundle'),
    'inspect': ('rsd_core.inspect_checkpoint', 'inspect a bundle, draft or tokenizer checkpoint'),
    'bench': ('rsd_core.bench', 'every decoding mode on the same inputs, per-layer report'),
    'train-tokenizer': ('rsd_core.training.tokenizer_fit', 'train the RFSQ action tokenizer'),
    'refit-decoder': ('rsd_core.training.decoder_refit',
                      'refit the tokenizer decoder for a tight certified depth'),
    'train-draft': ('rsd_core.training.distill', 'distil the draft model from a main model'),
    'import-draft': ('rsd_core.training.import_draft',
                     'import an original draft checkpoint (weights_only) as safetensors'),
    'train-policy': ('rsd_core.training.policy_cli', 'behaviour-clone the main model on demos'),
    'record-observations': ('sim_bridge.record_observations',
                            'render LIBERO initial observations for draft distillation'),
    'collect-demos': ('sim_bridge.collect_demos', 'record scripted-expert LIBERO demos'),
    'eval-libero': ('sim_bridge.evaluate', 'evaluate a policy in LIBERO through ROS topics'),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level `rsd` parser: -v and one subcommand per COMMANDS entry (options parsed
    later by the command's own parser)."""
    parser = argparse.ArgumentParser(prog='rsd', description=__doc__.splitlines()[0])
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        command.set_defaults(module_name=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `rsd COMMAND ...` (argv without the program name; sys.argv when None); return the
    command's exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    module = importlib.import_module(args.module_name)
    command = argparse.ArgumentParser(prog=f'rsd {args.command}',
                                      description=COMMANDS[args.command][1])
    module.add_arguments(command)
    command_args = command.parse_args(argv[argv.index(args.command) + 1:])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(levelname)s %(name)s: %(message)s')
    return int(module.run(command_args) or 0)


if __name__ == '__main__':
    sys.exit(main())
