"""diffusers integration: a BNS scheduler for pipelines, and pipelines as :class:`bns.Model`.

Two directions:

- :class:`BNSScheduler` (:mod:`.scheduler`) runs a trained :class:`bns.NSSolver` inside an
  ordinary diffusers pipeline: ``pipe.scheduler = BNSScheduler.from_solver(solver,
  pipe.scheduler)``.
- :func:`model_from_pipeline` (:mod:`.pipeline`) turns a pipeline (a local folder or an object)
  into a :class:`bns.Model`, so that a solver can be distilled for it (``bns distill --model
  diffusers:PATH``).

Families: class-conditional DiT, unconditional UNet (DDPM/DDIM), Stable Diffusion 1.x/2.x
(epsilon and v), SDXL, SD3/3.5, Flux (packed latents, embedded guidance, true CFG),
PixArt-alpha/Sigma and Wan 2.1/2.2 (video: 5-D latents). Text pipelines encode their prompts and
negative prompt once; the embeddings are conditioning data, outside the model's fingerprint
(``prompts={"train": ..., "val": ..., "test": ...}`` gives held-out prompts). The conventions
of each family, with the diffusers source lines, are in :mod:`._text`.

Conventions (docs/math.md, section 1; flow time ``t``: 0 = noise, 1 = data):

- Flow-matching pipelines (SD3, Flux, Wan: ``FlowMatchEulerDiscreteScheduler``, or UniPC /
  DPM-Solver with ``prediction_type="flow_prediction"`` and ``use_flow_sigmas``) work in
  ``sigma = 1 - t``; the denoiser's output is ``dx/dsigma``. The bns velocity is
  ``u = dx/dt = -output`` and the path is CondOT. The scheduler's timesteps are
  ``sigma * N`` (``N = num_train_timesteps``, 1000); SD3 and Wan hand them to the transformer
  as they are, Flux divides them by 1000 (its transformer takes ``sigma``). The scheduler's
  ``shift`` / ``mu`` (resolution-dependent shifting) only choose diffusers' *inference grid*
  ``sigma -> shift sigma / (1 + (shift - 1) sigma)``; they are not part of the model, so the
  bns model ignores them and a BNS solver uses its own learned times. (The shifted Euler grid
  is ``bns.solvers.euler(1 - shifted_sigmas)``, a natural init.)
- DDPM-style pipelines (epsilon, v_prediction or sample prediction over ``alphas_cumprod``:
  DiT, SD 1.x/2.x, SDXL, PixArt) use :class:`bns.schedules.DiscreteVP`: diffusers timestep
  ``k = (1 - t)(N - 1)``, fractional between the trained integers, with the log-SNR
  interpolated linearly. Their range stops at sigma = sqrt(1 - alphas_cumprod[0]); a solver
  distilled with ``end="data"`` (the default there) ends at sigma = 0 as diffusers'
  ``final_sigmas_type="zero"``.
- Both start from ``x_0 ~ N(0, I)`` at ``t = 0`` (``init_noise_sigma = 1``) and feed the network
  the sample itself (``scale_model_input`` is the identity), as these pipelines expect.
"""

from ._conventions import DiffusersError
from .pipeline import model_from_pipeline
from .scheduler import BNSScheduler

__all__ = ["BNSScheduler", "model_from_pipeline", "DiffusersError"]
