"""`python -m certjax.export --workdir RUN --out DIR`: the command-line entry of certjax/inference/export.py,
kept at this name so that the command stays as it was."""

import sys

from certjax.inference.export import main

if __name__ == "__main__":
    sys.exit(main())
