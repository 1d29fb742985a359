"""`python -m engine.train --config run.toml`: the training command line (engine/train/cli.py)."""
import sys

from engine.train.cli import main

sys.exit(main())
