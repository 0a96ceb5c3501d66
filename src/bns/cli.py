"""The ``bns`` command line: thin commands over the Python API.

    bns distill --model SPEC --nfe N [--guidance W] --out solver.json
    bns eval    --model SPEC --solver solver.json --baselines euler,midpoint,dpmpp2m --nfe 4,8,16 --json out.json
    bns sample  --model SPEC --solver solver.json --n 16 --out grid.png
    bns demo    [--out DIR]
    bns export  solver.json --format sigmas|timesteps|comfyui|json [--out FILE]
    bns comfyui install COMFYUI_DIR [--force]

Wrong input ends with one line on stderr and exit status 2, never a traceback (set
``BNS_DEBUG=1`` to see one), and never overwrites a good artifact.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

from ._io import atomic_write, check_writable, remove_stale_tmp
from .errors import BNSError, StorageError

__all__ = ["main"]


class CLIError(BNSError):
    """A user error reported as one line."""


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _default(name: str) -> Any:
    from .config import DistillConfig

    return DistillConfig.__dataclass_fields__[name].default


def _add_model(p: argparse.ArgumentParser, config_options: bool = False) -> None:
    from .specs import BUILTIN_MODELS

    p.add_argument(
        "--model",
        required=True,
        help=" | ".join([*BUILTIN_MODELS, "file.py:factory", "diffusers:PATH"]),
    )
    p.add_argument(
        "--prompts",
        metavar="FILE[,VAL,TEST]",
        help="text prompts, one per line (diffusers text models): one file is split into"
        " train/val/test prompts (60/20/20 %%, by --prompt-seed); three files, comma separated,"
        " give the train, validation and test prompts",
    )
    p.add_argument(
        "--prompt-seed",
        type=int,
        default=0,
        help="the seed that splits a single --prompts file (default: 0)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the network's device if not the CPU, else cuda if available, else cpu),"
        " cpu, cuda or cuda:K (default: auto)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="cast the network to this dtype (default: as loaded)",
    )
    if not config_options:  # distill takes these from the config
        p.add_argument(
            "--guidance",
            type=float,
            default=None,
            help="classifier-free guidance scale, 1 = none (default: the scale the --solver"
            " files were trained at, else 1)",
        )
        p.add_argument(
            "--seed",
            type=int,
            default=_default("seed"),
            help="seed of the pairs (default: %(default)s)",
        )
    p.add_argument(
        "--cache-dir", type=Path, help="ground-truth cache (default $BNS_CACHE_DIR or ~/.cache/bns)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


_SPAN_HELP = (
    "the part of the path, T0:T1 in flow time (default: that of the --solver files, else the"
    " whole range); a span that starts inside the path starts from noised samples"
)


def _spanned(model: Any, span: Any, paths: list[Path]) -> Any:
    """``model`` over ``--span``, or over the span the solver files were made for (all the
    same); the model itself where neither says."""
    from .config import parse_span
    from .guidance_range import GuidanceRangeSolver, is_guidance_range_file
    from .solver import NSSolver
    from .train import spanned

    ranges = set()
    for p in paths:
        if p.is_file():  # the file's own validation here; the model's comes later
            meta = (GuidanceRangeSolver if is_guidance_range_file(p) else NSSolver).load(p).meta
            found = meta.get("span") if isinstance(meta.get("span"), dict) else None
            ranges.add(tuple(found["t_range"]) if found else None)
    if span is not None:
        try:
            return spanned(model, parse_span(span))
        except ValueError as e:
            raise CLIError(f"--span: {e}") from None
    if len(ranges) > 1:
        raise CLIError(
            "the solvers cover different parts of the path"
            f" ({', '.join('whole' if r is None else f'{r[0]:g}:{r[1]:g}' for r in ranges)});"
            " evaluate each part on its own"
        )
    found = next(iter(ranges), None)
    return model if found is None else spanned(model, list(found))


def _guidance(given: float | None, paths: list[Path]) -> float:
    """``--guidance``, or else the scale the solver files were trained at (all the same), as
    :func:`bns.sample` does; 1 without solver files. A guidance-range file names no one scale:
    it needs ``--guidance``."""
    from .guidance_range import GuidanceRangeSolver, is_guidance_range_file
    from .solver import NSSolver

    if given is not None:
        return given
    scales: set[float] = set()
    for p in paths:
        if not p.is_file():
            continue  # said where the file is loaded
        if is_guidance_range_file(p):
            lo, hi = GuidanceRangeSolver.load(p).w_range
            raise CLIError(
                f"{p} is a solver for guidance {lo:g} to {hi:g}: pass --guidance W, W in that range"
            )
        try:
            meta = NSSolver.load(p).meta
            if "guidance" in meta:  # one without (a classical solver saved by hand) fits any
                scales.add(float(meta["guidance"]))
        except (TypeError, ValueError):
            continue  # a bad meta value: said where the file is loaded for the model
    if len(scales) > 1:
        raise CLIError(
            "the solvers were trained at different guidance scales"
            f" ({', '.join(f'{w:g}' for w in sorted(scales))}): pass --guidance W and evaluate"
            " the solvers of W (or add --force to run every one at W)"
        )
    return next(iter(scales), 1.0)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option or value said in one line (the usage is one --help away),
    as every other bad input is; an unknown option names the nearest known one."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            # the innermost command chosen: its options, its name in the line
            parser = self
            while (sub := _subparsers(parser)) and getattr(parsed, sub.dest, None) in sub.choices:
                parser = sub.choices[getattr(parsed, sub.dest)]
            option = extra[0].split("=")[0]
            near = difflib.get_close_matches(option, list(parser._option_string_actions), 1)
            hint = f"; did you mean {near[0]}?" if near and option.startswith("-") else ""
            if option in parser._option_string_actions:  # given before the command's name
                hint = f"; {option} goes after '{parser.prog}'"
            parser.error(f"unrecognized argument{'s' * (len(extra) > 1)}: {' '.join(extra)}{hint}")
        return parsed


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    """``parser``'s commands (their ``dest`` and ``choices``), if it has any."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = _subparsers(parser)
    return {} if sub is None else sub.choices


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bns",
        description="Bespoke Non-Stationary solvers: few-step sampling for diffusion and flow models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="learn a BNS solver for a model")
    _add_model(d, config_options=True)
    from .config import add_config_arguments
    from .solvers.ends import ENDS

    add_config_arguments(d)
    d.add_argument(
        "--resume", action="store_true", help="continue from OUT.ckpt after an interruption"
    )
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    d.add_argument(
        "--guidance-range",
        metavar="W1,W2,...",
        type=lambda text: [float(v) for v in text.split(",") if v.strip()],
        help="train one solver for every guidance scale from min to max, on pairs at each of"
        " these scales (its parameters a smooth function of log w); sample and eval then take"
        " any --guidance in the range",
    )
    d.add_argument(
        "--estimate",
        action="store_true",
        help="print what the run would cost, phase by phase (network forwards, JVPs, predicted"
        " seconds on this device), from a few timed calls of the network; solves nothing",
    )
    d.add_argument("--out", type=Path, help="the solver file to write (JSON)")

    e = sub.add_parser("eval", help="PSNR of solvers against ground truth on held-out pairs")
    _add_model(e)
    e.add_argument("--solver", type=Path, nargs="*", default=[], help="BNS solver files")
    e.add_argument(
        "--name",
        type=_name_list,
        help="comma-separated row names of the --solver files (default: each file's stem)",
    )
    e.add_argument(
        "--baselines",
        type=_name_list,
        default=None,
        help="comma-separated classical solvers (default: all)",
    )
    e.add_argument(
        "--nfe", type=_int_list, default=[4, 8, 16], help="NFEs of the baselines, e.g. 4,8,16"
    )
    e.add_argument(
        "--grids",
        default="all",
        help="grids each baseline may take: all (default: every grid of the model, the best of"
        " them on --grid-pairs validation pairs), default (a fixed rule, nothing measured), or"
        " a comma-separated list (uniform,logsnr,edm,linspace,leading,trailing,ays-sd1,...)",
    )
    e.add_argument(
        "--grid-pairs",
        type=int,
        default=64,
        help="validation pairs that choose each baseline's grid (default: 64)",
    )
    e.add_argument(
        "--test-pairs",
        type=int,
        default=1024,
        help="held-out pairs of the table (each an adaptive ground-truth solve, cached)"
        " (default: 1024)",
    )
    e.add_argument("--span", metavar="T0:T1", help=_SPAN_HELP)
    e.add_argument(
        "--gt-batch-size", type=int, default=128, help="pairs per ground-truth solve (default: 128)"
    )
    e.add_argument(
        "--eval-batch-size", type=int, default=256, help="pairs sampled at a time (default: 256)"
    )
    e.add_argument(
        "--end",
        choices=ENDS,
        help="where the baselines and the ground truth end (default: where the solvers end;"
        " without solvers, auto: data on a model that stops short of it, else range)",
    )
    e.add_argument(
        "--force", action="store_true", help="accept solvers trained for another model or guidance"
    )
    e.add_argument(
        "--json", type=Path, required=True, help="rows: solver, nfe, psnr_mean, psnr_std"
    )
    e.add_argument("--table", type=Path, help="markdown table (default: next to --json)")
    e.add_argument("--plot", type=Path, help="PSNR-vs-NFE plot (PNG)")
    e.add_argument(
        "--samples",
        type=Path,
        help="image grid (PNG): ground truth, each BNS solver and the best classical solver at"
        " its NFE, on the same test noise (image models)",
    )
    e.add_argument(
        "--fid",
        type=int,
        metavar="N",
        help="also FID on the first N test pairs, against the data's statistics and against the"
        " ground truth (image models; pip install 'bns[fid]')",
    )

    s = sub.add_parser("sample", help="sample with a solver and save a grid image")
    _add_model(s)
    s.add_argument(
        "--solver", type=Path, required=True, help="the solver file (NS or guidance-range)"
    )
    s.add_argument("--n", type=int, default=16, help="how many samples (default: 16)")
    s.add_argument(
        "--data",
        type=Path,
        help="clean samples to start from (a .pt tensor [K, *shape]), noised to the start of"
        " the solver's span: for a solver of a span that starts inside the path (image-to-image)",
    )
    s.add_argument(
        "--labels",
        type=_name_list,
        default=None,
        help="class labels, comma-separated (conditional models)",
    )
    s.add_argument(
        "--force", action="store_true", help="accept a solver trained for another model or guidance"
    )
    s.add_argument("--out", type=Path, required=True, help="PNG grid (or .pt tensor file)")

    m = sub.add_parser("demo", help="the main job on the embedded default model")
    m.add_argument(
        "--out", type=Path, default=Path("bns-demo"), help="the report's folder (default: bns-demo)"
    )
    m.add_argument("--model", default="fmnist-cfg", help="the model spec (default: fmnist-cfg)")
    m.add_argument("--guidance", type=float, default=2.0, help="guidance scale (default: 2)")
    m.add_argument("--nfe", type=int, default=8, help="the BNS solver's NFE (default: 8)")
    m.add_argument("--quick", action="store_true", help="a much smaller run (for tests)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    m.add_argument(
        "--cache-dir", type=Path, help="ground-truth cache (default $BNS_CACHE_DIR or ~/.cache/bns)"
    )
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    from .integrations.comfyui.install import add_parser as add_comfyui_parser

    add_comfyui_parser(sub)  # bns comfyui install COMFYUI_DIR
    from .export import add_parser as add_export_parser

    add_export_parser(sub)  # bns export SOLVER --format ...
    return parser


