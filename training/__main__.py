"""``python -m training CONFIG [options]``: ``gmrpath train`` for ``torchrun`` (which launches modules or scripts).

Example:
    $ torchrun --nproc-per-node 2 -m training configs/train_nuclei_gmr.yaml
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]], prog_name="python -m training")
