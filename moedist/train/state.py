"""The one interface between a runner and everything that reads or writes its state.

    Runner = runner_class(cfg)                           # moedist.train.runners: PyTorch or DeepSpeed
    dims = Runner.process_groups(cfg, world, rank)       # before the model is built
    runner = Runner(model, cfg, dims, device)
    state = runner.full_state()                          # {name: full CPU tensor}, any ZeRO stage (collective)
    runner.load_full_state(state)                        # the inverse (collective)
    optim = runner.optimizer_state()                     # {name: {exp_avg, exp_avg_sq, step}} (collective)
    runner.load_optimizer_state(optim)

Checkpointing (`moedist.train.checkpointing`), export (`moedist.train.export`), weight
averaging (`moedist.train.averaging`) and the trainer talk to a runner only through
`Runner`; where the values live (module parameters, ZeRO partitions, fp32 master copies,
flat optimizer partitions) is the runner's business. The DeepSpeed implementation is in
`moedist.train.deepspeed_runner`, the only place besides `deepspeed_setup` that knows
DeepSpeed's internals.

Every dictionary is keyed by the module's own parameter names (experts stacked per rank,
`[L, ...]`); `moedist.checkpoint` splits experts by global id when it writes them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Dict, Optional

import torch
import torch.nn as nn

Weights = Dict[str, torch.Tensor]
OptimState = Dict[str, Dict[str, torch.Tensor]]
Guard = Callable[[Optional[float], Optional[str]], bool]


class Runner(ABC):
    """One way to take optimizer steps over a model, and the state it holds.

    Attributes:
        kind: the engine's name, written into checkpoint manifests ("pytorch" or "deepspeed").
        guard_sees_gradients: True when `step` hands `guard` the reduced gradient norm and this
            rank's first non-finite gradient before the optimizer runs (gradients stay on
            `p.grad`); False when it hands (None, None) and a bad step is found after it
            (`nonfinite_grad`; DeepSpeed moves gradients into its own buffers during backward).
        module: the model (a `CausalLM`); under ZeRO-3 its parameters are partitions.
        skipped: the last boundary step applied no update (non-finite gradients).
    """

    kind: ClassVar[str]
    guard_sees_gradients: ClassVar[bool]
    module: nn.Module
    skipped: bool

    # ------------------------------------------------------------ set-up

    @classmethod
    @abstractmethod
    def process_groups(cls, cfg, world_size: int, rank: int):
        """The `ParallelDims` this runner trains over (collective; before the model is built)."""

    @classmethod
    def partitioner(cls, cfg, dims) -> Optional[Callable[[list], None]]:
        """A `partition(params)` callback for `moedist.models.materialize.build_partitioned_model` when this
        runner keeps parameters partitioned (ZeRO-3), else None (the model is built whole per rank)."""
        return None

    # ------------------------------------------------------------ the step

    @abstractmethod
    def forward(self, batch):
        """The model's output (`CausalLMOutput`) for one micro-batch."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (averaged over the accumulation steps)."""

    @abstractmethod
    def step(self, lr: float, guard: Optional[Guard] = None) -> Optional[float]:
        """Called after every micro-batch; at the accumulation boundary steps and returns the gradient norm."""

    @abstractmethod
    def eval_forward(self, batch):
        """Forward for evaluation (the caller sets eval mode and no_grad)."""

    @abstractmethod
    def nonfinite_grad(self) -> Optional[str]:
        """This rank's first parameter whose gradient of the last step was non-finite, if the runner can tell."""

    @abstractmethod
    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state (exp_avg, exp_avg_sq, ...) this rank holds."""

    # ------------------------------------------------------------ what it is

    @abstractmethod
    def describe(self) -> str:
        """Engine and precision for the run's layout line, e.g. "PyTorch, fp32" or "DeepSpeed ZeRO-2, bf16"."""

    @abstractmethod
    def manifest_info(self) -> dict:
        """{"engine": kind, "zero_stage": stage} as checkpoint manifests record them."""

    # ------------------------------------------------------------ state

    @abstractmethod
    def full_state(self) -> Weights:
        """{name: full tensor on CPU} of every parameter (fp32: the optimizer's master value where it keeps
        one, gathered from ZeRO-3 partitions) and buffer (its own dtype). Collective: every rank calls it."""

    @abstractmethod
    def trainable_state(self) -> Weights:
        """{name: fp32 value on this rank's device} of every trainable parameter (master values). Entries may
        alias live parameters: copy what you keep. Collective under ZeRO-3."""

    @abstractmethod
    def load_full_state(self, state: Weights) -> None:
        """Write `state` (as `full_state` returns it; every parameter, buffers where present) into the module,
        its partitions and the optimizer's master copies. Collective."""

    @abstractmethod
    def optimizer_state(self) -> OptimState:
        """{name: {state name: full tensor on CPU}} for this rank's trainable parameters, e.g. AdamW's
        exp_avg, exp_avg_sq and step; {} for an optimizer without per-parameter state. Collective."""

    @abstractmethod
    def load_optimizer_state(self, state: OptimState) -> None:
        """Write per-parameter optimizer state (as `optimizer_state` returns it). Collective."""


# ------------------------------------------------------------------ helpers both runners use

@torch.no_grad()
def collect_full_state(module: nn.Module,
                       master: Callable[[nn.Parameter], Optional[torch.Tensor]] = lambda p: None) -> Weights:
    """{name: CPU copy} of `module`'s parameters (fp32) and buffers (own dtype).

    master(p): the full value to save for p instead of p itself (an fp32 master, a gathered
    partition), or None for p's own data.
    """
    out: Weights = {}
    for name, p in module.named_parameters():
        value = master(p)
        out[name] = (p.detach() if value is None else value).to("cpu", torch.float32).clone()
    for name, b in module.named_buffers():
        if b is not None:
            out[name] = b.detach().to("cpu").clone()
    return out


@torch.no_grad()
def copy_buffers(module: nn.Module, state: Weights) -> None:
    """Copy every buffer of `module` that `state` holds (device and dtype of the buffer)."""
    for name, b in module.named_buffers():
        src = state.get(name)
        if b is not None and src is not None:
            b.copy_(src.to(device=b.device, dtype=b.dtype))


@torch.no_grad()
def copy_parameters(module: nn.Module, state: Weights) -> None:
    """Copy every parameter of `module` from `state` (KeyError names one it lacks)."""
    for name, p in module.named_parameters():
        p.data.copy_(state[name].to(device=p.device, dtype=p.dtype))
