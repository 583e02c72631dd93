"""Two ways to take an optimizer step over a global batch, behind one small interface.

* `PlainRunner`: PyTorch only. Gradients are reduced by
  `moedist.distributed.sync_gradients` (non-expert over the world, experts over
  their expert-data-parallel group) and clipped by the true global norm
  (`clip_grad_norm_`, each expert counted once).
* `DeepSpeedRunner` (`moedist.train.deepspeed_runner`): a DeepSpeed engine (ZeRO 0/1/2/3,
  bf16/fp16); every DeepSpeed internal lives there and in `moedist.train.deepspeed_setup`.

Both implement `moedist.train.state.Runner`, the interface the trainer, checkpointing, export
and weight averaging use (`runner_class(cfg)` picks one by `deepspeed.enabled`).

Both take a `moedist.data.Batch` (input ids, labels, and for packed documents
position and segment ids) and the loss of one micro-batch, and average over
`grad_accum` micro-batches and all ranks; the trainer scales each micro-batch's
LM loss so that one step is the gradient of the token-weighted mean over the
global batch.

`step(lr, guard)` calls `guard(norm, bad)` once per optimizer step, after the gradients
are reduced and before the optimizer runs: the PyTorch runner passes the global
gradient norm (before clipping) and the name of this rank's first parameter whose
reduced gradient is non-finite (or None); DeepSpeed passes (None, None), and after a step
whose norm is non-finite `nonfinite_grad()` names the first parameter whose gradient was
non-finite on this rank (hooks, `moedist.train.nonfinite`). A False
return skips that update (the guard is collective and agrees over ranks).
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Type

import torch
import torch.nn as nn

from moedist.distributed.grad_sync import clip_grad_norm_, sync_gradients
from moedist.moe.experts import keep_expert_grads, keeps_expert_grads, stale_expert_grads
from moedist.train.nonfinite import has_nonfinite
from moedist.train.param_groups import decay_groups
from moedist.train.state import Guard, OptimState, Runner, Weights, collect_full_state, copy_buffers, copy_parameters


def build_optimizer(param_groups: List[dict], train_cfg) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay per group) or SGD over `param_groups`."""
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(param_groups, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), eps=1e-8,
                             weight_decay=train_cfg.weight_decay, foreach=False)


def max_norm(clip: float) -> float:
    return clip if clip > 0 else math.inf  # inf: measure the norm, never scale


def first_nonfinite_grad(module: nn.Module) -> Optional[str]:
    """Name of the first parameter (module order) whose gradient holds a NaN/Inf on this rank, or None."""
    named = [(n, p.grad) for n, p in module.named_parameters() if p.requires_grad and p.grad is not None]
    if not named:
        return None
    bad = torch.stack([has_nonfinite(g) for _, g in named]).cpu()  # one sync for all parameters
    if not bool(bad.any()):
        return None
    return named[int(bad.nonzero()[0])][0]


def runner_class(cfg) -> Type[Runner]:
    """The runner a config asks for: `DeepSpeedRunner` with deepspeed.enabled, else `PlainRunner`."""
    if cfg.deepspeed.enabled:
        from moedist.train.deepspeed_runner import DeepSpeedRunner

        return DeepSpeedRunner
    return PlainRunner


class PlainRunner(Runner):
    """Single- or multi-process training with moedist's own gradient reduction; the module's fp32
    parameters are the weights the optimizer steps, and its state is keyed by them."""

    kind = "pytorch"
    guard_sees_gradients = True
    skipped = False  # a non-finite step is skipped before it reaches the optimizer (see step's guard)

    @classmethod
    def process_groups(cls, cfg, world_size: int, rank: int):
        from moedist.distributed import ParallelDims

        return ParallelDims(world_size, cfg.parallel.ep_size, rank).build()

    def __init__(self, model: nn.Module, cfg, dims, device: torch.device):
        self.module = model.to(device)
        self.cfg, self.dims, self.device = cfg, dims, device
        self.optimizer = build_optimizer(decay_groups(model, cfg.train.weight_decay), cfg.train)
        self._accum = 0
        if keeps_expert_grads(cfg.train.expert_grads, device):
            keep_expert_grads(self.module)  # [E, H, F] gradients kept (marked stale) between steps

    def _zero_grad(self) -> None:
        """Free every gradient but the kept expert weights', which are marked stale (they count as
        zero: the next backward overwrites them) and reused next step. Experts handed back to
        autograd since (`moe.freeze_experts`: hook_expert_grads) are freed like the rest."""
        kept = [(p, p.grad) for p in stale_expert_grads(self.module) if p.grad is not None]
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in kept:
            p.grad = g

    def forward(self, batch):
        return self.module(batch.input_ids, batch.labels, batch.position_ids, batch.segment_ids,
                           domain_ids=batch.domain_ids)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum).backward()
        self._accum += 1

    def step(self, lr: float, guard: Optional[Guard] = None) -> Optional[float]:
        """Called after every micro-batch; steps at the accumulation boundary and returns the grad norm."""
        if self._accum < self.cfg.train.grad_accum:
            return None
        self._accum = 0
        sync_gradients(self.module, self.dims)
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        bad = first_nonfinite_grad(self.module) if guard is not None else None  # before clipping spreads it
        norm = clip_grad_norm_(trainable, max_norm(self.cfg.train.grad_clip), self.dims)
        if guard is not None and not guard(float(norm), bad):
            self._zero_grad()
            return float(norm)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self._zero_grad()
        return float(norm)

    def eval_forward(self, batch):
        return self.forward(batch)

    def nonfinite_grad(self) -> Optional[str]:
        """The step's guard already got the first non-finite gradient's name (see `step`)."""
        return None

    def optimizer_state_numel(self) -> int:
        return sum(v.numel() for s in self.optimizer.state.values() for k, v in s.items()
                   if torch.is_tensor(v) and k != "step")

    def describe(self) -> str:
        return "PyTorch, fp32"

    def manifest_info(self) -> dict:
        return {"engine": self.kind, "zero_stage": 0}

    def full_state(self) -> Weights:
        return collect_full_state(self.module)

    def trainable_state(self) -> Weights:
        return {n: p.detach().to(torch.float32) for n, p in self.module.named_parameters() if p.requires_grad}

    def load_full_state(self, state: Weights) -> None:
        copy_parameters(self.module, state)
        copy_buffers(self.module, state)

    def optimizer_state(self) -> OptimState:
        from moedist.checkpoint import get_torch_optimizer_state

        return get_torch_optimizer_state(self.module, self.optimizer)

    def load_optimizer_state(self, state: OptimState) -> None:
        from moedist.checkpoint import set_torch_optimizer_state

        set_torch_optimizer_state(self.module, self.optimizer, state)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was)
