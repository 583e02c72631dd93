"""Activation checkpointing (``train.activation_checkpointing``): recompute in backward, keep less.

    apply_activation_checkpointing(model, "moe", model_generators)   # after parallelize(model, ...)

* ``full``: every `DecoderLayer` keeps only its input; attention, norms and the
  FFN/MoE block run again when backward reaches the layer.
* ``moe``: only the MoE FFNs (router, dispatch all-to-all, experts, combine
  all-to-all) are recomputed; attention keeps its activations. The MoE block holds
  most activations of a wide top-k model ([N, F] expert intermediates).

Torch's non-reentrant checkpoint (``use_reentrant=False``) is used with
``early_stop=False``: the recompute always runs the whole block, so every rank of
an EP group issues the same all-to-alls in the same order (a recompute that stopped
after the first all-to-all on one rank and ran on to the second on another could
deadlock). Backward visits layers in reverse on every rank, so recomputes stay in step.

Random streams: torch's checkpoint replays the global CPU/CUDA RNG, but router
noise/jitter and LoRA dropout draw from private generators (`OwnsGenerators`).
`Recompute` snapshots those generators when the block first runs and sets them
back for the recompute (then restores where they had got to), so the recompute
draws the same noise and dropout masks: equal routing, equal results.

Statistics: the `MoEAux` a block returns is the one of the first forward; the
recompute's outputs are discarded by torch, so nothing is counted twice.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from moedist.choices import ACT_CKPT_MODES as MODES


class Recompute:
    """Call ``fn(*args)`` under non-reentrant checkpoint, replaying `generators` in the recompute.

    Outside autograd (no grad, eval) it is a plain call: nothing to save.
    """

    def __init__(self, generators: List[torch.Generator]):
        self.generators = list(generators)

    def __call__(self, fn: Callable, *args):
        if not torch.is_grad_enabled():
            return fn(*args)
        gens = self.generators
        start = [g.get_state() for g in gens]  # where the first forward starts drawing
        calls = [0]

        def run(*a):
            calls[0] += 1
            if calls[0] == 1:
                return fn(*a)
            now = [g.get_state() for g in gens]
            for g, s in zip(gens, start):
                g.set_state(s)
            try:
                return fn(*a)
            finally:  # the stream goes on from where the training forward left it
                for g, s in zip(gens, now):
                    g.set_state(s)

        return checkpoint(run, *args, use_reentrant=False, early_stop=False, preserve_rng_state=True)


def apply_activation_checkpointing(model: nn.Module, mode: str,
                                   generators_of: Callable[[nn.Module], Dict[str, torch.Generator]]) -> int:
    """Make the decoder layers of `model` recompute per `mode` (in place); returns the blocks wrapped.

    Args:
        model: a built (and parallelized) `CausalLM`.
        mode: "none", "moe" or "full".
        generators_of: ``module -> {name: generator}`` of the private random streams a
            block draws from (the trainer passes `moedist.train.rng.model_generators`).
    """
    from moedist.models.llama import DecoderLayer
    from moedist.moe.layer import MoELayer

    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: allowed {', '.join(MODES)}")
    wrapped = 0
    for layer in model.modules():
        if not isinstance(layer, DecoderLayer):
            continue
        layer.recompute_layer = layer.recompute_mlp = None
        if mode == "full":
            layer.recompute_layer = Recompute(list(generators_of(layer).values()))
            wrapped += 1
        elif mode == "moe" and isinstance(layer.mlp, MoELayer):
            layer.recompute_mlp = Recompute(list(generators_of(layer.mlp).values()))
            wrapped += 1
    return wrapped


class SavedBytes:
    """Bytes of tensors autograd keeps between forward and backward (saved-tensor hooks).

        with SavedBytes() as sb:
            loss = model(x, y).loss
        sb.bytes     # activations kept for backward, outside any checkpointed block

    Storages are counted once however many ops save them (views, weights shared by
    ops). Parameters are skipped (they are not activations). Inside a checkpointed
    block torch's own hooks take over, so only what the checkpoint keeps is counted;
    add `checkpoint_inputs` for the block inputs a checkpoint holds on to.
    """

    def __init__(self, model: nn.Module = None):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        self.seen: Dict[int, int] = {}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in self.params and t.device.type != "meta":
            self.seen[key] = max(self.seen.get(key, 0), st.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
