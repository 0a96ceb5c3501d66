"""diffusers integration: a BNS scheduler for pipelines, and pipelines as :class:`bns.Model`.

Two directions:

- :class:`BNSScheduler` (:mod:`.scheduler`) runs a trained :class:`bns.NSSolver` inside an
  ordinary diffusers pipeline: ``pipe.scheduler = BNSScheduler.from_solver(solver,
  pipe.scheduler)``.
- :func:`model_from_pipeline` (:mod:`.pipeline`) turns a pipeline (a local folder or an object)
  into a :class:`bns.Model`, so that a solver can be distilled for it (``bns distill --model
  diffusers:PATH``).

Conventions (bns-math.md, section 1; flow time ``t``: 0 = noise, 1 = data):

- Flow-matching pipelines (SD3, Flux: ``FlowMatchEulerDiscreteScheduler``) work in
  ``sigma = 1 - t``; the transformer's output is ``dx/dsigma`` at ``timestep = sigma * N``
  (``N = num_train_timesteps``, 1000). The bns velocity is ``u = dx/dt = -output`` and the path is
  CondOT. The scheduler's ``shift`` / ``mu`` (resolution-dependent shifting) only choose
  diffusers' *inference grid* ``sigma -> shift sigma / (1 + (shift - 1) sigma)``; they are not
  part of the model, so the bns model ignores them and a BNS solver uses its own learned times.
  (The shifted Euler grid is ``bns.solvers.euler(1 - shifted_sigmas)``, a natural init.)
- DDPM-style pipelines (epsilon, v_prediction or sample prediction over ``alphas_cumprod``, e.g.
  DiT) use :class:`bns.schedules.DiscreteVP`: diffusers timestep ``k = (1 - t)(N - 1)``,
  fractional between the trained integers, with the log-SNR interpolated linearly.
- Both start from ``x_0 ~ N(0, I)`` at ``t = 0`` (``init_noise_sigma = 1``) and feed the network
  the sample itself (``scale_model_input`` is the identity), as these pipelines expect.
"""

from ._conventions import DiffusersError
from .pipeline import model_from_pipeline
from .scheduler import BNSScheduler

__all__ = ["BNSScheduler", "model_from_pipeline", "DiffusersError"]
