"""Optional integrations, imported lazily (``import bns`` imports none of them):

- ``bns.integrations.diffusers``: :class:`BNSScheduler` for diffusers pipelines and
  :func:`model_from_pipeline` (a pipeline as a :class:`bns.Model`; extra ``bns[diffusers]``).
- ``bns.integrations.k_diffusion``: :func:`sample_bns` in k-diffusion's sampler convention and
  :func:`model_from_denoiser` (needs nothing beyond torch).
- ``bns.integrations.flow_matching``: :class:`BNSSolver`, a flow_matching ``Solver``, and
  :func:`model_from_wrapper` (extra ``bns[flow-matching]``).
- ``bns.integrations.comfyui``: the ComfyUI custom nodes (BNS Sampler, BNS Sigmas); ComfyUI
  is imported only when a node runs (``bns comfyui install COMFYUI_DIR``, docs/comfyui.md).
"""
