"""Peak memory of one training step, measured the same way for every implementation.

On CUDA: `torch.cuda.max_memory_allocated` minus what was allocated before the
step (the caching allocator's own accounting).

On CPU there is no allocator counter, so `AllocationTracker` counts it: a
`TorchDispatchMode` sees every aten op of the step (the forward and, because the
autograd engine carries the mode into backward, the backward too), adds the
bytes of each output storage the op created, and subtracts them when the
storage is freed (weak reference callback). Storages that existed before the
step (parameters, inputs) and outputs that alias an input (views, in-place and
`out=` ops) are never counted. What it misses, the same for every impl:
scratch space inside a kernel (e.g. a matmul's packing buffers).

Two figures per step, both relative to the memory live when the step starts:
    peak_mem_mb: the highest live total during forward + backward (activations,
                 temporaries and parameter gradients, including gradients an impl
                 keeps allocated between steps: `resident_bytes`);
    act_mem_mb:  the live total right after forward (what the layer keeps for
                 backward, plus its output).
On CPU also what made up the peak (`peak_at`, `peak_live_mb`): the op running when it
was reached, and the live bytes then grouped by the aten op that allocated each storage
(`x @ w` -> aten.mm.default): a memory profile of the step.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MB = 1024.0 * 1024.0


class AllocationTracker(TorchDispatchMode):
    """Live bytes of storages created by ops run under this mode (CPU or any device)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owned: Dict[int, int] = {}  # id(storage) -> bytes
        self._refs: Dict[int, weakref.ref] = {}
        self._origin: Dict[int, str] = {}  # id(storage) -> the op that allocated it
        self._op = ""  # the op running now
        self.live_by_op: Dict[str, int] = {}  # allocating op -> its live bytes now
        self.peak_by_op: Dict[str, int] = {}  # ... when the peak was reached
        self.peak_at = ""  # the op during which the peak was reached

    def _freed(self, key: int, _ref=None) -> None:
        nbytes = self._owned.pop(key, 0)
        self._refs.pop(key, None)
        self.live -= nbytes
        op = self._origin.pop(key, None)
        if op is not None:
            self.live_by_op[op] -= nbytes

    def _track(self, t: torch.Tensor, input_keys: set) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._owned or st.data_ptr() in input_keys:
            return
        nbytes = st.nbytes()
        if nbytes == 0:
            return
        self._owned[key] = nbytes
        self._refs[key] = weakref.ref(st, lambda r, k=key: self._freed(k))
        self._origin[key] = self._op
        self.live_by_op[self._op] = self.live_by_op.get(self._op, 0) + nbytes
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, self._op
            self.peak_by_op = {k: v for k, v in self.live_by_op.items() if v}

    def peak_live_mb(self, top: int = 8) -> Dict[str, float]:
        """The live MB at the peak per allocating op, largest first: the `top` largest and the
        rest as "(other ops)"; the values add up to the peak."""
        rows = sorted(self.peak_by_op.items(), key=lambda kv: -kv[1])
        out = {k: v / MB for k, v in rows[:top]}
        rest = sum(v for _, v in rows[top:])
        if rest:
            out["(other ops)"] = rest / MB
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._op = str(func)
        out = func(*args, **kwargs)
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        input_keys = {a.untyped_storage().data_ptr() for a in inputs if a.untyped_storage().nbytes() > 0}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, input_keys)
        return out


def backward_peak_bytes(out: torch.Tensor, grad: torch.Tensor) -> int:
    """The highest live bytes that `out.backward(grad)` itself allocates (a kernel's backward
    memory, with its forward run outside the tracker)."""
    tracker = AllocationTracker()
    with tracker:
        out.backward(grad)
    return tracker.peak


def measure_step_memory(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None],
                        device: torch.device, resident_bytes: int = 0) -> dict:
    """Run one forward + backward and return {"peak_mem_mb", "act_mem_mb", "mem_method"}, on CPU
    also "peak_at" (the op during which the peak was reached) and "peak_live_mb" (what was live
    then, MB per allocating op, `resident_bytes` as "(kept between steps)"; adds up to the peak).

    `forward()` returns the layer output; `backward(out)` runs its backward.
    Parameter gradients must be cleared by the caller before the call, so
    every impl allocates them afresh inside the step; gradients an impl keeps
    between steps instead (moedist's expert gradients) are `resident_bytes`,
    added to the peak (not to the activations: they are not saved by forward).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = forward()
        torch.cuda.synchronize(device)
        act = torch.cuda.memory_allocated(device) - base
        backward(out)
        del out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return dict(peak_mem_mb=(peak + resident_bytes) / MB, act_mem_mb=act / MB,
                    mem_method="torch.cuda.max_memory_allocated")
    tracker = AllocationTracker()
    with tracker:
        out = forward()
        act = tracker.live
        backward(out)
        del out
    return dict(peak_mem_mb=(tracker.peak + resident_bytes) / MB, act_mem_mb=act / MB,
                mem_method="tracked aten allocations (TorchDispatchMode)",
                peak_at=tracker.peak_at,
                peak_live_mb={**({"(kept between steps)": resident_bytes / MB} if resident_bytes else {}),
                              **tracker.peak_live_mb()})


def use_cached_cpu_allocator() -> bool:
    """Make glibc malloc behave like a caching allocator for the rest of this process.

    By default glibc serves every allocation above its mmap threshold (at most
    32 MiB) with a fresh mmap and unmaps it on free, so the next step pays a page
    fault per 4 KiB again. That taxes implementations that allocate few large
    tensors (moedist's stacked [E, H, F] expert gradients, the dense FFN's
    [T, K*F] activations) and spares those that allocate many small ones (per-expert
    modules). `--cpu-allocator cached` sets M_MMAP_MAX=0 (everything from the heap)
    and M_TRIM_THRESHOLD=1 GiB (freed memory is kept), which is what a GPU's caching
    allocator does; it applies to every impl of the run alike. Returns False where
    glibc's mallopt is not available.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
