"""Two ways to take an optimizer step over a global batch, behind one small interface.

* `PlainRunner`: PyTorch only. Gradients are reduced by
  `moedist.distributed.sync_gradients` (non-expert over the world, experts over
  their expert-data-parallel group) and clipped by the true global norm
  (`clip_grad_norm_`, each expert counted once).
* `DeepSpeedRunner`: a DeepSpeed engine (ZeRO 0/1/2/3, bf16/fp16); every
  DeepSpeed internal it needs lives in `moedist.train.deepspeed_setup`.

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
import dataclasses
import math
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from moedist.distributed.grad_sync import clip_grad_norm_, sync_gradients
from moedist.train import deepspeed_setup as dss
from moedist.train.nonfinite import GradWatch
from moedist.train.param_groups import decay_groups


def build_optimizer(param_groups: List[dict], train_cfg) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay per group) or SGD over `param_groups`."""
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(param_groups, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), eps=1e-8,
                             weight_decay=train_cfg.weight_decay, foreach=False)


def _max_norm(clip: float) -> float:
    return clip if clip > 0 else math.inf  # inf: measure the norm, never scale


def first_nonfinite_grad(module: nn.Module) -> Optional[str]:
    """Name of the first parameter (module order) whose gradient holds a NaN/Inf on this rank, or None."""
    named = [(n, p.grad) for n, p in module.named_parameters() if p.requires_grad and p.grad is not None]
    if not named:
        return None
    ok = torch.stack([torch.isfinite(g).all() for _, g in named]).cpu()  # one sync for all parameters
    if bool(ok.all()):
        return None
    return named[int((~ok).nonzero()[0])][0]


class PlainRunner:
    """Single- or multi-process training with moedist's own gradient reduction."""

    kind = "pytorch"
    skipped = False  # a non-finite step is skipped before it reaches the optimizer (see step's guard)

    def __init__(self, model: nn.Module, cfg, dims, device: torch.device):
        self.module = model.to(device)
        self.cfg, self.dims, self.device = cfg, dims, device
        self.optimizer = build_optimizer(decay_groups(model, cfg.train.weight_decay), cfg.train)
        self._accum = 0

    def forward(self, batch):
        return self.module(batch.input_ids, batch.labels, batch.position_ids, batch.segment_ids,
                           domain_ids=batch.domain_ids)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum).backward()
        self._accum += 1

    def step(self, lr: float, guard: Optional[Callable[[Optional[float], Optional[str]], bool]] = None) -> Optional[float]:
        """Called after every micro-batch; steps at the accumulation boundary and returns the grad norm."""
        if self._accum < self.cfg.train.grad_accum:
            return None
        self._accum = 0
        sync_gradients(self.module, self.dims)
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        bad = first_nonfinite_grad(self.module) if guard is not None else None  # before clipping spreads it
        norm = clip_grad_norm_(trainable, _max_norm(self.cfg.train.grad_clip), self.dims)
        if guard is not None and not guard(float(norm), bad):
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def eval_forward(self, batch):
        return self.forward(batch)

    def nonfinite_grad(self) -> Optional[str]:
        """The step's guard already got the first non-finite gradient's name (see `step`)."""
        return None

    def optimizer_state_numel(self) -> int:
        return sum(v.numel() for s in self.optimizer.state.values() for k, v in s.items()
                   if torch.is_tensor(v) and k != "step")


class DeepSpeedRunner:
    """A DeepSpeed engine around the (parallelized) model."""

    kind = "deepspeed"

    def __init__(self, model: nn.Module, cfg, dims, device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        stage = cfg.deepspeed.zero_stage
        dss.prepare_model(model, cfg.parallel.ep_size, stage, dims)
        groups = dss.optimizer_param_groups(model, cfg.train.weight_decay)
        if cfg.deepspeed.offload_optimizer == "cpu":  # ZeRO-Offload steps CPU partitions with DeepSpeed's CPU Adam
            optimizer = dss.build_offload_optimizer(groups, cfg.train)
        else:
            optimizer = build_optimizer(groups, cfg.train)
        self.config = dss.ds_config(cfg, dims.world_size)
        self.zero3 = stage == 3
        self.engine = dss.initialize(dss.wrap_for_zero3(model) if self.zero3 else model, optimizer, self.config)
        self.module = model  # the CausalLM (under ZeRO-3 the engine holds a thin wrapper around it)
        self.clips_itself = dss.clips_itself(cfg)
        self._norm: Optional[float] = None
        self.skipped = False  # the last boundary step was dropped by DeepSpeed (non-finite gradients)
        # DeepSpeed reduces gradients away from p.grad (and zeroes them after an invalid norm):
        # hooks note which one was non-finite as backward produced it (train.nonfinite=stop names it)
        self.watch = GradWatch(model)

    def forward(self, batch):
        out = self.engine(batch.input_ids, batch.labels, batch.position_ids, batch.segment_ids,
                          domain_ids=batch.domain_ids)
        if not self.zero3:
            return out
        # Backward must start from the tensor the engine returned (it carries ZeRO-3's hooks).
        return dataclasses.replace(self.engine.module.last_output, loss=out)

    def backward(self, loss: torch.Tensor) -> None:
        at_boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        if self.zero3:
            self.engine.module.last_output = None  # do not keep the logits alive until the next forward
        if at_boundary and self.clips_itself:
            # ZeRO-0 fp32: grads are reduced now; DeepSpeed's own clip would average
            # per-rank norms under EP, so clip by the true global norm here.
            trainable = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
            self._norm = float(clip_grad_norm_(trainable, _max_norm(self.cfg.train.grad_clip), self.dims))

    def step(self, lr: float, guard: Optional[Callable[[Optional[float], Optional[str]], bool]] = None) -> Optional[float]:
        boundary = self.engine.is_gradient_accumulation_boundary()
        # skip: a non-finite loss has made the gradients non-finite, and ZeRO 1-3 then drop the
        # update themselves (invalid global norm -> overflow path); `skipped` checks that they did.
        skip = boundary and guard is not None and not guard(None, None)
        if boundary:
            dss.set_lr(self.engine, lr)
        before = self.engine.skipped_steps
        self.engine.step()
        self.skipped = boundary and self.engine.skipped_steps > before
        if boundary:
            self.watch.end_window()
        if skip and not self.skipped:
            raise RuntimeError("train.nonfinite=skip: DeepSpeed applied a step whose loss was non-finite")
        if not boundary:
            return None
        if self.clips_itself:
            return self._norm
        return dss.global_grad_norm(self.engine)

    def eval_forward(self, batch):
        return self.forward(batch)

    def nonfinite_grad(self) -> Optional[str]:
        """This rank's first parameter (module order) whose gradient of the last step was non-finite
        before DeepSpeed reduced it, or None. One host sync: call it only for a step found bad."""
        return self.watch.first_nonfinite()

    def optimizer_state_numel(self) -> int:
        return dss.optimizer_state_numel(self.engine)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was)
