"""certjax command line, as `python launch.py ...`: the same code as the `certjax` command and
`python -m certjax` (certjax/cli.py). `python launch.py --help` lists the modes, commands and flags.

  python launch.py --config=configs/linf_dist.py:demo --workdir=runs/demo
  python launch.py --config=configs/linf_dist.py --workdir=runs/linf --config.train.epochs=10
  python launch.py --config=configs/linf_dist.py --workdir=runs/linf --mode=evaluate --checkpoint=best
  python launch.py --workdir=runs/linf --mode=certify --images=my_images.zip --out=certified.csv
  python launch.py list
  python launch.py config --config=configs/lot.py:S,cosine

Training resumes from the latest checkpoint in --workdir. Evaluation and certification read the config saved
with the checkpoint (so --config is not needed). Several hosts: README, "Many devices, many hosts, and
failures".
"""

import sys

from certjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
