"""The ``lcm-kit`` command: argparse dispatch to the subcommands of :mod:`lcm_kit.commands`.

Adding a subcommand is one module in ``lcm_kit/commands/`` with ``add_<name>_parser(subparsers)`` (it builds the
parser and sets ``func``, a callable taking the parsed ``argparse.Namespace`` and returning an exit code) and one
entry in ``SUBCOMMANDS``. Every parser is a :class:`~lcm_kit.commands.generate.CommandParser` (the subparsers
inherit the class): no prefix abbreviations, defaults shown in ``--help``.
"""

from __future__ import annotations

import sys

from . import __version__
from .argtypes import CommandParser
from .commands.eval import add_eval_parser
from .commands.generate import add_generate_parser
from .commands.quickstart import add_quickstart_parser
from .commands.serve import add_serve_parser
from .commands.tune_steps import add_tune_steps_parser

SUBCOMMANDS = [add_generate_parser, add_eval_parser, add_quickstart_parser, add_serve_parser, add_tune_steps_parser]


def build_parser() -> CommandParser:
    parser = CommandParser(prog="lcm-kit", description="Latent consistency models for diffusers.")
    parser.add_argument("--version", action="version", version=f"lcm-kit {__version__}",
                        help="print the lcm-kit version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lcm-kit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
