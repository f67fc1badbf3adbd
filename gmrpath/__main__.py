"""``python -m gmrpath ...``: the same as ``gmrpath ...``; what ``torchrun -m gmrpath train CONFIG`` and
Snakemake launch (the interpreter that runs them, so its environment).
"""

from gmrpath.cli import main

if __name__ == "__main__":
    main()
