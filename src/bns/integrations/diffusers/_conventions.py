"""How a diffusers scheduler's model output and timesteps map onto bns's flow time.

Shared by the scheduler (:mod:`.scheduler`) and the pipeline adapter (:mod:`.pipeline`); the
conventions themselves are described in the package docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import BNSError
from ...schedules import CondOT, DiscreteVP, Schedule

# diffusers' prediction_type -> bns's prediction (bns.model.PREDICTIONS).
BNS_PREDICTION_OF = {"epsilon": "eps", "v_prediction": "v", "sample": "x1", "flow": "velocity"}


class DiffusersError(BNSError, ValueError):
    """A pipeline or scheduler that this integration cannot use, or a misuse of the scheduler."""


def _config(scheduler: Any) -> Any:
    return getattr(scheduler, "config", scheduler)


def _is_bns_scheduler(scheduler: Any) -> bool:
    """A :class:`BNSScheduler` (or its config): it states its conventions itself."""
    config = _config(scheduler)
    if type(scheduler).__name__ == "BNSScheduler":
        return True
    # Its config (or a dict of it): the solver is what no other scheduler's config holds.
    return hasattr(config, "get") and isinstance(config.get("solver"), dict)


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether a scheduler (or its config) is a flow-matching one.

    Flow matching is ``FlowMatch*`` (SD3, Flux, Wan's FlowMatchEulerDiscreteScheduler), a config
    with ``shift`` / dynamic shifting and no DDPM betas, a multistep scheduler in flow mode
    (``prediction_type="flow_prediction"`` with ``use_flow_sigmas=True``: Wan's and Sana's
    UniPC / DPM-Solver, ``timestep = 1000 sigma``) or a flow BNSScheduler.
    """
    name = type(scheduler).__name__
    config = _config(scheduler)
    if _is_bns_scheduler(scheduler):
        return config.get("prediction_type") == "flow"
    if not hasattr(config, "get"):
        return "FlowMatch" in name
    if config.get("prediction_type") == "flow_prediction" and config.get("use_flow_sigmas"):
        return True
    return "FlowMatch" in name or (
        ("shift" in config or "use_dynamic_shifting" in config) and "beta_start" not in config
    )


def _alphas_cumprod(scheduler: Any) -> Tensor:
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        # A bare config: let diffusers' own DDPM scheduler build the betas the same way.
        from diffusers import DDPMScheduler

        config = dict(_config(scheduler))
        ac = DDPMScheduler.from_config(config).alphas_cumprod
    return torch.as_tensor(ac, dtype=torch.float64).flatten()


def describe_scheduler(scheduler: Any) -> dict[str, Any]:
    """``prediction_type``, ``num_train_timesteps`` and (DDPM-style) ``alphas_cumprod``."""
    config = _config(scheduler)
    n_train = int(config.get("num_train_timesteps", 1000))
    if _is_bns_scheduler(scheduler):
        # A pipeline that already holds a BNSScheduler (e.g. a folder saved with one).
        prediction = config.get("prediction_type")
        if prediction not in BNS_PREDICTION_OF:
            raise DiffusersError(f"BNSScheduler config has prediction_type {prediction!r}")
        ac = config.get("alphas_cumprod")
        if prediction != "flow" and not ac and config.get("trained_betas") is not None:
            # A hand-written config may state the schedule by its betas alone.
            ac = alphas_cumprod_from_betas(config["trained_betas"])[1].tolist()
        if prediction != "flow" and not ac:
            raise DiffusersError(f"a {prediction} BNSScheduler config holds no alphas_cumprod")
        return {
            "prediction_type": prediction,
            "num_train_timesteps": n_train if prediction == "flow" else len(ac),
            "alphas_cumprod": None if prediction == "flow" else [float(v) for v in ac],
        }
    if is_flow_scheduler(scheduler):
        return {"prediction_type": "flow", "num_train_timesteps": n_train, "alphas_cumprod": None}
    prediction = config.get("prediction_type", "epsilon")
    if prediction == "flow_prediction":
        raise DiffusersError(
            f"{type(scheduler).__name__} has prediction_type 'flow_prediction' without"
            " use_flow_sigmas=True: its sigmas are not a flow-matching path"
        )
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise DiffusersError(
            f"{type(scheduler).__name__} has prediction_type {prediction!r}; bns supports"
            " epsilon, v_prediction, sample and flow matching"
        )
    ac = _alphas_cumprod(scheduler)
    return {
        "prediction_type": prediction,
        "num_train_timesteps": ac.numel(),
        "alphas_cumprod": [float(v) for v in ac],
    }


def alphas_cumprod_from_betas(trained_betas: Any) -> tuple[Tensor, Tensor]:
    """``(betas, alphas_cumprod)`` of diffusers' ``trained_betas`` (float32 tensors).

    Computed as diffusers' DDPM-style schedulers compute them (float32 betas, then the float32
    cumulative product of ``1 - betas``), so that a BNSScheduler and the pipeline's own
    scheduler given the same betas hold the same ``alphas_cumprod`` to the bit.
    """
    try:
        b = torch.as_tensor(trained_betas, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise DiffusersError(f"trained_betas must be an array of numbers: {e}") from None
    if b.dim() != 1 or b.numel() < 2 or not torch.all((b > 0) & (b < 1)):
        raise DiffusersError("trained_betas must be a 1-D array of at least 2 values in (0, 1)")
    betas = b.to(torch.float32)
    ac = torch.cumprod(1.0 - betas, dim=0)
    # Betas within float32 rounding of 0 or 1 give a flat or vanishing product: no VP schedule.
    if not (torch.all(ac > 0) and torch.all(ac[1:] < ac[:-1]) and ac[0] < 1):
        raise DiffusersError(
            "trained_betas give no strictly decreasing alphas_cumprod in (0, 1) in float32"
        )
    return betas, ac


def bns_schedule(prediction_type: str, alphas_cumprod: Sequence[float] | None) -> Schedule:
    """The bns scheduler of a pipeline: CondOT for flow matching, else DiscreteVP."""
    if prediction_type == "flow":
        return CondOT()
    if alphas_cumprod is None:
        raise DiffusersError(f"prediction_type {prediction_type!r} needs alphas_cumprod")
    return DiscreteVP(torch.tensor(list(alphas_cumprod), dtype=torch.float64))


def diffusers_timestep(prediction_type: str, num_train_timesteps: int, t: Tensor) -> Tensor:
    """The diffusers timestep of flow time ``t`` (float64, fractional)."""
    t = t.to(torch.float64)
    if prediction_type == "flow":
        return (1 - t) * num_train_timesteps
    return (1 - t) * (num_train_timesteps - 1)


def flow_time(prediction_type: str, num_train_timesteps: int, timestep: Tensor) -> Tensor:
    """The flow time of a (fractional) diffusers timestep: the inverse of
    :func:`diffusers_timestep` (float64)."""
    k = timestep.to(torch.float64)
    if prediction_type == "flow":
        return 1 - k / num_train_timesteps
    return 1 - k / (num_train_timesteps - 1)
