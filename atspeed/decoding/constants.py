"""Index and mask tensors that depend only on a size and a device, made once and reused by every decoding step.

Each costs an eager op (a kernel launch on a GPU) when made per step; the decoding loop asks for the same few
shapes at every call. Never write into them: they are shared.
"""

from __future__ import annotations

import functools

import torch

TIE_STEPS_MAX = 2**25
"""The most candidates ``tie_steps`` serves: (i + 1) * 2**-50 stays at most 2**-25, below half a float32 step."""


@functools.lru_cache(maxsize=256)
def _made(kind: str, n: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # usable outside inference mode too (a validation step inside fit)
        if kind == "arange":
            return torch.arange(n, device=device)
        if kind == "eye":
            return torch.eye(n, dtype=torch.bool, device=device)
        if kind == "tril":
            return torch.ones(n, n, dtype=torch.bool, device=device).tril()
        if kind.startswith("column"):  # "column<d>": arange(n) viewed [n, 1, ..., 1] with d ones
            return torch.arange(n, device=device).view(n, *[1] * int(kind[6:]))
        if kind == "tie_steps":
            return torch.arange(1, n + 1, dtype=torch.float64, device=device) * 2.0**-50
        shift = max(n - 1, 1).bit_length()  # "countdown": n - 1 - i in the low bits of a tie-break key
        return (1 << shift) - 1 - torch.arange(n, device=device)


def arange(n: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(n)`` (int64) on ``device``."""
    return _made("arange", n, torch.device(device))


def column(n: int, device: torch.device, dims: int = 1) -> torch.Tensor:
    """``arange(n)`` viewed [n, 1] (``dims`` trailing ones): a batch index that broadcasts against [n, k, ...] indices
    (``x[column(b), idx]`` gathers rows of ``x`` [B, W, ...] in one op, where ``gather`` needs the index expanded)."""
    return _made(f"column{dims}", n, torch.device(device))


def eye(n: int, device: torch.device) -> torch.Tensor:
    """The bool identity [n, n] on ``device``."""
    return _made("eye", n, torch.device(device))


def tril(n: int, device: torch.device) -> torch.Tensor:
    """The bool lower triangle (diagonal included) [n, n] on ``device``."""
    return _made("tril", n, torch.device(device))


def countdown(n: int, device: torch.device) -> torch.Tensor:
    """``2**b - 1 - arange(n)`` (int64) with ``b`` the bits of ``n - 1``: index ``i``'s tie-break, larger first."""
    return _made("countdown", n, torch.device(device))


def tie_steps(n: int, device: torch.device) -> torch.Tensor:
    """``(arange(n) + 1) * 2**-50`` (float64) on ``device``: index ``i``'s relative tie-break step (n <= 2**25)."""
    return _made("tie_steps", n, torch.device(device))


@functools.lru_cache(maxsize=64)
def filler(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0-dim ``value`` of ``dtype`` on ``device``, for ``torch.where`` (a Python number there is made into a tensor
    at every call: one op more)."""
    with torch.inference_mode(False):
        return torch.full((), value, dtype=dtype, device=torch.device(device))


def ninf(like: torch.Tensor) -> torch.Tensor:
    """0-dim -inf of ``like``'s dtype on its device (``torch.where(mask, x, ninf(x))``)."""
    return filler(float("-inf"), like.dtype, like.device)


def tie_floor(device: torch.device) -> torch.Tensor:
    """0-dim float64 ``2**-1000`` on ``device``: the size ``ordered_keys`` gives a zero (hypot(v, it) = |v| else)."""
    return filler(2.0**-1000, torch.float64, device)


def mask_values(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """0-dim ``(0, finfo(dtype).min)`` on ``device``: an additive attention mask's two values."""
    return filler(0.0, dtype, device), filler(torch.finfo(dtype).min, dtype, device)
