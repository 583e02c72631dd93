"""LoRA on dense projections of the model (mode `full`): attention linears and dense FFNs.

Both are built from the one LoRA primitive, `moedist.moe.lora`. An attention projection is a
`LoRALinear`: the dense primitive in `nn.Linear` / PEFT orientation (`lora_A` [r, in], `lora_B`
[out, r]) around the frozen `base` linear, so adapters export to PEFT as they are. A dense FFN is
a `LoRAFFN`: math orientation (`lora_A_<proj>` [in, r], `lora_B_<proj>` [r, out]) next to its
frozen `w_<proj>`; those flat names are what its checkpoints hold, so they are kept, spelt in one
place (`LoRAFFN.factor_names`). B starts at zero everywhere.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from moedist.choices import LORA_TARGETS
from moedist.models.llama import DenseFFN, draw_ffn_
from moedist.moe.ffn import GATED, hidden_act
from moedist.moe.init import is_meta
from moedist.moe.lora import AdapterModule, LoRA, kaiming_uniform_a5, lora_delta, lora_dropout, lora_scale


class LoRALinear(LoRA):
    """y = base(x) + (alpha / r) * dropout(x) @ lora_A.T @ lora_B.T, base frozen (the dense `LoRA`, linear layout)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: Optional[float] = None, dropout: float = 0.0, seed: int = 0):
        super().__init__(base.in_features, base.out_features, rank, layout="linear",
                         dtype=base.weight.dtype, device=base.weight.device)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_rank, self.scaling, self.dropout, self.seed = rank, lora_scale(rank, alpha), dropout, seed
        self._gen = torch.Generator().manual_seed(seed + 4099)
        if not is_meta(self.lora_A):  # meta: drawn at materialization
            self.init_weights()

    def init_weights(self) -> None:
        """lora_A ~ kaiming_uniform(a=sqrt(5)) as PEFT from a generator seeded by `seed`; lora_B = 0.
        (The base linear is drawn by the model that owns it.)"""
        g = torch.Generator().manual_seed(self.seed)
        r, d_in = self.lora_A.shape
        self.reset_(kaiming_uniform_a5((r, d_in), d_in, g))

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
        return self.base.weight + self.scaling * self.merged()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # model.dtype=bfloat16: the frozen base runs in its dtype, the adapter in its own (fp32 masters)
        y = self.base(x.to(self.base.weight.dtype))
        xd = lora_dropout(x.to(self.lora_A.dtype), self.dropout, self.training, self._gen)
        return y + (self.scaling * self.delta(xd)).to(y.dtype)


class LoRAFFN(nn.Module, AdapterModule):
    """A frozen dense FFN (math orientation) with a LoRA per targeted projection.

    lora_A_<t> [in, r] (random), lora_B_<t> [r, out] (zeros), t in gate/up/down: the dense LoRA's
    factors under the flat names this module's checkpoints hold (`factor_names`); the update is the
    primitive's `lora_delta`. Exporters read them through `adapters()`.
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
            w = self._base(t)
            d_in, d_out = w.shape
            a_name, b_name = self.factor_names(t)
            self.register_parameter(a_name, nn.Parameter(torch.empty(d_in, rank, dtype=w.dtype, device=w.device)))
            self.register_parameter(b_name, nn.Parameter(torch.zeros(rank, d_out, dtype=w.dtype, device=w.device)))
        self._gen = torch.Generator().manual_seed(seed + 4099)
        if not is_meta(self.w_up):  # the base came with its values: draw only the adapters
            self._init_adapters()

    @staticmethod
    def factor_names(target: str) -> Tuple[str, str]:
        """The attribute (and checkpoint) names of projection `target`'s factors: lora_A_<t>, lora_B_<t>."""
        return f"lora_A_{target}", f"lora_B_{target}"

    def _base(self, target: str) -> torch.Tensor:
        return {"gate": self.w_gate, "up": self.w_up, "down": self.w_down}[target]

    def adapters(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{projection: (lora_A [in, r], lora_B [r, out])} for each targeted projection."""
        params = dict(self.named_parameters(recurse=False))
        return {t: tuple(params[n] for n in self.factor_names(t)) for t in self.targets}

    def adapter_params(self) -> List[nn.Parameter]:
        """Every lora_A_<t> / lora_B_<t>."""
        return [p for A, B in self.adapters().values() for p in (A, B)]

    def _init_adapters(self) -> None:
        g = torch.Generator().manual_seed(self.seed)  # one stream, drawn in target order
        with torch.no_grad():
            for A, B in self.adapters().values():
                A.copy_(kaiming_uniform_a5(tuple(A.shape), A.shape[0], g))
                B.zero_()

    def init_weights(self) -> None:
        """The frozen base as its DenseFFN drew it (seed `base_seed`), then the adapters (seed `seed`)."""
        if self.base_seed is None:
            raise ValueError("LoRAFFN.init_weights: the wrapped FFN had no seed to redraw its base from")
        draw_ffn_(self.w_gate, self.w_up, self.w_down, self.base_seed, self.init_std)
        self._init_adapters()

    def named_generators(self) -> dict:
        """The private LoRA-dropout stream (`moedist.train.rng.OwnsGenerators`)."""
        return {"dropout": self._gen}

    def _proj(self, t: str, x: torch.Tensor, adapters: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        w = self._base(t)
        y = x.to(w.dtype) @ w  # frozen base in its dtype (model.dtype)
        if t in adapters:
            A, B = adapters[t]
            xd = lora_dropout(x.to(A.dtype), self.dropout, self.training, self._gen)
            y = y + (self.scaling * lora_delta(xd, A, B)).to(y.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ad = self.adapters()
        gate = self._proj("gate", x, ad) if self.activation in GATED else None
        return self._proj("down", hidden_act(gate, self._proj("up", x, ad), self.activation), ad)
