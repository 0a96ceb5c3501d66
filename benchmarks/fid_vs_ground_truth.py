"""FID against the ground truth of fmnist-vp baselines at NFE 4 (256 samples: the first of the
512 data-ending test pairs, seed 0): ab3 on the rule's log-SNR grid and DPM-Solver++ 2M on the
uniform grid that measures best. Needs the FID extra (pip install 'bns[fid]'); prints each FID.
Results: benchmarks/results/fid_fmnist-vp_g1_nfe4_grids.md.

    BNS_CACHE_DIR=... python benchmarks/fid_vs_ground_truth.py
"""

from __future__ import annotations

import time

import torch

from bns.fid import feature_stats
from bns.pairs import make_pairs
from bns.solver import sample
from bns.solvers import by_name, with_data_end
from bns.specs import load_model

model = load_model("fmnist-vp")
test = make_pairs(model, 512, "test", seed=0, end="data", progress=False)[:256]
t0 = time.time()
gt = feature_stats(test.x1)
for name, nfe, grid in [("ab3", 4, "logsnr"), ("dpmpp2m", 4, "uniform")]:
    solver = with_data_end(by_name(name, nfe, model, grid), model.schedule)
    with torch.no_grad():
        x = sample(model, test.x0, solver)
    fid = feature_stats(x.float()).distance(gt)
    print(f"{name} ({grid}) NFE {nfe}: FID vs ground truth {fid:.2f} ({time.time() - t0:.0f} s)")
