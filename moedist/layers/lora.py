"""Small LoRA primitives: argument checks, the low-rank update and seeded dropout.

A LoRA branch adds `(alpha / r) * (x @ lora_A @ lora_B)` to a frozen (or not)
base map, with `lora_A` `[in, r]` and `lora_B` `[r, out]` in math orientation.
Dropout on the branch draws its masks from a private generator seeded by the
caller (never the global RNG), so two modules built with the same arguments give
the same outputs call for call, whatever else the program draws in between.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn


def check_lora_args(lora_rank: int, lora_alpha: Optional[float], lora_dropout_rate: float) -> float:
    """Validate the LoRA arguments and return the branch scale `alpha / r`.

    Args:
        lora_rank: r >= 0; 0 disables LoRA (scale 0.0 is returned).
        lora_alpha: alpha, or None for alpha = r (scale 1).
        lora_dropout_rate: dropout probability p in [0, 1].

    Raises:
        ValueError: naming the offending argument.
    """
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0, got {lora_rank!r}")
    if lora_alpha is not None:
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number or None, got {lora_alpha!r}")
    if isinstance(lora_dropout_rate, bool) or not isinstance(lora_dropout_rate, (int, float)) \
            or not 0.0 <= float(lora_dropout_rate) <= 1.0:
        raise ValueError(f"lora_dropout_rate must be a float in [0, 1], got {lora_dropout_rate!r}")
    if lora_rank == 0:
        return 0.0
    alpha = float(lora_rank) if lora_alpha is None else float(lora_alpha)
    return alpha / float(lora_rank)


def lora_delta(x_TI: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """The low-rank update `scale * (x @ A @ B)`.

    Args:
        x_TI: [..., in] input, already in the adapters' dtype/device.
        lora_A: [in, r].
        lora_B: [r, out].
        scale: alpha / r.

    Returns:
        [..., out] in the adapters' dtype.
    """
    return scale * ((x_TI @ lora_A) @ lora_B)  # [..., in] @ [in, r] @ [r, out] -> [..., out]


class SeededDropout(nn.Module):
    """Inverted dropout whose masks come from a private, seeded generator.

    The mask of each call is `U >= p` with `U ~ Uniform[0, 1)` drawn in float32
    from a generator owned by this module (one per device, each seeded with
    `seed` on first use); kept values are scaled by `1 / (1 - p)`. The generator
    advances from call to call, so masks differ between calls but the sequence
    of masks is a pure function of `seed` (and the shapes). Identity in `eval()`
    and for `p == 0`; `p == 1` zeroes its input. The global RNG is never used.

    Args:
        p: drop probability in [0, 1].
        seed: seed of the private generator.
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
        g = self._generator(x.device)
        u = torch.rand(x.shape, generator=g, device=x.device, dtype=torch.float32)  # same shape as x
        keep = (u >= self.p).to(x.dtype)
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
