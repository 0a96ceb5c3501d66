"""Gauss-Newton (Levenberg-Marquardt) steps on a solver family's parameters.

A BNS solver has under 200 parameters and its loss is a sum of squares per sample, so the
Gauss-Newton matrix ``H = mean_k w_k J_k^T J_k`` is small (``P x P``) and cheap to solve once
the Jacobians ``J_k = d x_n / d theta`` are known. Adam, with one noisy gradient per step,
stalls a few dB under the optimum the family reaches (docs/math.md, section 4); a handful of
damped Gauss-Newton steps from Adam's iterate (or from the initial solver) gets there.

The Jacobian with respect to the NS coefficients is exact forward-mode differentiation,
organized by where each coefficient first acts: ``a_i`` and ``b_ij`` leave ``x_0 .. x_i``
unchanged, so their tangent starts at ``x_{i+1}`` (``x_0`` or ``u_j``) and is carried through
the remaining ``n - i - 1`` velocity evaluations only; a time ``t_k`` starts with
``du_k = d u / d t`` at step ``k``. Tangents that start at the same step are stacked into one
batch. The family's parameters enter through the chain rule, ``J_family = J_coef (d coef /
d params)``, the last factor from the network-free map ``family.solver()``: the trainer does
not know which family it runs.

The log-MSE loss ``log(|r_k|^2 / D)`` is a reweighted least-squares problem: its gradient and
Gauss-Newton matrix are those of ``sum_k w_k |r_k|^2`` with ``w_k = 1 / |r_k|^2`` at the
current iterate (iteratively reweighted least squares).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import executor
from .config import DistillConfig, TrainingError
from .cost import uncounted
from .errors import InputError
from .families import Family
from .loss import LOSSES, SUM_OF_SQUARES
from .model import Model, NetworkError, NonFiniteVelocity, _first_line, in_phase
from .pairs import Pairs
from .solver import NSSolver, sample

__all__ = [
    "coefficient_jacobian",
    "normal_equations",
    "levenberg_marquardt",
    "gauss_newton_step",
    "gauss_newton_update",
    "check_forward_mode",
]


def _coefficients(solver: NSSolver) -> Tensor:
    """The flat coefficient vector ``theta = (times, a, b)`` of an NS solver."""
    return torch.cat([solver.times, solver.a, solver.b.reshape(-1)])


@contextlib.contextmanager
def _forward_mode() -> Iterator[None]:
    """A forward-mode region: no autograd graph, a dual level, and attention through the math
    kernel of ``scaled_dot_product_attention`` (the fused flash and memory-efficient kernels
    have no forward-mode formula, and every diffusers UNet and transformer calls them)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # torch's first forward-mode call scripts its decompositions, with a warning of its own
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")
        stack.enter_context(torch.no_grad())
        stack.enter_context(fwAD.dual_level())
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # an older torch: its default kernels
            pass
        else:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


def coefficient_jacobian(
    model: Model,
    solver: NSSolver,
    x0: Tensor,
    y: Tensor | None = None,
    guidance: float = 1.0,
    max_stack: int = 1024,
) -> tuple[Tensor, Tensor]:
    """``x_n`` (``[B, D]``) and ``d x_n / d theta`` (``[B, D, Q]``) for
    ``theta = (times, a, b.flatten())`` of ``solver``, by forward-mode differentiation.

    Columns of coefficients the sampler never reads (``b`` above the diagonal, the last time)
    are zero. ``max_stack`` bounds the samples in one stacked network call.
    """
    xn, jac, index = _active_jacobian(model, solver, x0, y, guidance, max_stack)
    n = solver.nfe
    full = jac.new_zeros(*jac.shape[:2], (n + 1) + n + n * n)
    full[:, :, index] = jac
    return xn, full


def _active_jacobian(model, solver, x0, y, guidance, max_stack):
    """``x_n``, the Jacobian's columns of the coefficients the sampler reads (``[B, D, Qa]``:
    times ``t_0 .. t_{n-1}``, ``a``, the lower triangle of ``b``) and their positions in
    ``theta``."""
    with warnings.catch_warnings():
        # torch's first forward-mode call scripts its decompositions, with a warning of its own
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")
        return _jacobian_columns(model, solver, x0, y, guidance, max_stack)


