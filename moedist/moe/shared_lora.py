"""The shared LoRA expert of MoE-LoRA (lora.shared_rank): one adapter every token gets.

DeepSeekMoE-style shared expert, in LoRA form: for each targeted projection of the frozen
FFN, S = (alpha / r_s) * A_S B_S with A_S [I, r_s] and B_S [r_s, O]. It is added to the
frozen weight W under every routed expert, so routed expert k's projection is
W + S + D_k and the frozen-FFN path becomes W + S. (Pure low-rank math; the experts module,
`MoELoRAExperts`, decides where S applies.)

The factors are replicated on every rank, NOT expert parameters: they carry no expert tag,
so their gradient is averaged over the whole world (like the router), they are saved once
under `...experts.lora_shared.<proj>.lora_A` / `lora_B`, and EP sharding leaves them whole.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
import torch.nn as nn

from moedist.choices import LORA_TARGETS
from moedist.moe.init import is_meta
from moedist.moe.lora import LoRA, kaiming_uniform_a5


def shared_lora(dims: Dict[str, Tuple[int, int]], targets: Iterable[str], rank: int, seed: int,
                dtype=torch.float32, device=None) -> nn.ModuleDict:
    """One dense `LoRA` (A [I, r], B [r, O], untagged) per targeted projection in `dims`
    ({"gate"|"up"|"down": (I, O)}), drawn unless on the meta device; empty for rank 0."""
    if rank < 0:
        raise ValueError(f"shared_rank={rank}: must be >= 0 (0 = no shared LoRA expert)")
    if rank == 0:
        return nn.ModuleDict()
    targets = tuple(targets)
    mods = nn.ModuleDict({t: LoRA(*dims[t], rank, dtype=dtype, device=device)
                          for t in LORA_TARGETS if t in targets and t in dims})
    if mods and not is_meta(next(iter(mods.values())).lora_A):  # meta: the owning experts module draws it later
        reset_shared_lora(mods, seed)
    return mods


@torch.no_grad()
def reset_shared_lora(mods: nn.ModuleDict, seed: int) -> None:
    """A of each projection from the generator (seed, projection), disjoint from every routed expert's
    streams; B = 0. `which` is the projection's index in (gate, up, down), so a projection draws the same
    A whatever the other targets are."""
    for which, t in enumerate(LORA_TARGETS):
        if t in mods:
            d_in, rank = mods[t].lora_A.shape
            g = torch.Generator().manual_seed(seed * 1_000_003 + 80 + which)
            mods[t].reset_(kaiming_uniform_a5((d_in, rank), d_in, g))
