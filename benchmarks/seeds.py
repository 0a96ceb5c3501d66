"""Loss and initialization over three training seeds: which ablation differences are real.

    python benchmarks/seeds.py gmm 6 1000 256
    python benchmarks/seeds.py fmnist-vp 6 300 520

Arguments: model, NFE, steps, training pairs (256 validation and 512 test pairs, batch 24).
For seeds 0, 1, 2 it distills with log-MSE and L1, from ``--init best`` and from Euler, on the
same pairs, and prints one JSON line per run (test PSNR); the lines of the runs quoted in the
README are in ``benchmarks/results/seeds_<model>.jsonl``.
"""

import json
import sys
import time

import bns
from bns.evaluate import evaluate_psnr
from bns.pairs import make_pairs
from bns.specs import load_model


def main() -> None:
    name, nfe, steps, n_train = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    m = load_model(name)
    tr = make_pairs(m, n_train, "train", progress=False)
    va = make_pairs(m, 256, "val", progress=False)
    te = make_pairs(m, 512, "test", progress=False)
    for seed in (0, 1, 2):
        for loss, init in (
            ("log-mse", "best"),
            ("l1", "best"),
            ("log-mse", "euler"),
            ("l1", "euler"),
        ):
            t = time.time()
            s, _ = bns.distill(
                m,
                nfe,
                pairs=(tr, va),
                adam_steps=steps,
                batch_size=24,
                init_pairs=128,
                loss=loss,
                init=init,
                seed=seed,
                progress=False,
            )
            p = float(evaluate_psnr(m, s, te).mean())
            row = dict(
                seed=seed,
                loss=loss,
                init=init,
                init_label=s.meta["init"],
                psnr=p,
                s=round(time.time() - t, 1),
            )
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
