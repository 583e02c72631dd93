"""DenseMLPWithLoRA: a GLU MLP with an optional LoRA branch.

Contract (fixed, so results reproduce bit for bit across machines and EP layouts):

    MLP(X) = (phi(X @ gate_proj) * (X @ up_proj)) @ down_proj
    out    = MLP(X) + Dropout_p((alpha / r) * (X @ lora_A @ lora_B))

with p = lora_dropout_rate and alpha = r when lora_alpha is None; lora_rank = 0 means no
LoRA at all (no parameters, no dropout, no RNG use). Weights are stored in math orientation
(`x @ W`), no biases: `up_proj`/`gate_proj` [H, F], `down_proj` [F, H], `lora_A` [H, r],
`lora_B` [r, H]. Computation runs in the parameters' dtype/device; the output has the input's.

Initialisation (`reset_parameters`, called by `__init__`), each draw from its own
`torch.Generator` in float32 on the CPU, then cast/moved (see `activation.py`):
base weights normal (Xavier for SIGMOID/BILINEAR, Kaiming fan_in with ReLU gain otherwise),
seeds up = init_base_seed + 1, gate = + 2, down = + 3; LoRA weights uniform (same family rule),
seeds lora_A = lora_init_base_seed + 1, lora_B = + 2. Dropout masks come from a private
generator seeded with lora_dropout_seed (never the global RNG) and advance call by call; dropout
is off in eval().

Built from the LoRA primitive's pieces in `moedist.moe.lora` (`lora_delta`, `lora_scale`,
`SeededDropout`).
"""
from __future__ import annotations

import math
from typing import List, Optional, Union

import torch
from torch import nn

from moedist.choices import DENSE_LORA_TARGETS as LORA_TARGETS
from moedist.layers.activation import (
    MLPActivationType,
    activation_fn,
    draw_normal_weight,
    draw_uniform_weight,
    parse_activation,
)
from moedist.moe.lora import SeededDropout, lora_delta, lora_scale

_PROJS = ("up", "gate", "down")  # draw order of the per-projection adapters


