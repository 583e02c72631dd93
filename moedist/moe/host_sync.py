"""Count device->host synchronisations of a block of code, on any device (CPU included).

    with HostSyncCounter() as syncs:
        y, aux = layer(x)
    assert syncs.count == 0, syncs.calls

`torch.cuda.set_sync_debug_mode` only exists on CUDA. Every scalar read of a tensor
(`.item()`, `.tolist()`, `int(t)`, `float(t)`, `bool(t)`, `if t:`) goes through
`aten._local_scalar_dense`, and an op whose output size depends on the data (`nonzero`,
boolean-mask indexing, `masked_select`, `unique`, `bincount` without a static size,
`repeat_interleave` without `output_size`) must read the device before it can allocate:
both kinds block the host on a GPU and break CUDA-graph capture. A `TorchDispatchMode`
sees each such call at the dispatcher, whatever the backend, so CPU tests can count them.
`Tensor.tolist()` and `Tensor.numpy()` read a CPU tensor's memory without the dispatcher
(on a GPU they copy to the host first): the counter wraps both while it is active.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops that read the device: a scalar read, or an output shape known only from the data
_SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten.bincount.default, aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
}


def _is_sync(func, args, kwargs) -> bool:
    if func in _SYNC_OPS:
        return True
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return kwargs.get("output_size") is None  # repeats as a tensor: the output size is sum(repeats)
    if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):  # boolean masks become nonzero
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
    return False

# Tensor methods that read the whole tensor on the host (wrapped while a counter is active)
_HOST_READS = ("tolist", "numpy")


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that records every device->host sync (see the module docstring).

    count: the number of syncs; calls: their op names, in order.
    """

    def __init__(self):
        super().__init__()
        self.calls: List[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, self._wrap(name, orig))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)

    def _wrap(self, name: str, orig: Callable) -> Callable:
        def read(t, *args, **kwargs):
            self.calls.append(name)
            return orig(t, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.calls.append(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)
