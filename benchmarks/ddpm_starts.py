"""fmnist-ddpm at NFE 10: BNS with the default settings and some overrides (a JSON of
DistillConfig fields: {"gn_patience": 0}, {"gn_steps": 24, "gn_patience": 0}, {"init": "ab3"},
...); prints the initial solver, the validation history and the test PSNR on 256 data-ending
pairs. Results: benchmarks/results/ddpm_nfe10_starts.md.

    BNS_CACHE_DIR=... python benchmarks/ddpm_starts.py '{"init": "ab3"}'
"""

from __future__ import annotations

import json
import sys
import time

import bns
from bns.evaluate import evaluate_psnr
from bns.pairs import make_pairs
from bns.specs import load_model

model = load_model("fmnist-ddpm")
overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
t0 = time.time()
solver, hist = bns.distill(model, 10, progress=False, **overrides)
seconds = time.time() - t0
test = make_pairs(model, 256, "test", end="data", progress=False)
print(
    f"{overrides}: init {solver.meta['init']}, validation {[round(v, 2) for v in hist['val_psnr']]},"
    f" best step {hist['best_step']} of {hist['steps_run']}, {seconds:.0f} s,"
    f" test {float(evaluate_psnr(model, solver, test).mean()):.2f} dB"
)
