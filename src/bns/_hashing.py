"""Hashing tensors by their values, for fingerprints and cache checksums."""

from __future__ import annotations

import ctypes
from typing import Any

from torch import Tensor

__all__ = ["tensor_bytes", "hash_tensor"]

_CHUNK_BYTES = 1 << 26  # 64 MiB: what a device-to-host copy holds at a time


def _host_view(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def hash_tensor(h: Any, t: Tensor) -> None:
    """Feed the raw bytes of ``t``'s values (row-major) to the hashlib object ``h``.

    No full copy: a contiguous CPU tensor is read in place, any other (a GPU tensor, a view) in
    chunks of 64 MiB, so a network of a billion weights hashes at the hash's own speed
    (sha256: about 1.5 GB/s on one core) with no extra memory.
    """
    t = t.detach()
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and t.is_contiguous():
        h.update(_host_view(t))
        return
    flat = t.reshape(-1)
    step = max(1, _CHUNK_BYTES // t.element_size())
    for s in range(0, flat.numel(), step):
        chunk = flat[s : s + step].to("cpu", copy=True).contiguous()
        h.update(_host_view(chunk))


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor's values, as one ``bytes`` object (small tensors)."""
    if t.numel() == 0:
        return b""
    flat = t.detach().to("cpu").reshape(-1).contiguous()
    return bytes(_host_view(flat))
