"""`python -m certjax`: the `certjax` command (certjax/cli.py), for an install without the console script
on PATH."""

import sys

from certjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
