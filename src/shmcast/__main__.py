"""``python -m shmcast``: the same command line as the ``shmcast`` script."""

import sys

from ._tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