def check_lora_args(lora_rank: int, lora_alpha: Optional[float], lora_dropout_rate: float) -> float:
    """Validate the LoRA arguments and return the branch scale `alpha / r` (0.0 for r = 0).

    Args:
        lora_rank: r >= 0; 0 disables LoRA.
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
    return 0.0 if lora_rank == 0 else lora_scale(lora_rank, lora_alpha)


def check_positive_int(name: str, value) -> int:
    """Return `value` if it is an int >= 1, else raise ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_dtype(dtype) -> torch.dtype:
    """Return `dtype` if it is a floating-point torch dtype, else raise ValueError."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


class DenseMLPWithLoRA(nn.Module):
    """GLU MLP with an optional whole-MLP LoRA branch.

    Computation runs in the parameters' dtype/device; the output has the input's
    dtype and device. With `lora_rank == 0` there is no LoRA at all: no
    parameters, no dropout and no RNG use.

    Args:
        hidden_size: H, input and output width.
        ffh_size: F, inner width of the GLU.
        activation_type: the non-linearity `phi` (also picks the init family).
        init_base_seed: base seed of the projection weights.
        lora_rank: r; 0 disables LoRA.
        lora_alpha: alpha; None means alpha = r.
        lora_dropout_rate: dropout probability on the LoRA branch.
        lora_dropout_seed: seed of the private dropout generator.
        lora_init_base_seed: base seed of the LoRA weights.
        dtype: parameter dtype.
        device: parameter device.
        lora_target: "mlp" (default, the spec's whole-MLP adapter `lora_A`,
            `lora_B` on the MLP output) or "proj" (separate adapters
            `{up,gate,down}_lora_A/B` on each projection, dropout on the
            adapter input as in PEFT; seeds lora_init_base_seed + 1..6 in the
            order up A, up B, gate A, gate B, down A, down B, drawn with the
            same uniform rule as the whole-MLP form).
    """

    def __init__(
        self,
        hidden_size: int,
        ffh_size: int,
        activation_type: MLPActivationType = MLPActivationType.SILU,
        init_base_seed: int = 42,
        lora_rank: int = 0,
        lora_alpha: Optional[float] = None,
        lora_dropout_rate: float = 0.0,
        lora_dropout_seed: int = 42,
        lora_init_base_seed: int = 42,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        lora_target: str = "mlp",
    ):
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.ffh_size = check_positive_int("ffh_size", ffh_size)
        self.activation_type = parse_activation(activation_type)
        self.init_base_seed = int(init_base_seed)
        self.lora_scale = check_lora_args(lora_rank, lora_alpha, lora_dropout_rate)
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_rank) if lora_alpha is None else float(lora_alpha)
        self.lora_dropout_rate = float(lora_dropout_rate)
        self.lora_dropout_seed = int(lora_dropout_seed)
        self.lora_init_base_seed = int(lora_init_base_seed)
        if lora_target not in LORA_TARGETS:
            raise ValueError(f"lora_target must be one of {LORA_TARGETS}, got {lora_target!r}")
        self.lora_target = lora_target
        dtype = check_dtype(dtype)
        self._phi = activation_fn(self.activation_type)

        h, f, r = self.hidden_size, self.ffh_size, self.lora_rank

        def new(*shape):
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device))

        self.up_proj = new(h, f)  # [H, F]
        self.gate_proj = new(h, f)  # [H, F]
        self.down_proj = new(f, h)  # [F, H]
        self.lora_dropout: Optional[SeededDropout] = None
        if r > 0:
            if lora_target == "mlp":
                self.lora_A = new(h, r)  # [H, r]
                self.lora_B = new(r, h)  # [r, H]
            else:
                for name, (i, o) in zip(_PROJS, ((h, f), (h, f), (f, h))):
                    self.register_parameter(f"{name}_lora_A", new(i, r))  # [in, r]
                    self.register_parameter(f"{name}_lora_B", new(r, o))  # [r, out]
            self.lora_dropout = SeededDropout(self.lora_dropout_rate, self.lora_dropout_seed)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def _lora_names(self) -> List[str]:
        if self.lora_rank == 0:
            return []
        if self.lora_target == "mlp":
            return ["lora_A", "lora_B"]
        return [f"{p}_lora_{ab}" for p in _PROJS for ab in ("A", "B")]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Redraw every weight from its own seeded generator (see module docstring).

        Values are drawn in float32 on CPU and copied into the parameters, so
        they do not depend on the parameters' current dtype or device.
        """
        act = self.activation_type
        for k, name in enumerate(("up_proj", "gate_proj", "down_proj"), start=1):
            p = getattr(self, name)
            p.copy_(draw_normal_weight(tuple(p.shape), act, self.init_base_seed + k))
        for k, name in enumerate(self._lora_names(), start=1):
            p = getattr(self, name)
            p.copy_(draw_uniform_weight(tuple(p.shape), act, self.lora_init_base_seed + k))

    def adapter_params(self) -> List[nn.Parameter]:
        """The LoRA parameters (the ones a LoRA fine-tune trains); [] when r == 0."""
        return [getattr(self, name) for name in self._lora_names()]

    def extra_repr(self) -> str:
        s = f"hidden_size={self.hidden_size}, ffh_size={self.ffh_size}, activation={self.activation_type.name}"
        if self.lora_rank > 0:
            s += (f", lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, "
                  f"lora_dropout_rate={self.lora_dropout_rate}, lora_target={self.lora_target!r}")
        return s

    # --------------------------------------------------------------- forward
    def _proj(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """`x @ W_name`, plus the per-projection adapter when lora_target == "proj"."""
        y = x @ getattr(self, f"{name}_proj")
        if self.lora_rank > 0 and self.lora_target == "proj":
            x_d = self.lora_dropout(x)
            y = y + self.lora_scale * lora_delta(x_d, getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B"))
        return y

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Apply the MLP (and LoRA branch).

        Args:
            input: [b, s, H] (any leading dims work, e.g. [T, H]), any float
                dtype, any device.

        Returns:
            [b, s, H] in the input's dtype and on the input's device.
        """
        if input.shape[-1] != self.hidden_size:
            raise ValueError(f"input must have last dim hidden_size={self.hidden_size}, got shape {tuple(input.shape)}")
        w = self.up_proj
        x = input.to(device=w.device, dtype=w.dtype)  # [b, s, H], computed in the params' dtype
        gate = self._proj(x, "gate")  # [b, s, F]
        up = self._proj(x, "up")  # [b, s, F]
        hid = self._phi(gate) * up  # [b, s, F]
        out = self._proj(hid, "down")  # [b, s, H]
        if self.lora_rank > 0 and self.lora_target == "mlp":
            out = out + self.lora_dropout(self.lora_scale * lora_delta(x, self.lora_A, self.lora_B))  # [b, s, H]
        return out.to(device=input.device, dtype=input.dtype)
