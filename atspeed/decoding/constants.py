"""Index and mask tensors that depend only on a size and a device, made once and reused by every decoding step.

Each costs an eager op (a kernel launch on a GPU) when made per step; the decoding loop asks for the same few
shapes at every call. Never write into them: they are shared.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=256)
def _made(kind: str, n: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # usable outside inference mode too (a validation step inside fit)
        if kind == "arange":
            return torch.arange(n, device=device)
        if kind == "eye":
            return torch.eye(n, dtype=torch.bool, device=device)
        if kind == "tril":
            return torch.ones(n, n, dtype=torch.bool, device=device).tril()
        shift = max(n - 1, 1).bit_length()  # "countdown": n - 1 - i in the low bits of a tie-break key
        return (1 << shift) - 1 - torch.arange(n, device=device)


def arange(n: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(n)`` (int64) on ``device``."""
    return _made("arange", n, torch.device(device))


def eye(n: int, device: torch.device) -> torch.Tensor:
    """The bool identity [n, n] on ``device``."""
    return _made("eye", n, torch.device(device))


def tril(n: int, device: torch.device) -> torch.Tensor:
    """The bool lower triangle (diagonal included) [n, n] on ``device``."""
    return _made("tril", n, torch.device(device))


def countdown(n: int, device: torch.device) -> torch.Tensor:
    """``2**b - 1 - arange(n)`` (int64) with ``b`` the bits of ``n - 1``: index ``i``'s tie-break, larger first."""
    return _made("countdown", n, torch.device(device))
