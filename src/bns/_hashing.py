"""Hashing tensors by their values, for fingerprints and cache checksums."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tensor_bytes"]


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor's values (no numpy needed: torch alone is a hard dependency)."""
    if t.numel() == 0:
        return b""
    # A clone owns a storage of exactly its own elements (a view's storage may hold more).
    flat = t.detach().cpu().reshape(-1).clone()
    return bytes(flat.view(torch.uint8).untyped_storage())
