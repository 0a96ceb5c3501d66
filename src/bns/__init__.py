"""bns: Bespoke Non-Stationary solvers, few-step sampling for any diffusion or flow model.

    import bns
    model = bns.Model(net, prediction="eps", schedule=bns.schedules.VP(), sample_shape=(1, 28, 28))
    solver = bns.solvers.midpoint(bns.grids.uniform(4, model.t_range))   # NFE 8
    x = bns.sample(model, torch.randn(16, 1, 28, 28), solver)

Only torch is needed to import bns; integrations are imported lazily.
"""

from . import grids, metrics, schedules, solvers, transforms
from .config import DistillConfig, TrainingError
from .cost import Ledger
from .errors import BNSError, InputError, StorageError
from .estimate import estimate_cost
from .ground_truth import default_tolerance, ground_truth
from .guidance_range import GuidanceRangeSolver, distill_guidance_range
from .model import Model, ModelError, NetworkError, NonFiniteVelocity
from .solver import NSSolver, SolverFileError, Velocity, sample
from .train import distill

__version__ = "0.1.0"

__all__ = [
    "BNSError",
    "StorageError",
    "InputError",
    "Model",
    "ModelError",
    "NetworkError",
    "NonFiniteVelocity",
    "NSSolver",
    "SolverFileError",
    "sample",
    "Velocity",
    "ground_truth",
    "default_tolerance",
    "distill",
    "distill_guidance_range",
    "GuidanceRangeSolver",
    "DistillConfig",
    "TrainingError",
    "estimate_cost",
    "Ledger",
    "grids",
    "metrics",
    "schedules",
    "solvers",
    "transforms",
]
