"""What the k-diffusion and flow_matching adapters share: a network call with fixed keyword
arguments, the bns label passed under the library's own keyword."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["ExtrasNet"]


class ExtrasNet(nn.Module):
    """Holds ``fn`` (a module, so its weights are the model's), ``extras`` passed on every call,
    and ``label_key``, the keyword that carries bns's label ``y``."""

    def __init__(self, fn: Any, label_key: str | None, extras: dict[str, Any]) -> None:
        super().__init__()
        self.fn = fn
        self.label_key = label_key
        self.extras = dict(extras)

    def extras_for(self, y: Tensor | None) -> dict[str, Any]:
        extras = dict(self.extras)
        if y is not None:
            extras[self.label_key] = y
        return extras
