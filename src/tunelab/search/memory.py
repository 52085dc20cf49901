"""Measuring training memory: the live bytes of torch tensors, and their peak.

:class:`TensorMemory` is a ``TorchDispatchMode`` (PyTorch's hook under every operator): each
tensor an operator returns is counted once per storage, and uncounted when its storage is
freed (a ``weakref.finalize`` on the storage, which PyTorch keeps alive exactly as long as the
memory). Tensors that exist before the mode starts (the weights) are registered with
:meth:`TensorMemory.track`. The peak is what the advisor predicts and is checked against: the
weights, gradients, optimiser states, saved activations and temporaries of a training step,
on one device, independent of other processes' load (unlike a process's RSS, which adds the
Python and library runtime and the allocator's caching; see docs/search.md for both measured).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storages created under the mode (plus those ``track``ed)."""

    def __init__(self, device: str = "cpu", resizable: bool = False):
        """``resizable``: recount every live storage's size after each operator, for code that frees memory by
        resizing a storage to 0 bytes, which no operator reports (FSDP2's gathered parameters); slower."""
        super().__init__()
        self.device = torch.device(device).type
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.resizable = resizable
        self.storages: dict[int, weakref.ref] = {}

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _count(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device or t.is_meta:
            return
        if hasattr(t, "to_local") and hasattr(t, "device_mesh"):  # a sharded DTensor (FSDP2): this rank's shard
            t = t.to_local()
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without a storage
            return
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key == 0 or key in self.live:
            return
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        if self.resizable:  # keyed by the storage itself: a resize moves its data
            self.storages[key] = weakref.ref(storage)
        else:
            weakref.finalize(storage, self._free, key)

    def _recount(self) -> None:
        """Re-read every live storage's size (and address: a storage resized to 0 bytes frees its address)."""
        live, storages = {}, {}
        for ref in self.storages.values():
            storage = ref()
            if storage is not None:
                key = storage.data_ptr() or -id(storage)  # an emptied storage keeps its place, at no address
                live[key], storages[key] = storage.nbytes(), ref
        self.live, self.storages = live, storages
        self.current = sum(live.values())
        self.peak = max(self.peak, self.current)

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that already exist (weights, buffers, optimiser states)."""
        for t in tensors:
            self._count(t)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.resizable:  # what was resized or freed since the last operator
            self._recount()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._count(t)
        return out


def model_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """Every tensor a training step keeps: parameters, buffers, gradients, optimiser states."""
    out = [p for p in model.parameters()] + [b for b in model.buffers()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        out += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    # bitsandbytes 4-bit weights keep their quantisation state (absmax, code) beside the packed data
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out += [v for v in vars(qs).values() if isinstance(v, torch.Tensor)]
    return out


def mib(nbytes: float) -> float:
    return nbytes / 2**20
