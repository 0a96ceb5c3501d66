"""``python -m bns``: the command line (also what ``torchrun -m bns`` runs)."""

from .cli import run

run()
