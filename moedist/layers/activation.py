"""Activation types of the GLU MLPs and the weight initialisation they imply.

The activation decides two things (part of the `moedist.layers` contract):

* the non-linearity `phi` in `(phi(X @ gate_proj) * (X @ up_proj)) @ down_proj`;
* the initialisation family: Xavier for SIGMOID and BILINEAR (activations that
  are roughly linear around zero), Kaiming with fan_in and ReLU gain for RELU,
  GELU and SILU.

Weights here are stored in math orientation `[in, out]` (`y = x @ W`), while
`torch.nn.init` assumes the `torch.nn.Linear` orientation `[out, in]` when it
computes fans. The helpers below therefore apply the `torch.nn.init` function
to the transposed view `W.T` (shape `[out, in]`), so that fan_in is the input
dimension of the projection, and draw into a fresh float32 CPU tensor with a
private `torch.Generator`; the caller copies (casts/moves) the result into the
parameter. That makes the values identical on every device and dtype up to the
final cast, and identical to `torch.manual_seed(seed); init_fn(W.T)` on a
float32 CPU parameter.
"""
from __future__ import annotations

import enum
from typing import Callable, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


class MLPActivationType(enum.Enum):
    """The non-linearity `phi` of a GLU MLP. BILINEAR is the identity."""

    RELU = "relu"
    GELU = "gelu"
    SILU = "silu"
    SIGMOID = "sigmoid"
    BILINEAR = "bilinear"


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _gelu_exact(x: torch.Tensor) -> torch.Tensor:
    # Exact erf form, not the tanh approximation.
    return F.gelu(x, approximate="none")


_ACTIVATIONS = {
    MLPActivationType.RELU: F.relu,
    MLPActivationType.GELU: _gelu_exact,
    MLPActivationType.SILU: F.silu,
    MLPActivationType.SIGMOID: torch.sigmoid,
    MLPActivationType.BILINEAR: _identity,
}


def parse_activation(value: Union[MLPActivationType, str]) -> MLPActivationType:
    """Accept an `MLPActivationType`, or its value/name as a string ("silu", "SILU").

    Raises:
        ValueError: naming `activation_type` and the allowed values.
    """
    if isinstance(value, MLPActivationType):
        return value
    if isinstance(value, str):
        for member in MLPActivationType:
            if value.lower() in (member.value, member.name.lower()):
                return member
    allowed = ", ".join(m.name for m in MLPActivationType)
    raise ValueError(f"activation_type must be an MLPActivationType ({allowed}), got {value!r}")


def activation_fn(activation_type: MLPActivationType) -> Callable[[torch.Tensor], torch.Tensor]:
    """The element-wise function `phi` for `activation_type`."""
    return _ACTIVATIONS[parse_activation(activation_type)]


def uses_xavier(activation_type: MLPActivationType) -> bool:
    """True for the activations initialised with Xavier (SIGMOID, BILINEAR)."""
    return parse_activation(activation_type) in (MLPActivationType.SIGMOID, MLPActivationType.BILINEAR)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def draw_normal_weight(shape_io: Tuple[int, int], activation_type: MLPActivationType, seed: int) -> torch.Tensor:
    """Draw a base projection weight `[in, out]` (float32, CPU).

    Kaiming normal (fan_in = in, ReLU gain: std = sqrt(2 / in)) for RELU, GELU,
    SILU; Xavier normal (std = sqrt(2 / (in + out))) for SIGMOID, BILINEAR.

    Args:
        shape_io: `(in, out)`, the math-orientation shape of the weight.
        activation_type: picks Kaiming or Xavier.
        seed: seed of the private generator used for this one draw.

    Returns:
        A float32 CPU tensor of shape `[in, out]`.
    """
    return _draw(shape_io, activation_type, seed, nn.init.xavier_normal_, nn.init.kaiming_normal_)


def draw_uniform_weight(shape_io: Tuple[int, int], activation_type: MLPActivationType, seed: int) -> torch.Tensor:
    """Draw a LoRA weight `[in, out]` (float32, CPU).

    Kaiming uniform (fan_in = in, ReLU gain: bound = sqrt(6 / in)) for RELU,
    GELU, SILU; Xavier uniform (bound = sqrt(6 / (in + out))) for SIGMOID,
    BILINEAR.

    Args:
        shape_io: `(in, out)`, the math-orientation shape of the weight.
        activation_type: picks Kaiming or Xavier.
        seed: seed of the private generator used for this one draw.

    Returns:
        A float32 CPU tensor of shape `[in, out]`.
    """
    return _draw(shape_io, activation_type, seed, nn.init.xavier_uniform_, nn.init.kaiming_uniform_)


def _draw(shape_io, activation_type: MLPActivationType, seed: int, xavier, kaiming) -> torch.Tensor:
    """Fill a new float32 CPU `[in, out]` tensor through its `[out, in]` view, so torch's
    fan_in is the input dimension; one private generator per draw."""
    w_IO = torch.empty(shape_io, dtype=torch.float32, device="cpu")  # [in, out]
    g = _generator(seed)
    if uses_xavier(activation_type):
        xavier(w_IO.T, generator=g)
    else:
        kaiming(w_IO.T, mode="fan_in", nonlinearity="relu", generator=g)
    return w_IO