def _jacobian_columns(model, solver, x0, y, guidance, max_stack):
    n = solver.nfe
    B = x0.shape[0]
    acc = torch.promote_types(x0.dtype, torch.float32)
    shape = x0.shape
    times = solver.times.detach().to(x0.device)
    a = solver.a.detach().to(device=x0.device, dtype=acc)
    b = solver.b.detach().to(device=x0.device, dtype=acc)

    def velocity(x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        return model.velocity(x, t, labels, guidance).to(acc).reshape(x.shape[0], -1)

    # The primal run, keeping every state and velocity.
    with torch.no_grad():
        x = x0.to(acc)
        flat0 = x.reshape(B, -1)
        xs, us = [], []
        for i in range(n):
            xs.append(x)
            us.append(velocity(x, times[i], y))
            nxt = a[i] * flat0 + sum(b[i, j] * us[j] for j in range(i + 1))
            x = nxt.reshape(shape)
    D = flat0.shape[1]
    # The columns the sampler reads: times t_0..t_{n-1}, then a, then b's lower triangle.
    index = list(range(n)) + [(n + 1) + i for i in range(n)]
    index += [(n + 1) + n + i * n + j for i in range(n) for j in range(i + 1)]
    column = {q: c for c, q in enumerate(index)}
    jac = torch.zeros(B, D, len(index), dtype=acc, device=x0.device)

    # Tangents by start step: (column, dx at the start step, known du history {j: du_j}).
    starts: dict[int, list[tuple[int, Tensor, dict[int, Tensor]]]] = {}
    for i in range(n):
        starts.setdefault(i + 1, []).append((column[(n + 1) + i], flat0, {}))
        for j in range(i + 1):
            starts[i + 1].append((column[(n + 1) + n + i * n + j], us[j], {}))
    for k in range(n):  # the time of evaluation k: du_k = d u / d t at (x_k, t_k)
        with _forward_mode():
            t_dual = fwAD.make_dual(times[k], torch.ones_like(times[k]))
            du = fwAD.unpack_dual(velocity(xs[k], t_dual, y)).tangent
        if du is None:  # the velocity does not depend on t: a zero column
            continue
        starts.setdefault(k + 1, []).append((column[k], b[k, k] * du, {k: du}))

    for s, cols in sorted(starts.items()):
        if s == n:  # tangents of x_n itself
            for col, dx, _ in cols:
                jac[:, :, col] = dx
            continue
        per = max(1, max_stack // B)
        for c0 in range(0, len(cols), per):
            chunk = cols[c0 : c0 + per]
            c = len(chunk)
            dx = torch.cat([d for _, d, _ in chunk])  # [c B, D]
            hist = [h for _, _, h in chunk]
            labels = None if y is None else y.repeat(c)
            du_hist: dict[int, Tensor] = {}
            for j in {j for h in hist for j in h}:
                du_hist[j] = torch.cat([h.get(j, torch.zeros_like(flat0)) for h in hist])
            for m in range(s, n):
                with _forward_mode():
                    xd = fwAD.make_dual(
                        xs[m].to(acc).repeat(c, *[1] * (xs[m].dim() - 1)),
                        dx.reshape(c * B, *shape[1:]),
                    )
                    du_hist[m] = fwAD.unpack_dual(velocity(xd, times[m], labels)).tangent
                dx = sum(b[m, j] * du_hist[j] for j in du_hist if j <= m)
            for q, (col, _, _) in enumerate(chunk):
                jac[:, :, col] = dx[q * B : (q + 1) * B]
    return x.reshape(B, -1), jac, torch.tensor(index)


def normal_equations(
    family: Family,
    model: Model,
    batch: Pairs,
    guidance: float,
    *,
    loss: str = "log-mse",
    micro_batch: int = 0,
    max_stack: int = 1024,
) -> tuple[float, Tensor, Tensor]:
    """The mean loss over ``batch``, its gradient ``g`` and its Gauss-Newton matrix ``H`` for
    the family's parameters (flattened in ``family.parameters()`` order), as float64.

    ``micro_batch = k > 0`` computes the Jacobians ``k`` pairs at a time (the same result to
    rounding, in the memory of ``k``).
    """
    if loss not in SUM_OF_SQUARES:
        raise InputError(
            f"Gauss-Newton steps need a sum-of-squares loss {SUM_OF_SQUARES}, got {loss!r}"
        )
    params = [p for p in family.parameters() if p.requires_grad]
    solver = family.solver()
    dcoef = _parameter_jacobian(family, params)  # [Q, P]
    n_pairs = len(batch)
    size = micro_batch if micro_batch > 0 else n_pairs
    P = dcoef.shape[1]
    H = torch.zeros(P, P, dtype=torch.float64, device=dcoef.device)
    g = torch.zeros(P, dtype=torch.float64, device=dcoef.device)
    total = 0.0
    for s0 in range(0, n_pairs, size):
        part = batch[s0 : s0 + size]
        xn, jac, index = _active_jacobian(
            model, solver.detach(), part.x0, part.y, guidance, max_stack
        )
        r = (xn - part.x1.reshape(xn.shape).to(xn.dtype)).double()
        D = r.shape[1]
        msq = (r * r).mean(1)
        if loss == "log-mse":
            total += float(torch.log(msq).sum())
            w = 2.0 / (D * msq)
        else:
            total += float(msq.sum())
            w = torch.full_like(msq, 2.0 / D)
        # The coefficients' normal equations, one sample at a time in float64 (memory of one
        # sample's Jacobian), then the family's through the chain rule.
        h = torch.zeros(len(index), len(index), dtype=torch.float64, device=jac.device)
        gt = torch.zeros(len(index), dtype=torch.float64, device=jac.device)
        for k in range(jac.shape[0]):
            jk = jac[k].double()
            h += w[k] * (jk.T @ jk)
            gt += w[k] * (jk.T @ r[k])
        dc = dcoef[index.to(dcoef.device)].to(jac.device)
        H += (dc.T @ h @ dc).to(H.device)
        g += (dc.T @ gt).to(g.device)
    return total / n_pairs, H / n_pairs, g / n_pairs


def _parameter_jacobian(family: Family, params: list[Tensor]) -> Tensor:
    """``d theta / d params`` (``[Q, P]``, float64) of the network-free map ``family.solver()``."""
    names = [k for k, p in family.named_parameters() if p.requires_grad]

    def coef(*flat_params: Tensor) -> Tensor:
        state = dict(zip(names, flat_params))
        solver = torch.func.functional_call(family, state, ())
        return _coefficients(solver).double()

    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(coef, tuple(p.detach() for p in params))
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def levenberg_marquardt(
    params: list[Tensor],
    loss0: float,
    H: Tensor,
    g: Tensor,
    batch_loss: Callable[[], float],
    lam: float,
    max_tries: int = 8,
) -> tuple[float, float]:
    """One damped Gauss-Newton step on ``params`` (changed in place):
    ``d = -(H + lam diag(H))^-1 g``, kept when the batch loss falls below ``loss0``; ``lam``
    shrinks 3x after a kept step and grows 4x after each rejected try. Returns
    ``(loss, lam)``; when every try fails the parameters are as they were and ``loss0`` is
    returned."""
    saved = [p.detach().clone() for p in params]
    dev = params[0].device
    H, g = H.to(dev), g.to(dev)
    diag = H.diagonal().clamp_min(1e-12 * float(H.diagonal().max().clamp_min(1e-300)))
    for _ in range(max_tries):
        try:
            d = torch.linalg.solve(H + lam * torch.diag(diag), -g)
        except RuntimeError:  # singular even when damped
            lam *= 4
            continue
        with torch.no_grad():
            s = 0
            for p in params:
                p += d[s : s + p.numel()].reshape(p.shape).to(p.dtype)
                s += p.numel()
        loss = batch_loss()
        if math.isfinite(loss) and loss < loss0:
            return loss, max(lam / 3, 1e-9)
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        lam *= 4
    return loss0, lam


def _raise_if_no_forward_mode(e: Exception) -> None:
    if isinstance(e, NonFiniteVelocity):
        return  # it ran, and returned NaN or inf
    # What the network said, not the phase the error names ("during the forward-mode check").
    text = f"{e.what}{e.detail}" if isinstance(e, NetworkError) else str(e)
    if any(k in text.lower() for k in ("forward ad", "forward mode", "forward-mode", "jvp")):
        raise TrainingError(
            "Gauss-Newton steps differentiate the network in forward mode, which it does not"
            f" support ({_first_line(e.__cause__ or e)}); pass gn_steps=0 (--gn-steps 0)"
        ) from None


def check_forward_mode(model: Model, guidance: float, device: torch.device | None) -> None:
    """One forward-mode evaluation of the network on one noise sample, before any ground
    truth or training: a network that cannot be differentiated in forward mode fails now,
    with :class:`TrainingError`, not after the Adam steps."""
    x = torch.randn(1, *model.sample_shape, device=device)
    t = torch.tensor(model.t_range[0], dtype=torch.float64)
    y = None if model.num_classes is None else torch.zeros(1, dtype=torch.long, device=device)
    try:
        with uncounted(model), _forward_mode(), in_phase("the forward-mode check"):
            xd = fwAD.make_dual(x, torch.ones_like(x))
            model.velocity(xd, fwAD.make_dual(t, torch.ones_like(t)), y, guidance)
    except (RuntimeError, NotImplementedError, NetworkError) as e:  # the network's, wrapped
        _raise_if_no_forward_mode(e)
        raise


@in_phase("an optimizer step")
def gauss_newton_step(
    family: Family, model: Model, train: Pairs, idx: Tensor, cfg: DistillConfig, lam: float
) -> tuple[float, float, int]:
    """One Levenberg-Marquardt step of distillation on the training pairs ``idx`` (shared
    among ``torchrun`` workers like an Adam step's batch). Returns ``(batch loss, lam,
    network forwards)``; the loss is nan when the normal equations are not finite."""
    ex = executor.current()
    params = [p for p in family.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    like = [torch.empty(P, P, dtype=torch.float64), torch.empty(P, dtype=torch.float64)]

    def equations(part: Tensor) -> tuple[float, list[Tensor] | None]:
        batch = train[part.to(train.x0.device)]
        try:
            loss, H, g = normal_equations(
                family,
                model,
                batch,
                cfg.guidance,
                loss=cfg.loss,
                micro_batch=cfg.micro_batch,
                max_stack=cfg.gn_max_stack,
            )
        except (RuntimeError, NotImplementedError, NetworkError) as e:
            _raise_if_no_forward_mode(e)
            raise
        ok = math.isfinite(loss) and bool(torch.isfinite(H).all() and torch.isfinite(g).all())
        return (loss, [H.cpu(), g.cpu()]) if ok else (math.nan, None)

    loss0, hg, forwards = ex.data_parallel(equations, idx, like, model)
    if hg is None:
        return math.nan, lam, forwards
    spent = [forwards]

    def batch_loss() -> float:
        def run(part: Tensor) -> tuple[float, list[Tensor]]:
            batch = train[part.to(train.x0.device)]
            with torch.no_grad():
                x = sample(model, batch.x0, family.solver(), batch.y, cfg.guidance)
            return float(LOSSES[cfg.loss](x, batch.x1).mean()), []

        loss, _, f = ex.data_parallel(run, idx, [], model)
        spent.append(f)
        return loss

    loss, lam = levenberg_marquardt(params, loss0, hg[0], hg[1], batch_loss, lam)
    return loss, lam, sum(spent)


def gauss_newton_update(
    family: Family, model: Model, train: Pairs, gen: torch.Generator, cfg: DistillConfig, lam: float
) -> tuple[float, float, bool]:
    """The Gauss-Newton strategy of the training loop (:class:`bns.train._Loop`): one
    Levenberg-Marquardt step of ``family`` on ``cfg.gn_batch_size`` training pairs drawn
    without replacement by ``gen``, from the damping ``lam``. Returns ``(batch loss, damping
    for the next step, rejected)``; ``rejected`` when no try was kept (the parameters are as
    they were)."""
    idx = torch.randperm(len(train), generator=gen)[: cfg.gn_batch_size]
    before = {k: v.detach().clone() for k, v in family.state_dict().items()}
    loss, lam, _ = gauss_newton_step(family, model, train, idx, cfg, lam)
    state = family.state_dict()
    return loss, lam, all(torch.equal(before[k], state[k]) for k in before)
