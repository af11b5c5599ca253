"""Run the comparative benchmark: the same as ``shmcast bench``, without the CLI.

Usage (from the repository root)::

    .venv-bench/bin/python benchmarks/run.py [options]     # see --help
"""

from __future__ import annotations

import argparse
import sys

from shmcast._tools import bench as _bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py")
    _bench.add_arguments(parser)
    return _bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
