"""Bytes that torch operators allocate inside a region, on any device.

torch keeps allocator statistics only for CUDA; on CPU a region's peak is invisible in RSS (glibc reuses freed
blocks, and the process's high-water mark is usually set by loading the model). A dispatch mode sees the
outputs of every operator run in the region and follows the life of their storages, so the peak of what the
region itself allocated (gradients, temporaries) is measured exactly, on CPU as on GPU. Storages that existed
before the region (parameters, buffers) are not counted, even when an operator writes into them in place.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationPeak(TorchDispatchMode):
    """`with AllocationPeak() as a: ...` then `a.peak` (bytes live at the worst moment), `a.total` (bytes
    allocated in all) and `a.current` (bytes still live at the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.total = 0
        self._live: dict[int, int] = {}

    def reset_peak(self) -> int:
        """Start a new peak from what is live now (returned), e.g. to measure a phase after the backward pass."""
        self.peak = self.current
        return self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
            return
        key, size = storage.data_ptr(), storage.nbytes()
        # An output on an input's storage is a view or an in-place result: nothing new was allocated.
        if size == 0 or key in inputs or key in self._live:
            return
        self._live[key] = size
        self.current += size
        self.total += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = set()
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                try:
                    inputs.add(t.untyped_storage().data_ptr())
                except (RuntimeError, NotImplementedError):
                    pass
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out
