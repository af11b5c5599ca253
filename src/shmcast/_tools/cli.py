"""The ``shmcast`` command line: a table of subcommands, each implemented by a module.

A subcommand's module exposes two functions:

- ``add_arguments(parser: argparse.ArgumentParser) -> None`` declares its options;
- ``run(args: argparse.Namespace) -> int`` does the work and returns the exit status;

and its docstring's first line is the subcommand's one-line help.  A module that implements
several related subcommands instead exposes ``COMMANDS: dict[name, (add_arguments, run)]`` and
``SUMMARIES: dict[name, one-line help]``.  Either way a subcommand is added by one line in
:data:`SUBCOMMANDS`.

Exit statuses: 0 success, 1 failure (the command ran but its check failed), 2 usage error
(bad arguments; argparse's convention), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer killed by it

#: Subcommand name -> the module (relative to this package) that implements it.
SUBCOMMANDS: dict[str, str] = {
    "bench": ".bench",
    "demo": ".demo",
    "stress": ".stress",
    "inspect": ".inspection",
    "ls": ".inspection",
    "cleanup": ".inspection",
    "keygen": ".keygen",
}


class UsageError(Exception):
    """Raised by a subcommand's ``run`` for an argument combination that argparse cannot check
    (for example two options that exclude each other).  ``main`` reports it like an argparse
    error and exits with status 2."""


@dataclass(frozen=True)
class _Subcommand:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    summary: str
    description: str


def _first_line(text: str | None) -> str:
    text = (text or "").strip()
    return text.splitlines()[0].rstrip(".") if text else ""


def _load(name: str, module_name: str) -> _Subcommand:
    """The functions implementing subcommand ``name`` (TypeError if the module lacks them)."""
    module: ModuleType = importlib.import_module(module_name, __package__)
    commands = getattr(module, "COMMANDS", None)
    if isinstance(commands, dict) and name in commands:
        add_arguments, run = commands[name]
        summary = getattr(module, "SUMMARIES", {}).get(name, "")
        return _Subcommand(add_arguments, run, summary, summary)
    add_arguments = getattr(module, "add_arguments", None)
    run = getattr(module, "run", None)
    if not (callable(add_arguments) and callable(run)):
        raise TypeError(
            f"module {module.__name__} implements no subcommand {name!r}: it needs "
            "add_arguments() and run(), or an entry in COMMANDS"
        )
    return _Subcommand(add_arguments, run, _first_line(module.__doc__), module.__doc__ or "")


def _version() -> str:
    from .. import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`SUBCOMMANDS` registered.

    Imports the subcommand modules (they must import quickly: heavy or optional dependencies
    belong inside ``run``).
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
        command = _load(name, module_name)
        sub = commands.add_parser(
            name,
            help=command.summary,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run, _parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status.

    Never raises SystemExit: ``--help`` and ``--version`` return 0, bad arguments print a
    usage message on stderr and return 2, Ctrl-C returns 130, output to a pipe closed early
    (``shmcast ls | head``) ends quietly with 141, as a killed writer to a pipe does.  Any
    other exception from a subcommand propagates (it is a bug, and its traceback is what one
    needs to fix it).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    sub: argparse.ArgumentParser = args._parser
    try:
        status = args._run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
    except UsageError as exc:
        sub.print_usage(sys.stderr)
        print(f"{sub.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{sub.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read the output has gone: what is left to print goes nowhere (and so does
        # the flush at exit, which would raise again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return int(status)


__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "SUBCOMMANDS", "UsageError", "main"]
