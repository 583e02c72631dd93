"""LoRA on dense projections of the model (mode `full`): attention linears and dense FFNs.

Names follow PEFT so adapters export as-is: `lora_A` [r, in] and `lora_B`
[out, r] on an `nn.Linear` (PEFT orientation); B starts at zero.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F_

from moedist.choices import LORA_TARGETS
from moedist.models.llama import DenseFFN, draw_ffn_
from moedist.moe.ffn import GATED, hidden_act
from moedist.moe.init import is_meta
from moedist.moe.lora_math import lora_dropout, lora_scale


def _kaiming_uniform(fan_in: int, shape, g: torch.Generator) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) on the CPU in fp32: kaiming_uniform(a=sqrt(5)) as PEFT/nn.Linear."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(*shape, generator=g, device="cpu") * 2 - 1) * bound


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * dropout(x) @ lora_A.T @ lora_B.T, base frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: Optional[float] = None, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_rank, self.scaling, self.dropout, self.seed = rank, lora_scale(rank, alpha), dropout, seed
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # [out, r]
        self._gen = torch.Generator().manual_seed(seed + 4099)
        if not is_meta(self.lora_A):  # meta: drawn at materialization
            self.init_weights()

    def init_weights(self) -> None:
        """lora_A ~ kaiming_uniform(a=sqrt(5)) as PEFT from a generator seeded by `seed`; lora_B = 0.
        (The base linear is drawn by the model that owns it.)"""
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.lora_A.copy_(_kaiming_uniform(self.lora_A.shape[1], (self.lora_A.shape[0], self.lora_A.shape[1]), g))
            self.lora_B.zero_()

    def named_generators(self) -> dict:
        """The private LoRA-dropout stream (`moedist.train.rng.OwnsGenerators`)."""
        return {"dropout": self._gen}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def merged_weight(self) -> torch.Tensor:
        """W + s * B @ A in [out, in] orientation."""
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # model.dtype=bfloat16: the frozen base runs in its dtype, the adapter in its own (fp32 masters)
        y = self.base(x.to(self.base.weight.dtype))
        xd = lora_dropout(x.to(self.lora_A.dtype), self.dropout, self.training, self._gen)
        return y + (self.scaling * F_.linear(F_.linear(xd, self.lora_A), self.lora_B)).to(y.dtype)


class LoRAFFN(nn.Module):
    """A frozen dense FFN (math orientation) with a LoRA per targeted projection.

    lora_A_<t> [in, r] (random), lora_B_<t> [r, out] (zeros), t in gate/up/down.
    """

    def __init__(self, dense: DenseFFN, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
                 targets: Sequence[str] = LORA_TARGETS, seed: int = 0):
        super().__init__()
        self.activation = dense.activation
        self.w_gate, self.w_up, self.w_down = dense.w_gate, dense.w_up, dense.w_down
        for p in (self.w_gate, self.w_up, self.w_down):
            if p is not None:
                p.requires_grad_(False)
        self.scaling, self.dropout, self.seed = lora_scale(rank, alpha), dropout, seed
        # the base is drawn like the DenseFFN it came from (at materialization of a meta-built model)
        self.base_seed, self.init_std = dense.seed, dense.init_std
        self.targets = tuple(t for t in targets if t != "gate" or self.w_gate is not None)
        for t in self.targets:
            w = getattr(self, f"w_{t}")
            d_in, d_out = w.shape
            setattr(self, f"lora_A_{t}", nn.Parameter(torch.empty(d_in, rank, dtype=w.dtype, device=w.device)))
            setattr(self, f"lora_B_{t}", nn.Parameter(torch.zeros(rank, d_out, dtype=w.dtype, device=w.device)))
        self._gen = torch.Generator().manual_seed(seed + 4099)
        if not is_meta(self.w_up):  # the base came with its values: draw only the adapters
            self._init_adapters()

    def _init_adapters(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for t in self.targets:
                A = getattr(self, f"lora_A_{t}")
                A.copy_(_kaiming_uniform(A.shape[0], tuple(A.shape), g))
                getattr(self, f"lora_B_{t}").zero_()

    def init_weights(self) -> None:
        """The frozen base as its DenseFFN drew it (seed `base_seed`), then the adapters (seed `seed`)."""
        if self.base_seed is None:
            raise ValueError("LoRAFFN.init_weights: the wrapped FFN had no seed to redraw its base from")
        draw_ffn_(self.w_gate, self.w_up, self.w_down, self.base_seed, self.init_std)
        self._init_adapters()

    def named_generators(self) -> dict:
        """The private LoRA-dropout stream (`moedist.train.rng.OwnsGenerators`)."""
        return {"dropout": self._gen}

    def _proj(self, t: str, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, f"w_{t}")
        y = x.to(w.dtype) @ w  # frozen base in its dtype (model.dtype)
        if t in self.targets:
            A = getattr(self, f"lora_A_{t}")
            xd = lora_dropout(x.to(A.dtype), self.dropout, self.training, self._gen)
            y = y + (self.scaling * (xd @ A @ getattr(self, f"lora_B_{t}"))).to(y.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._proj("gate", x) if self.activation in GATED else None
        return self._proj("down", hidden_act(gate, self._proj("up", x), self.activation))
