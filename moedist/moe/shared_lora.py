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

from moedist.moe.init import is_meta


class SharedLoRAProj(nn.Module):
    """x @ A @ B for one projection: A [I, r] (Kaiming-uniform, its own generator), B [r, O] (zeros)."""

    def __init__(self, d_in: int, d_out: int, rank: int, seed: int, which: int, dtype=torch.float32, device=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"shared_rank={rank}: must be >= 1 for a shared LoRA expert")
        self.lora_A = nn.Parameter(torch.empty(d_in, rank, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(rank, d_out, dtype=dtype, device=device))
        self.seed, self.which = seed, which
        if not is_meta(self.lora_A):  # meta: the owning experts module draws it at materialization
            self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """A from the generator (seed, projection), disjoint from every routed expert's streams; B = 0."""
        d_in, rank = self.lora_A.shape
        bound = (1.0 / d_in) ** 0.5  # Kaiming-uniform(a=sqrt(5)), as for the routed experts' A
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 80 + self.which)
        self.lora_A.copy_((torch.rand(d_in, rank, generator=g, device="cpu") * 2 - 1) * bound)
        self.lora_B.zero_()

    def delta(self, x_NI: torch.Tensor) -> torch.Tensor:
        """x @ A @ B computed in the adapter's dtype; [N, I] -> [N, O] (unscaled) in x's dtype."""
        return ((x_NI.to(self.lora_A.dtype) @ self.lora_A) @ self.lora_B).to(x_NI.dtype)

    def merged(self) -> torch.Tensor:
        """A @ B [I, O] (unscaled), the weight update in math orientation."""
        return self.lora_A @ self.lora_B


def shared_lora(dims: Dict[str, Tuple[int, int]], targets: Iterable[str], rank: int, seed: int,
                dtype=torch.float32, device=None) -> nn.ModuleDict:
    """One `SharedLoRAProj` per targeted projection in `dims` ({"gate"|"up"|"down": (I, O)}); empty for rank 0.

    `which` is the projection's index in (gate, up, down), so a projection draws the same A whatever
    the other targets are.
    """
    if rank < 0:
        raise ValueError(f"shared_rank={rank}: must be >= 0 (0 = no shared LoRA expert)")
    if rank == 0:
        return nn.ModuleDict()
    return nn.ModuleDict({t: SharedLoRAProj(*dims[t], rank, seed, i, dtype=dtype, device=device)
                          for i, t in enumerate(("gate", "up", "down")) if t in targets and t in dims})
