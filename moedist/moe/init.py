"""Weight initialisation that does not care where (or whether yet) a parameter lives.

Every module with parameters allocates them in `__init__` (on the `meta` device when
built under ``torch.device("meta")``) and draws their values in `init_weights()` from
its own seeded CPU generators. A module built on a real device calls `init_weights()`
itself; a meta-built model is sharded first and then materialized
(`moedist.models.materialize`), which allocates only what this rank holds and calls
`init_weights()` on every module. Either way the values are the same bits: draws
happen on the CPU in fp32 and are copied (cast) into the parameter.

Protocol: `init_weights()` sets every parameter and buffer the module registers
directly, plus any child the module documents as its own (e.g. `CausalLM` draws the
attention projections, an expert module its per-expert LoRA stacks).
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class OwnsInit(Protocol):
    """A module that (re)draws its own parameters deterministically from its seeds."""

    def init_weights(self) -> None: ...


def normal_(dst: Optional[torch.Tensor], g: torch.Generator, std: float) -> None:
    """dst <- Normal(0, std) drawn on the CPU from `g` in fp32 (then cast/copied); None is skipped
    without drawing."""
    if dst is not None:
        with torch.no_grad():
            dst.copy_(torch.randn(tuple(dst.shape), generator=g, device="cpu") * std)


def draw_normal(shape: Sequence[int], g: torch.Generator, std: float) -> torch.Tensor:
    """A CPU fp32 Normal(0, std) draw of `shape` from `g`."""
    return torch.randn(tuple(shape), generator=g, device="cpu") * std


def is_meta(*tensors: Optional[torch.Tensor]) -> bool:
    """True when any given tensor is on the meta device (its values are drawn at materialization)."""
    return any(t is not None and t.is_meta for t in tensors)
