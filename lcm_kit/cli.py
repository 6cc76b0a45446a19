"""The ``lcm-kit`` command: argparse dispatch to the subcommands of :mod:`lcm_kit.commands`.

Adding a subcommand is one module in ``lcm_kit/commands/`` with ``add_<name>_parser(subparsers)`` (it builds the
parser and sets ``func``, a callable taking the parsed ``argparse.Namespace`` and returning an exit code) and one
entry in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys

from .commands.eval import add_eval_parser
from .commands.generate import add_generate_parser
from .commands.quickstart import add_quickstart_parser

SUBCOMMANDS = [add_generate_parser, add_eval_parser, add_quickstart_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcm-kit", description="Latent consistency models for diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lcm-kit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