def _prompt_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CLIError(f"prompts file not found: {path}")
    try:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read prompts file {path}: {e}") from None
    if not prompts:
        raise CLIError(f"prompts file {path} holds no prompt")
    return prompts


def split_prompts(prompts: list[str], seed: int = 0) -> dict[str, list[str]]:
    """One prompt list as train/val/test (60/20/20 %, at least one each), shuffled by ``seed``."""
    import torch

    n = len(prompts)
    if n < 3:
        raise CLIError(
            f"a single prompts file is split into train, val and test prompts: it needs at least"
            f" 3 prompts, got {n} (or pass three files: --prompts TRAIN,VAL,TEST)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = n_test = max(1, round(0.2 * n))
    n_train = n - n_val - n_test
    picked = [prompts[i] for i in order]
    return {
        "train": picked[:n_train],
        "val": picked[n_train : n_train + n_val],
        "test": picked[n_train + n_val :],
    }


def _read_prompts(spec: str | None, seed: int = 0) -> dict[str, list[str]] | None:
    """``--prompts``: one file split by ``seed``, or three comma-separated files."""
    if spec is None:
        return None
    parts = str(spec).split(",")
    if len(parts) == 1:
        return split_prompts(_prompt_lines(Path(parts[0])), seed)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise CLIError(
            f"--prompts takes one file or three (TRAIN,VAL,TEST), got {len(parts)}: {spec}"
        )
    from .pairs import SPLITS

    return {s: _prompt_lines(Path(p.strip())) for s, p in zip(SPLITS, parts)}


def resolve_device(spec: str, model: Any) -> Any:
    """``--device``: auto is the network's device unless that is the CPU, else CUDA where
    available, else the CPU."""
    import torch

    from .executor import local_cuda_device

    if spec in ("auto", "cuda") and local_cuda_device() is not None:
        return local_cuda_device()  # under torchrun: the GPU of this worker's local rank
    if spec == "auto":
        if model is not None and model.device is not None and model.device.type != "cpu":
            return model.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:K, got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {spec}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CLIError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def _model(args) -> Any:
    """The model of ``--model``, cast to ``--dtype`` and moved to ``--device``."""
    import torch

    from .specs import load_model

    prompts = _read_prompts(getattr(args, "prompts", None), getattr(args, "prompt_seed", 0))
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    model = load_model(args.model, prompts=prompts, dtype=dtype)
    return model.to(device=resolve_device(getattr(args, "device", "auto"), model))


def _cache(args) -> Any:
    return args.cache_dir if getattr(args, "cache_dir", None) else True


def _written_by_rank0(model: Any, write: Any) -> bool:
    """Run ``write()`` on rank 0 alone (under torchrun the others wait for the file); whether
    this process is rank 0, the one that speaks."""
    from .executor import current

    ex = current(model.device)
    ex.on_main(write)
    return ex.main


def _distill_guidance_range(args, model: Any, cfg: Any, t0: float, ckpt: Path) -> int:
    from .guidance_range import distill_guidance_range

    rs, hist = distill_guidance_range(
        model,
        cfg.nfe,
        args.guidance_range,
        config=cfg,
        cache=_cache(args),
        progress=not args.quiet,
        checkpoint_path=ckpt,
        resume=args.resume,
    )

    def write() -> None:
        rs.save(args.out)
        ckpt.unlink(missing_ok=True)

    if not _written_by_rank0(model, write):
        return 0  # rank 0 alone speaks
    lo, hi = rs.w_range
    print(
        f"bns distill: {model.name} nfe={cfg.nfe} guidance {lo:g} to {hi:g}: mean validation"
        f" PSNR {hist['best_val_psnr']:.2f} dB (init {rs.meta['init']} {hist['val_psnr'][0]:.2f}"
        f" dB), best step {hist['best_step']} of {rs.meta['steps_run']},"
        f" {time.perf_counter() - t0:.1f} s"
        f" -> {args.out}"
    )
    return 0


def load_solver(path: Path, model: Any, guidance: float, force: bool = False) -> Any:
    """``--solver PATH``: an NS solver file, or a guidance-range file taken at ``guidance``."""
    from .guidance_range import GuidanceRangeSolver, is_guidance_range_file
    from .solver import NSSolver

    if is_guidance_range_file(path):
        rs = GuidanceRangeSolver.load(path, model=model, force=force)
        try:
            return rs.at(guidance)
        except ValueError as e:
            raise CLIError(f"{path}: {e}") from None
    return NSSolver.load(path, model=model, guidance=guidance, force=force)


def cmd_distill(args) -> int:
    from .config import DistillConfig, config_from_args
    from .solver import NSSolver
    from .train import distill, remove_checkpoints

    if args.estimate:
        return _estimate(args)
    if args.out is None:
        raise CLIError("--out is required (the solver file to write), or pass --estimate")
    ckpt = args.out.with_name(args.out.name + ".ckpt")
    if args.out.exists() and not args.overwrite:
        if not args.resume:
            raise CLIError(f"{args.out} exists; pass --overwrite to replace it")
        if not ckpt.exists():  # --resume continues a run; this one finished
            raise CLIError(
                f"{args.out} exists and {ckpt.name} does not: its run finished, there is"
                " nothing to resume; pass --overwrite to run it again"
            )
    if args.out.exists() and args.out.is_dir():
        raise CLIError(f"{args.out} is a folder; --out names the solver file")
    check_writable(args.out.parent)  # now, not after the run whose result it is to hold
    model = _model(args)
    t0 = time.perf_counter()
    cfg = DistillConfig(**config_from_args(args))
    from .train import spanned

    model = spanned(model, cfg.span)
    if args.guidance_range is not None:
        return _distill_guidance_range(args, model, cfg, t0, ckpt)
    from .model import NetworkError

    remove_stale_tmp(args.out.parent)  # what a killed run left half-written (a checkpoint)
    had_ckpt = ckpt.exists()
    try:
        solver, hist = distill(
            model,
            config=cfg,
            cache=_cache(args),
            checkpoint_path=ckpt,
            resume=args.resume,
            progress=not args.quiet,
        )
    except NetworkError:
        # The network fails, and would fail again: a checkpoint this run wrote is nothing to
        # resume (an interrupted run's, or one it resumed, stays).
        if not had_ckpt:
            remove_checkpoints(ckpt)
        raise

    def write() -> None:
        try:
            solver.save(args.out)
        except StorageError:
            if not ckpt.exists():
                raise
            # A full disk: the run is over, so its checkpoint (which may hold an older step:
            # its last update may have failed too) makes room for the solver.
            ckpt.unlink()
            solver.save(args.out)
        NSSolver.load(args.out, model=model, guidance=cfg.guidance)  # what we wrote reads back
        remove_checkpoints(ckpt)  # the run's, and its other starts'

    if not _written_by_rank0(model, write):
        return 0  # rank 0 alone speaks
    init_psnr = hist["val_psnr"][0]
    from .cost import Ledger

    print(Ledger.from_dict(solver.meta["cost"]).table("cost of this run"))
    if "starts" in solver.meta:
        each = ", ".join(
            f"{k} {v:.2f} dB" if v is not None else f"{k} (no finite validation)"
            for k, v in solver.meta["starts"].items()
        )
        print(f"bns distill: {len(solver.meta['starts'])} starts: {each}")
    if hist.get("stopped_by_budget"):
        print(f"bns distill: stopped before crossing the budget ({cfg.budget})")
    print(
        f"bns distill: {model.name} nfe={cfg.nfe} guidance={cfg.guidance:g}: validation PSNR"
        f" {hist['best_val_psnr']:.2f} dB (init {solver.meta['init']} {init_psnr:.2f} dB,"
        f" {hist['best_val_psnr'] - init_psnr:+.2f} dB), best step {hist['best_step']} of"
        f" {hist['steps_run']}, {time.perf_counter() - t0:.1f} s -> {args.out}"
    )
    return 0


def _estimate(args) -> int:
    from .config import DistillConfig, config_from_args
    from .estimate import estimate_cost

    model = _model(args)
    cfg = DistillConfig(**config_from_args(args))
    if args.guidance_range is not None:
        raise CLIError("--estimate is for one guidance scale: leave out --guidance-range")
    t0 = time.perf_counter()
    ledger, used = estimate_cost(model, config=cfg, cache=_cache(args), return_config=True)
    took = time.perf_counter() - t0
    steps = (
        # a step draws at most the training pairs there are (as the estimate counts it)
        f"{used.gn_steps} Gauss-Newton steps of {min(used.gn_batch_size, used.train_pairs)} pairs"
        if used.gn_steps
        else ""
    )
    if used.adam_steps:
        steps = f"{used.adam_steps} Adam steps" + (f", then {steps}" if steps else "")
    if used.starts > 1:
        steps += f", from each of up to {used.starts} starts"
    print(
        f"bns distill --estimate: {model.name} nfe={used.nfe} guidance={used.guidance:g} on"
        f" {model.device or 'cpu'}: {used.train_pairs} train / {used.val_pairs} validation pairs,"
        f" {steps}" + (f" (fitted to the budget {used.budget})" if used.budget else "")
    )
    print(ledger.table("predicted cost"))
    print(
        f"bns distill --estimate: at most {ledger.total.seconds:,.0f} s; optimizer and validation"
        " assume every step runs (the stopping rule usually ends sooner); cached ground truth"
        f" costs nothing. Measured in {took:.1f} s."
    )
    return 0


def _held_out_labels(model: Any) -> bool:
    """Whether the model's test pairs draw other labels (prompts) than its training pairs."""
    splits = getattr(model, "label_splits", None)
    return (
        bool(splits) and "train" in splits and set(splits.get("test", ())) != set(splits["train"])
    )


def _eval_end(model: Any, solvers: list, paths: list[Path], asked: str | None) -> str:
    """Where eval's ground truth and baselines end: where the solvers end (they must agree,
    and agree with ``--end`` where given), else ``--end`` resolved on the model."""
    from .solvers.ends import resolve_end, solver_end

    ends = {p.name: solver_end(s) for p, s in zip(paths, solvers)}
    if len(set(ends.values())) > 1:
        raise CLIError(
            "the solvers end at different points ("
            + ", ".join(f"{k}: {v}" for k, v in ends.items())
            + "): evaluate those that end alike together"
        )
    try:
        wanted = resolve_end(model, asked) if asked is not None else None
        if not ends:
            return wanted or resolve_end(model, "auto")
    except ValueError as e:
        raise CLIError(str(e)) from None
    end = next(iter(ends.values()))
    if wanted is not None and wanted != end:
        raise CLIError(f"--end {asked} but the solvers end at {end}")
    return end


def _row_names(paths: list[Path], names: list[str] | None) -> list[str]:
    """eval's row name of each solver file: ``--name``, else the file's stem (its path where
    two stems agree), so that a table says which file each row is."""
    from .solvers import SOLVER_NAMES

    if names is not None:
        if len(names) != len(paths) or len(set(names)) != len(names):
            raise CLIError(
                f"--name needs one distinct name per --solver file: {len(paths)} file(s),"
                f" {len(names)} name(s) {names}"
            )
        out = names
    else:
        stems = [p.stem for p in paths]
        out = [p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}" for p in paths]
        if len(set(out)) != len(out):
            raise CLIError(f"--solver names one file twice: {', '.join(map(str, paths))}")
    clash = [n for n in out if n in SOLVER_NAMES]
    if clash:
        raise CLIError(
            f"solver file row name(s) {clash} are classical solvers' names: rename the file or"
            " pass --name"
        )
    return out


def _grids(text: str, model) -> tuple[str, ...] | None:
    """``--grids``: None for the fixed rule, else the grids to measure (all: the model's)."""
    from .solvers import grid_names

    if text == "default":
        return None
    mine = grid_names(model)
    if text == "all":
        return mine
    asked = tuple(_name_list(text))
    unknown = [g for g in asked if g not in mine]
    if unknown or not asked:
        raise CLIError(
            f"--grids {text}: {', '.join(unknown) or 'nothing'} is not a grid of {model.name};"
            f" its grids: {', '.join(mine)} (or all, default)"
        )
    return asked


def cmd_eval(args) -> int:
    from .evaluate import baseline_solvers, best_rows, evaluate
    from .executor import current
    from .pairs import make_pairs
    from .report import comparison_grid, markdown_table, plot_psnr_vs_nfe, write_results
    from .solvers import SOLVER_NAMES

    for out in (args.json, args.table, args.plot):  # now, not after the evaluation
        if out is not None:
            check_writable(Path(out).parent)
    args.guidance = _guidance(args.guidance, args.solver)
    model = _spanned(_model(args), args.span, args.solver)
    if args.fid is not None:  # before any ground truth: a missing extra fails now
        from .fid import check_fid

        check_fid(model, args.fid, args.test_pairs)
    solvers = [load_solver(p, model, args.guidance, args.force) for p in args.solver]
    end = _eval_end(model, solvers, args.solver, args.end)
    names = args.baselines if args.baselines is not None else list(SOLVER_NAMES)
    for name in ("test_pairs", "gt_batch_size", "eval_batch_size", "grid_pairs"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer")
    grids = _grids(args.grids, model)
    from .cost import Ledger

    ledger = Ledger()
    pair_kw = dict(seed=args.seed, guidance=args.guidance, cache=_cache(args), end=end)
    pair_kw.update(batch_size=args.gt_batch_size)
    if grids is None or len(grids) == 1:  # nothing to choose: no validation pairs needed
        entries = baseline_solvers(model, args.nfe, names, end, grids[0] if grids else "default")
    elif not names:
        entries = []
    else:  # each baseline on the grid that measures best on validation pairs
        from .classical import best_classical

        with ledger.phase("ground_truth_val", model):
            val = make_pairs(model, args.grid_pairs, "val", progress=not args.quiet, **pair_kw)
        with ledger.phase("grid_search", model):
            entries = best_classical(
                model, args.nfe, val, names, grids, args.guidance, end, args.eval_batch_size
            )
    kinds = {}
    for name, s in zip(_row_names(args.solver, args.name), solvers):
        entries.append((name, s.nfe, s))
        kinds[name] = "bns"
    if not entries:
        raise CLIError("nothing to evaluate: no solver reaches the requested NFEs")
    with ledger.phase("ground_truth_test", model):
        test = make_pairs(model, args.test_pairs, "test", progress=not args.quiet, **pair_kw)
    eval_kw = dict(kinds=kinds, batch_size=args.eval_batch_size)
    with ledger.phase("evaluation", model):
        rows = evaluate(model, entries, test, args.guidance, progress=not args.quiet, **eval_kw)
    seen_rows = None
    if _held_out_labels(model):
        # The same test noise on the training prompts: how far the solver generalizes.
        with ledger.phase("ground_truth_test", model):
            seen = make_pairs(
                model, args.test_pairs, "test", progress=not args.quiet, labels="train", **pair_kw
            )
        with ledger.phase("evaluation", model):
            seen_rows = evaluate(model, entries, seen, args.guidance, progress=False, **eval_kw)
    ledger = ledger.summed_over_workers()
    if not current(model.device).main:
        return 0  # rank 0 alone writes the results and speaks
    fid_info: dict[str, Any] = {}
    if args.fid is not None:
        from .fid import add_fid

        fid_info = add_fid(
            model, entries, rows, test, args.fid, args.guidance, progress=not args.quiet
        )
    table = args.table or args.json.with_suffix(".md")
    write_results(
        rows,
        args.json,
        {
            "model": model.name,
            "guidance": args.guidance,
            "model_fingerprint": model.fingerprint(),
            "end": end,
            "cost": ledger.to_dict(),
            **fid_info,
            **({"rows_train_prompts": seen_rows} if seen_rows is not None else {}),
        },
        table,
        f"{model.name}, guidance {args.guidance:g}, {len(test)} test pairs"
        + (" (held-out prompts)" if seen_rows is not None else ""),
        []
        if seen_rows is None
        else [(f"{model.name}, the same noise on training prompts", seen_rows)],
    )
    if args.plot:
        plot_psnr_vs_nfe(rows, args.plot, f"{model.name}, guidance {args.guidance:g}")
    if args.samples:
        if len(model.sample_shape) != 3:
            raise CLIError(f"{model.name} samples are not images: --samples needs an image model")
        comparison_grid(
            model,
            entries,
            rows,
            test,
            args.guidance,
            args.samples,
            f"{model.name}, guidance {args.guidance:g}",
        )
    if seen_rows is None:
        print(markdown_table(rows))
    else:
        print(f"held-out prompts:\n{markdown_table(rows)}")
        print(f"training prompts (the same noise):\n{markdown_table(seen_rows)}")
    if fid_info:
        from .fid import fid_table

        print(fid_table(rows, fid_info))
    best = best_rows(rows)
    for r in rows:
        if r["kind"] == "bns" and r["nfe"] in best:
            b = best[r["nfe"]]
            print(
                f"bns eval: {r['solver']} nfe={r['nfe']}: {r['psnr_mean']:.2f} dB vs best classical"
                f" {b['solver']}{'@' + b['grid'] if b.get('grid') else ''} {b['psnr_mean']:.2f} dB"
                f" ({r['psnr_mean'] - b['psnr_mean']:+.2f} dB)"
            )
        elif r["kind"] == "bns" and names:
            print(
                f"bns eval: {r['solver']} nfe={r['nfe']}: no baseline at NFE {r['nfe']} to"
                f" compare with (--nfe {','.join(map(str, args.nfe))}): add {r['nfe']} to --nfe"
            )
    print(ledger.table("cost of this evaluation"))
    print(f"bns eval: {len(rows)} rows -> {args.json}, {table}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from .report import save_sample_grid
    from .solver import sample

    check_writable(Path(args.out).parent)  # now, not after sampling
    args.guidance = _guidance(args.guidance, [args.solver])
    model = _spanned(_model(args), None, [args.solver])
    solver = load_solver(args.solver, model, args.guidance, args.force)
    if args.n < 1:
        raise CLIError("--n must be at least 1")
    g = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn((args.n, *model.sample_shape), generator=g)
    if model.starts_from_data:
        x0 = model.start_state(_start_data(args, model), x0)
    elif args.data is not None:
        raise CLIError(
            "--data is for a solver of a span that starts inside the path; this one starts"
            " from noise"
        )
    y = None
    if model.num_classes is not None:
        if args.labels:
            try:
                labels = [int(v) for v in args.labels]
            except ValueError:
                raise CLIError(f"--labels must be integers, got {args.labels}") from None
            y = torch.tensor([labels[i % len(labels)] for i in range(args.n)])
        else:
            y = torch.arange(args.n) % model.num_classes
    elif args.labels:
        raise CLIError(f"{model.name} is unconditional: --labels does not apply")
    device = model.device
    with torch.no_grad():
        x = sample(
            model, x0.to(device), solver, None if y is None else y.to(device), args.guidance
        ).cpu()
    if args.out.suffix == ".pt":
        atomic_write(args.out, lambda tmp: torch.save(x, tmp))
    elif len(model.sample_shape) == 3:
        save_sample_grid({f"bns nfe={solver.nfe}": x}, args.out)
    else:
        raise CLIError(f"{model.name} samples are not images; write them with --out FILE.pt")
    print(f"bns sample: {args.n} samples, nfe={solver.nfe} -> {args.out}")
    return 0


def _start_data(args, model: Any) -> Any:
    """The ``--data`` samples, ``--n`` of them (repeated as needed), in float32."""
    import torch

    lo = model.t_range[0]
    if args.data is None:
        raise CLIError(
            f"this solver starts inside the path (t = {lo:g}, image-to-image): pass --data"
            " FILE.pt, the clean samples to start from"
        )
    if not args.data.is_file():
        raise CLIError(f"--data: no such file: {args.data}")
    try:
        data = torch.load(args.data, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: one line
        raise CLIError(f"--data: cannot read {args.data} as a tensor file: {e}") from None
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise CLIError(f"--data: {args.data} holds no floating-point tensor")
    if data.dim() < 1 or tuple(data.shape[1:]) != model.sample_shape or data.shape[0] < 1:
        shape = ", ".join(map(str, model.sample_shape))
        raise CLIError(f"--data: expected a tensor [K, {shape}], got {list(data.shape)}")
    if not torch.all(torch.isfinite(data)):
        raise CLIError(f"--data: {args.data} holds NaN or infinite values")
    reps = -(-args.n // data.shape[0])
    return data.float().repeat(reps, *([1] * len(model.sample_shape)))[: args.n]


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(
        args.out,
        device=resolve_device(args.device, None),
        model_spec=args.model,
        guidance=args.guidance,
        nfe=args.nfe,
        quick=args.quick,
        cache=args.cache_dir or True,
        progress=not args.quiet,
    )
    return 0


COMMANDS = {"distill": cmd_distill, "eval": cmd_eval, "sample": cmd_sample, "demo": cmd_demo}


def cmd_export(args) -> int:
    from .export import cmd_export as run_export

    return run_export(args)


COMMANDS["export"] = cmd_export


def cmd_comfyui(args) -> int:
    from .integrations.comfyui.install import cmd_comfyui as run_comfyui

    return run_comfyui(args)


COMMANDS["comfyui"] = cmd_comfyui


def _warnings_as_lines(prog: str) -> None:
    """Print each warning in one line in the command's name, as errors are: bns's own as what
    it says, another's (torch's, the network's) with its kind and where it was raised.

    The command line's alone (:func:`run`): a program calling :func:`main` keeps Python's."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = " ".join(str(message).split())
        if text.startswith("bns: "):
            text = text[len("bns: ") :]
        else:
            text = f"{category.__name__}: {text} ({filename}:{lineno})"
        print(f"{prog}: warning: {text}", file=file if file is not None else sys.stderr)

    warnings.showwarning = show


def run() -> None:
    """The ``bns`` and ``python -m bns`` entry point: :func:`main`, then the process exits
    (under torchrun, a worker of a job bns started ends as :func:`bns.distributed.end_command`
    says)."""
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    _warnings_as_lines(f"bns {command}" if command in COMMANDS else "bns")
    rc = main()
    if "bns.distributed" in sys.modules:  # only a multi-worker job loaded it
        from .distributed import end_command

        rc = end_command(rc)
    sys.exit(rc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("bns: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line, never a traceback
        if os.environ.get("BNS_DEBUG", "") not in ("", "0"):  # BNS_DEBUG=0: off
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # bns's own errors are written for people; a foreign one is named by its type.
        known = isinstance(e, BNSError)
        prefix = (
            ""
            if known or isinstance(e, (ValueError, FileNotFoundError))
            else f"{type(e).__name__}: "
        )
        print(f"bns {args.command}: error: {prefix}{msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run()
