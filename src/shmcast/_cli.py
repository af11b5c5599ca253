"""The ``shmcast`` command line: a table of subcommands, one module each.

Each subcommand lives in its own module, which exposes two functions:

- ``add_arguments(parser: argparse.ArgumentParser) -> None`` declares its options;
- ``run(args: argparse.Namespace) -> int`` does the work and returns the exit status.

and whose docstring's first line is the subcommand's one-line help.  A subcommand is added by
one line in :data:`SUBCOMMANDS`.

Exit statuses: 0 success, 1 failure (the command ran but its check failed), 2 usage error
(bad arguments; argparse's convention), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Subcommand name -> module (relative to this package) implementing it.
SUBCOMMANDS: dict[str, str] = {
    "demo": "._demo",
}


class UsageError(Exception):
    """Raised by a subcommand's ``run`` for an argument combination that argparse cannot check
    (for example two options that exclude each other).  ``main`` reports it like an argparse
    error and exits with status 2."""


def _load(module_name: str) -> ModuleType:
    module = importlib.import_module(module_name, __package__)
    for required in ("add_arguments", "run"):
        if not callable(getattr(module, required, None)):
            raise TypeError(f"subcommand module {module.__name__} has no {required}() function")
    return module


def _summary(module: ModuleType) -> str:
    doc = (module.__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`SUBCOMMANDS` registered.

    Imports the subcommand modules (they must import quickly: heavy or optional dependencies
    are imported inside ``run``).
    """
    parser = argparse.ArgumentParser(
        prog="shmcast",
        description=(
            "Broadcast messages from one process to many through shared memory. "
            "Run 'shmcast demo' to see it work."
        ),
        epilog="Run 'shmcast COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"shmcast {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = _load(module_name)
        summary = _summary(module)
        sub = commands.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run, _parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status.

    Never raises SystemExit: ``--help`` and ``--version`` return 0, bad arguments print a
    usage message on stderr and return 2, Ctrl-C returns 130.  Any other exception from a
    subcommand propagates (it is a bug, and its traceback is what one needs to fix it).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    sub: argparse.ArgumentParser = args._parser
    try:
        status = args._run(args)
    except UsageError as exc:
        sub.print_usage(sys.stderr)
        print(f"{sub.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{sub.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(status)


__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "SUBCOMMANDS", "UsageError", "main"]
