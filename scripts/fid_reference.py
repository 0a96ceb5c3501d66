"""Compute the FID reference statistics of the Fashion-MNIST test set (or another split).

    pip install 'bns[fid]'
    python scripts/fid_reference.py [--split test] [--data DIR] [--out PATH] [--device cuda]

Writes the mean and covariance (float64) of the Inception-v3 pool features of every image of
the split to OUT (default ``$BNS_CACHE_DIR/fid/fashion-mnist-test.safetensors``, where
``bns eval --fid N`` reads them for the ``fmnist-*`` models; it computes them there itself if
they are missing). The 10000 test images take about an hour on one CPU core.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bns import fid
from bns.models.fmnist import DATA_DIR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--data", type=Path, default=DATA_DIR, help="folder of the *-idx*-ubyte.gz")
    p.add_argument("--out", type=Path, help="statistics file (default: the cache bns eval reads)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: cpu)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or fid.reference_path(f"fashion-mnist-{args.split}")
    t0 = time.perf_counter()
    try:
        stats = fid.fashion_mnist(args.split, args.data).stats(
            out, recompute=True, progress=True, device=args.device, batch_size=args.batch_size
        )
    except (fid.FIDError, FileNotFoundError) as e:
        print(f"fid_reference: error: {e}", file=sys.stderr)
        return 2
    print(
        f"fid_reference: Fashion-MNIST {args.split}: {stats.count} images,"
        f" tr(cov) = {float(stats.cov.trace()):.4f}, {time.perf_counter() - t0:.0f} s -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
