"""`python -m dist_train new DIR`: the `dist-train` command (scaffold.py)."""
import sys

from dist_train.commands.scaffold import main

sys.exit(main())
