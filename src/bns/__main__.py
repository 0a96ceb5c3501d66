"""``python -m bns``: the command line (also what ``torchrun -m bns`` runs)."""

import sys

from .cli import main

sys.exit(main())
