"""ComfyUI nodes for bns solvers: **BNS Sampler** (a ``SAMPLER`` for SamplerCustom /
SamplerCustomAdvanced) and **BNS Sigmas** (the solver's grid as ``SIGMAS``).

``bns comfyui install COMFYUI_DIR`` writes ``custom_nodes/bns_nodes/``, a small package that
imports :data:`NODE_CLASS_MAPPINGS` and :data:`NODE_DISPLAY_NAME_MAPPINGS` from here (what
ComfyUI's custom-node loader reads). Importing this package does not import ComfyUI: ``comfy``
is imported when a node runs. The conventions are in :mod:`.conventions`; the set-up and what
is verified in docs/comfyui.md.
"""

from __future__ import annotations

from .conventions import ComfyUIError
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, BNSSampler, BNSSigmas

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "BNSSampler",
    "BNSSigmas",
    "ComfyUIError",
]
