"""Every random stream a training step draws from, saved and restored per rank.

    states = rng_states(model)          # {"torch_cpu": ..., "gen::layers.0.moe.router.noise": ...}
    set_rng_states(model, states)       # after loading a checkpoint at the same layout

Modules that draw from a private `torch.Generator` (router noise and jitter, LoRA
dropout on experts, attention and dense FFNs, `SeededDropout`) declare it by
implementing `OwnsGenerators.named_generators()`; nothing here probes attributes.
The global torch RNG (CPU and the current CUDA device) is saved too. The data
order needs no state: samples are read by global position (`train.data`).

States are uint8 tensors stored in the checkpoint's per-rank safetensors file
(`rng-rank<R>.safetensors`), never pickled.
"""
from __future__ import annotations

from typing import Dict, Protocol, runtime_checkable

import torch
import torch.nn as nn

GEN_PREFIX = "gen::"


@runtime_checkable
class OwnsGenerators(Protocol):
    """A module that draws from private generators: `{short name: generator}` (created if lazy)."""

    def named_generators(self) -> Dict[str, torch.Generator]: ...


def model_generators(model: nn.Module) -> Dict[str, torch.Generator]:
    """`{"<module path>.<name>": generator}` for every module of `model` that owns generators."""
    out: Dict[str, torch.Generator] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, OwnsGenerators):
            for name, g in mod.named_generators().items():
                out[f"{mod_name}.{name}" if mod_name else name] = g
    return out


def rng_states(model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's RNG states as uint8 CPU tensors (global torch RNG + every private generator)."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    for name, g in model_generators(model).items():
        out[GEN_PREFIX + name] = g.get_state().clone()
    return out


def set_rng_states(model: nn.Module, states: Dict[str, torch.Tensor]) -> int:
    """Restore what `rng_states` saved; returns how many private generators were set.

    Raises ValueError naming a generator the model has but `states` lacks (a checkpoint
    from another model or layout must not be restored half-way).
    """
    if "torch_cpu" in states:
        torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])
    gens = model_generators(model)
    missing = [n for n in gens if GEN_PREFIX + n not in states]
    if missing:
        raise ValueError(f"checkpoint has no RNG state for generator {missing[0]}")
    for name, g in gens.items():
        g.set_state(states[GEN_PREFIX + name])
    return len(gens)
