"""The one LoRA primitive: the low-rank update of a linear map, for L stacked experts or one dense linear.

A LoRA adapter adds `s * x @ A @ B` to a (frozen) map `x @ W`, with s = alpha / r (`lora_scale`),
A [I, r] drawn at random and B [r, O] zero at the start (math orientation, as the experts store W).

    `LoRA(I, O, r, num_stacked=L)`   A [L, I, r], B [L, r, O]: expert l's rows (sorted by expert,
                                     `counts_L`) use A[l] and B[l] (`grouped_mm`); expert-tagged
                                     with `expert=True`, so EP shards them and checkpoints key them
                                     by global expert id.
    `LoRA(I, O, r)`                  the dense case (L = 1), stored without the leading dim so dense
                                     checkpoints keep their shapes: A [I, r], B [r, O].
    `LoRA(I, O, r, layout="linear")` dense, in `nn.Linear` / PEFT orientation: A [r, I], B [O, r].

The primitive owns the factors (always named `lora_A` / `lora_B`), the update (`delta`), its
merged weight (`merged`) and `adapter_params()`; its owner owns the seeds (each form draws A from
its own generators, see `kaiming_uniform_a5`), the scale and the dropout stream, since one
dropout generator serves all the projections of an owner. `lora_delta` is the update as a pure
function, for the few owners whose factors sit under fixed flat names (a dense FFN's
`lora_A_<proj>`, the spec layers' `lora_A`). Dropout masks come from a private generator, never
the global RNG (`lora_dropout`, and `SeededDropout` for a module with a stream per device).

Shapes: N rows, I / O input / output width of the projection, L stacked experts, r rank.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Dict, List, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F_

from moedist.distributed.grad_sync import mark_expert_param
from moedist.moe.lora_math import dropout_keep, kaiming_uniform_a5, lora_delta, lora_dropout, lora_scale

__all__ = ["AdapterModule", "LoRA", "SeededDropout", "model_adapter_params", "is_lora_factor_key",
           # the pure functions, from lora_math
           "dropout_keep", "kaiming_uniform_a5", "lora_delta", "lora_dropout", "lora_scale"]

LAYOUTS = ("math", "linear")


@runtime_checkable
class AdapterModule(Protocol):
    """A module that says which of its parameters are LoRA adapters (torchtune's `AdapterModule`):
    the parameters a LoRA fine-tune trains, extracts and merges."""

    @abstractmethod
    def adapter_params(self) -> List[nn.Parameter]:
        """The adapter parameters of this module (and its children)."""
        ...


def model_adapter_params(model: nn.Module) -> List[nn.Parameter]:
    """Every parameter an `AdapterModule` inside `model` declares, once each, in `model.parameters()` order."""
    ids = {id(p) for m in model.modules() if isinstance(m, AdapterModule) for p in m.adapter_params()}
    return [p for p in model.parameters() if id(p) in ids]


def is_lora_factor_key(key: str) -> bool:
    """True for a checkpoint key of a LoRA factor held by the primitive (`....lora_A`, `....lora_B`)."""
    return key.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


class LoRA(nn.Module, AdapterModule):
    """LoRA factors of one projection `I -> O` at rank r: `lora_A`, `lora_B` (B starts at zero).

    Args:
        d_in: I. d_out: O. rank: r >= 1.
        num_stacked: L stacked experts (A [L, I, r], B [L, r, O]); None for one dense linear.
        layout: "math" (A [I, r], B [r, O]) or "linear" (dense only: A [r, I], B [O, r], as
            `nn.Linear` weights and PEFT store them).
        expert: tag both factors as expert parameters (stacked only).
        dtype, device: where the factors live (A is left uninitialised: its owner draws it).
    """

    def __init__(self, d_in: int, d_out: int, rank: int, num_stacked: Optional[int] = None, layout: str = "math",
                 expert: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora_rank={rank}: must be >= 1")
        if layout not in LAYOUTS or (layout == "linear" and num_stacked is not None):
            raise ValueError(f"LoRA layout={layout!r}: allowed {', '.join(LAYOUTS)} (linear only for a dense adapter)")
        if expert and num_stacked is None:
            raise ValueError("LoRA(expert=True): expert factors are stacked (num_stacked=L)")
        lead = () if num_stacked is None else (num_stacked,)
        a, b = ((rank, d_in), (d_out, rank)) if layout == "linear" else ((d_in, rank), (rank, d_out))
        self.lora_A = nn.Parameter(torch.empty(*lead, *a, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(*lead, *b, dtype=dtype, device=device))
        if expert:
            mark_expert_param(self.lora_A)
            mark_expert_param(self.lora_B)
        self.layout, self.stacked = layout, num_stacked is not None

    def adapter_params(self) -> List[nn.Parameter]:
        """[lora_A, lora_B]."""
        return [self.lora_A, self.lora_B]

    def delta(self, x: torch.Tensor, counts_L: Optional[Sequence[int]] = None) -> torch.Tensor:
        """x @ A @ B, unscaled, in the factors' dtype (x is cast to it). [N, I] -> [N, O]; stacked:
        rows sorted by expert with counts_L[l] rows for expert l."""
        x = x.to(self.lora_A.dtype)
        if self.layout == "linear":
            return F_.linear(F_.linear(x, self.lora_A), self.lora_B)  # x @ A^T @ B^T
        return lora_delta(x, self.lora_A, self.lora_B, counts_L)

    def merged(self, expert: Optional[int] = None) -> torch.Tensor:
        """The unscaled weight update in the layout's orientation: A @ B [I, O] (math; of stacked slot
        `expert`), B @ A [O, I] (linear)."""
        if self.stacked:
            if expert is None:
                raise ValueError("LoRA.merged: stacked factors need the local expert slot")
            return self.lora_A[expert] @ self.lora_B[expert]
        return self.lora_B @ self.lora_A if self.layout == "linear" else self.lora_A @ self.lora_B

    @torch.no_grad()
    def reset_(self, A: torch.Tensor, expert: Optional[int] = None) -> None:
        """Copy a drawn A (of one stacked slot when `expert` is given, else all of it); B (that slot) = 0."""
        if expert is None:
            self.lora_A.copy_(A)
            self.lora_B.zero_()
        else:
            self.lora_A[expert].copy_(A)
            self.lora_B[expert].zero_()


class SeededDropout(nn.Module):
    """Inverted dropout whose masks come from a private, seeded generator per device.

    The mask of each call is `dropout_keep` (U >= p, U ~ Uniform[0, 1) in float32) drawn from a
    generator owned by this module on the input's device (one per device, each seeded with `seed`
    on first use); kept values are scaled by `1 / (1 - p)`. The generator advances from call to
    call, so masks differ between calls but the sequence of masks is a pure function of `seed`
    (and the shapes). Identity in `eval()` and for `p == 0`; `p == 1` zeroes its input. The global
    RNG is never used. (`lora_dropout` is the functional form with one CPU stream moved to the
    device; this module's masks and scaling are fixed by the `moedist.layers` contract.)

    Args:
        p: drop probability in [0, 1].
        seed: seed of the private generators.
    """

    def __init__(self, p: float, seed: int):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"lora_dropout_rate must be a float in [0, 1], got {p!r}")
        self.p = float(p)
        self.seed = int(seed)
        self._generators: Dict[str, torch.Generator] = {}

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}"

    def named_generators(self) -> Dict[str, torch.Generator]:
        """Per-device mask streams by device (`moedist.train.rng.OwnsGenerators`); the CPU one and the
        current CUDA device's are created here so that a fresh module can be restored."""
        self._generator(torch.device("cpu"))
        if torch.cuda.is_available():
            self._generator(torch.device("cuda", torch.cuda.current_device()))
        return {f"dropout_{key.replace(':', '_')}": g for key, g in self._generators.items()}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        keep = dropout_keep(x.shape, self.p, self._generator(x.device)).to(x.dtype)  # same shape as x
        return x * keep * (1.0 / (1.0 - self.p))

    # torch.Generator objects may not deep-copy; a copy continues from the same state.
    def __deepcopy__(self, memo):
        new = SeededDropout(self.p, self.seed)
        new.training = self.training
        for key, g in self._generators.items():
            g2 = torch.Generator(device=g.device)
            g2.set_state(g.get_state())
            new._generators[key] = g2
        memo[id(self)] = new
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_generators"] = {}
        return state

