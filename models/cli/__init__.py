"""The ``servery`` command: one entry point, one subcommand per module.

Each subcommand lives in a module of its own with ``add_parser(subparsers)``, which registers the
subcommand and sets ``func`` (``func(args) -> exit code``) as its default; adding one is adding its
module to :data:`SUBCOMMANDS`. Those modules import only the standard library at the top (their
heavy imports are inside functions), so ``servery --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence

SUBCOMMANDS = (
    "models.cli.models",
    "models.cli.llm",
    "models.cli.rag",
    "models.cli.jobs",
    "bench.cli",
)
"""Modules with an ``add_parser(subparsers)``, in the order ``servery --help`` lists them."""
OPTIONAL = frozenset({"bench.cli"})
"""Subcommands left out where their package is not installed (``bench`` in a built Bento)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="servery", description="servery: model serving on BentoML (command-line tools)."
    )
    parser.add_argument(
        "--version", action="version", version=version_line(), help="print versions and exit"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as e:
            # A built Bento carries services/ and models/ but not bench/: `servery models ...`
            # and `servery llm ...` still work inside its container.
            if module in OPTIONAL and e.name in (module, module.split(".")[0]):
                continue
            raise
        found.add_parser(subparsers)
    return parser


def version_line() -> str:
    """``servery <version> (bentoml <version>, Python <version>)``: what a bug report needs."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"servery {of('servery')} (bentoml {of('bentoml')}, Python {platform.python_version()})"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the chosen subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["servery", *argv])  # for reports that record how they ran
    return args.func(args)
