"""Count what would stop the host on a GPU, and the eager ops launched, while decoding (on any device, CPU included).

A CUDA kernel launch returns at once; reading a value back does not: ``item``/``bool``/``int`` of a tensor
(``aten._local_scalar_dense``, ``is_nonzero``), data-dependent shapes (``nonzero``, ``masked_select``, ``unique``,
``repeat_interleave`` without ``output_size``, boolean-mask indexing) and copies to the host (``tolist``, ``numpy``,
``cpu``, ``.to("cpu")``) each wait for every queued kernel. ``HostSyncCounter`` records them with a
``TorchDispatchMode`` (every aten op that runs inside it) plus wrappers of the ``Tensor`` methods that read values
back without an aten op on CPU tensors (``tolist``, ``numpy``, ``cpu``: counted on CPU tensors too, as on a GPU
they would be copies). It also counts every aten op (``ops``) and, with ``models`` given, the ops and syncs inside
those models' forwards apart, so the decoder's own host work per target call is ``ops - model_ops``; ``launches``
(and ``model_launches``) count the ops that are not views or aliases, i.e. the kernels a GPU would run (a view such
as ``unsqueeze`` or ``expand`` only costs the host its dispatch). A model's
``base_model`` body counts as the model (the decoders run a bf16 model's body and take float32 logits from its final
hidden state themselves; that head is then the decoder's work): a forward is an outermost entry into either.

On a device (``device=`` a CUDA device), only read-backs of device tensors count: host-resident tensors (the budget
planner's statistics, a read-back's own result) cost nothing there. On a CPU run every tensor is on the host, so
those count too: the CPU count is an upper bound.

Used by the decoding tests (a limit per target call that can fail) and the benchmark's columns.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable
from contextlib import ExitStack

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _reads_back(func, args, kwargs) -> bool:
    """Whether aten op ``func`` with these arguments makes the host wait for the device."""
    if func in _SYNC_OPS:
        return True
    if func in _REPEAT_INTERLEAVE:
        return kwargs.get("output_size") is None
    if func in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    if func in (aten._to_copy.default, aten.to.dtype_layout, aten.to.device, aten.copy_.default):
        return _to_host(func, args, kwargs)
    return False


def _to_host(func, args, kwargs) -> bool:
    """A device-to-host copy (never true on a CPU-only run, where no tensor leaves the host)."""
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    device = kwargs.get("device")
    source = args[0]
    return device is not None and torch.device(device).type == "cpu" and source.device.type != "cpu"


def _is_view(func) -> bool:
    """A view or alias (``unsqueeze``, ``expand``, ``select``, ...): metadata only, no kernel on a GPU."""
    return func.is_view or func is aten._unsafe_view.default


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter(models=[target, draft]) as c: ...``; then ``c.syncs``, ``c.ops``, ``c.model_syncs``,
    ``c.model_ops``, ``c.calls(target)`` (forwards) and ``c.by_op`` (sync counts per op name, for finding them)."""

    def __init__(self, models: Iterable[torch.nn.Module] = (), device: torch.device | str | None = None) -> None:
        super().__init__()
        self.models = list(models)
        self.on_device = device is not None and torch.device(device).type != "cpu"
        self.syncs = self.ops = self.model_syncs = self.model_ops = 0
        self.launches = self.model_launches = 0  # ops that are not views: kernel launches on a GPU
        self.by_op: collections.Counter[str] = collections.Counter()
        self.forwards: collections.Counter[int] = collections.Counter()
        self._inside = self._reading = 0
        self._stack = ExitStack()

    def _count_sync(self, name: str) -> None:
        if self._reading:  # inside a counted tolist/numpy/cpu: its own device-to-host copy is that sync
            return
        if self._inside:
            self.model_syncs += 1
        else:
            self.syncs += 1
            self.by_op[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        launch = not _is_view(func)
        self.launches += launch
        if self._inside:
            self.model_ops += 1
            self.model_launches += launch
        if _reads_back(func, args, kwargs) and self._touches_device(args):
            self._count_sync(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)

    def _touches_device(self, args) -> bool:
        """On a device run, whether any tensor among ``args`` lives on the device (else: always)."""
        if not self.on_device:
            return True
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        flat += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        return any(t.device.type != "cpu" for t in flat)

    def _enter_model(self, key: int, *_) -> None:
        if not self._inside:  # a body inside its own model's forward is the same forward
            self.forwards[key] += 1
        self._inside += 1

    def calls(self, model: torch.nn.Module) -> int:
        """Forwards of ``model`` counted (one of ``models``)."""
        return self.forwards[id(model)]

    def _leave_model(self, *_) -> None:
        self._inside -= 1

    def _wrap_method(self, name: str) -> None:
        original = getattr(torch.Tensor, name)
        counter = self

        def wrapped(tensor, *args, **kwargs):
            if not counter.on_device or tensor.device.type != "cpu":
                counter._count_sync(name)
            counter._reading += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter._reading -= 1

        setattr(torch.Tensor, name, wrapped)
        self._stack.callback(setattr, torch.Tensor, name, original)

    def __enter__(self) -> HostSyncCounter:
        for model in self.models:
            body = getattr(model, "base_model", model)
            for module in (model, body) if body is not model else (model,):
                enter = functools.partial(self._enter_model, id(model))
                self._stack.enter_context(module.register_forward_pre_hook(enter))
                self._stack.enter_context(module.register_forward_hook(self._leave_model, always_call=True))
        for name in ("tolist", "numpy", "cpu"):  # counted on CPU tensors too: on a GPU they would be copies
            self._wrap_method(name)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._stack.close()
