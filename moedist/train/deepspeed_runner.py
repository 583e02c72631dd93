"""The DeepSpeed runner and its state: a DeepSpeed engine behind `moedist.train.state.Runner`.

    runner = DeepSpeedRunner(model, cfg, dims, device)   # dims from DeepSpeedRunner.process_groups
    runner.full_state() / load_full_state(state)         # fp32 masters, ZeRO-3 partitions gathered/re-scattered
    runner.optimizer_state() / load_optimizer_state(st)  # AdamW state per parameter, full tensors

With `moedist.train.deepspeed_setup` (groups, tagging, engine config) this is the only module
that knows DeepSpeed's internals: engine attributes, ZeRO partitions (`ds_id`), the wrappers
around the torch optimizer and its fp32 master copies. Checkpointing, export and weight
averaging ask the runner through `Runner` and never see them.

Where the values live:

* fp32 ZeRO-0: the client AdamW steps the module's own parameters (the masters) and keys its
  state by them, as for the PyTorch runner.
* ZeRO-0 with bf16/fp16 and ZeRO-1/2/3: the optimizer holds fp32 masters and its state in flat
  partitions; DeepSpeed's `safe_get/set_full_fp32_param` and `safe_get/set_full_optimizer_state`
  gather and scatter them per parameter (collective under ZeRO-3; ZeRO-0 bf16's BF16_Optimizer
  links masters and Adam state to each parameter like ZeRO-1/2). An `FP16_UnfusedOptimizer`
  keeps one master per parameter instead (`_unfused_masters`).
* ZeRO-3: frozen parameters have no master; they are gathered from their partitions to be
  read, and written inside `GatheredParameters(modifier_rank=0)` (every rank writes the same
  full value; each partition group's first rank re-scatters it).

`materialize_optimizer_state` gives AdamW its state before the first step (resume) and links
ZeRO-1/2's per-parameter fragments to it; `set_optimizer_step` sets the bias-correction step.
DeepSpeed's own `engine.save_checkpoint`/`load_checkpoint` are never called: their files are
pickles, and loading them could run code planted in a checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
import torch.nn as nn

from moedist.distributed.grad_sync import clip_grad_norm_
from moedist.train import deepspeed_setup as dss
from moedist.train.nonfinite import GradWatch
from moedist.train.runners import build_optimizer, max_norm
from moedist.train.state import Guard, OptimState, Runner, Weights, collect_full_state, copy_buffers


class DeepSpeedRunner(Runner):
    """A DeepSpeed engine (ZeRO 0/1/2/3, bf16/fp16) around the (parallelized) model.

    Where DeepSpeed's clipping is wrong under EP (fp32 ZeRO-0, `dss.clips_itself`) the runner clips
    with `clip_grad_norm_` between backward and step. `step` hands its guard (None, None): ZeRO 1-3
    drop a step with non-finite gradients themselves, and `nonfinite_grad` names the first one.
    """

    kind = "deepspeed"
    guard_sees_gradients = False

    @classmethod
    def process_groups(cls, cfg, world_size: int, rank: int):
        return dss.init_expert_groups(cfg.parallel.ep_size)

    @classmethod
    def partitioner(cls, cfg, dims):
        return dss.zero3_partitioner(cfg, dims) if cfg.deepspeed.zero_stage == 3 else None

    def __init__(self, model: nn.Module, cfg, dims, device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        ds = cfg.deepspeed
        stage = ds.zero_stage
        dss.prepare_model(model, cfg.parallel.ep_size, stage, dims)
        groups = dss.optimizer_param_groups(model, cfg.train.weight_decay)
        if ds.offload_optimizer == "cpu":  # ZeRO-Offload steps CPU partitions with DeepSpeed's CPU Adam
            optimizer = dss.build_offload_optimizer(groups, cfg.train)
        else:
            optimizer = build_optimizer(groups, cfg.train)
        self.config = dss.ds_config(cfg, dims.world_size)
        self.zero3 = stage == 3
        self.engine = dss.initialize(dss.wrap_for_zero3(model) if self.zero3 else model, optimizer, self.config)
        self.module = model  # the CausalLM (under ZeRO-3 the engine holds a thin wrapper around it)
        self.clips_itself = dss.clips_itself(cfg)
        # fp32 ZeRO-0: the client AdamW itself steps the module's parameters (no masters, state keyed by them)
        self._torch_optimizer = self.engine.optimizer if stage == 0 and not (ds.bf16 or ds.fp16) else None
        self._describe = f"DeepSpeed ZeRO-{stage}, {'bf16' if ds.bf16 else 'fp16' if ds.fp16 else 'fp32'}"
        self._stage = stage
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
            self._norm = float(clip_grad_norm_(trainable, max_norm(self.cfg.train.grad_clip), self.dims))

    def step(self, lr: float, guard: Optional[Guard] = None) -> Optional[float]:
        boundary = self.engine.is_gradient_accumulation_boundary()
        # skip: a non-finite loss has made the gradients non-finite, and ZeRO 1-3 then drop the
        # update themselves (invalid global norm -> overflow path); `skipped` checks that they did.
        skip = boundary and guard is not None and not guard(None, None)
        if boundary:
            set_lr(self.engine, lr)
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
        return global_grad_norm(self.engine)

    def eval_forward(self, batch):
        return self.forward(batch)

    def nonfinite_grad(self) -> Optional[str]:
        """This rank's first parameter (module order) whose gradient of the last step was non-finite
        before DeepSpeed reduced it, or None. One host sync: call it only for a step found bad."""
        return self.watch.first_nonfinite()

    def optimizer_state_numel(self) -> int:
        return optimizer_state_numel(self.engine)

    def describe(self) -> str:
        return self._describe

    def manifest_info(self) -> dict:
        return {"engine": self.kind, "zero_stage": self._stage}

    # ------------------------------------------------------------ state

    def _master(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        """The full value to save for p: its fp32 master (trainable), its gathered ZeRO-3 partition (frozen), or
        None for p itself (collective under ZeRO-3)."""
        value = get_full_fp32_param(self.engine, p) if p.requires_grad else None
        if value is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 partition
            with dss.gathered([p]):
                value = p.detach().clone()
        return value

    def full_state(self) -> Weights:
        return collect_full_state(self.module, self._master)

    def trainable_state(self) -> Weights:
        out = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                value = get_full_fp32_param(self.engine, p)
                out[name] = (p.detach() if value is None else value).to(torch.float32)
        return out

    @torch.no_grad()
    def load_full_state(self, state: Weights) -> None:
        params = dict(self.module.named_parameters())
        if self.zero3:
            import deepspeed

            # every rank writes the same full value; each partition group's first rank re-scatters it
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                for name, p in params.items():
                    p.data.copy_(state[name].to(p.dtype))
        else:
            for name, p in params.items():
                p.data.copy_(state[name].to(device=p.device, dtype=p.dtype))
        copy_buffers(self.module, state)
        if self._torch_optimizer is None:  # the optimizer steps fp32 masters of its own
            materialize_optimizer_state(self.engine)
            for name, p in params.items():
                if p.requires_grad:
                    set_full_fp32_param(self.engine, p, state[name].to(self.device))

    def optimizer_state(self) -> OptimState:
        from moedist.checkpoint import get_torch_optimizer_state

        if self._torch_optimizer is not None:
            return get_torch_optimizer_state(self.module, self._torch_optimizer)
        return get_full_optimizer_state(self.module, self.engine)

    def load_optimizer_state(self, state: OptimState) -> None:
        from moedist.checkpoint import set_torch_optimizer_state

        if self._torch_optimizer is not None:
            set_torch_optimizer_state(self.module, self._torch_optimizer, state)
        else:
            set_full_optimizer_state(self.module, self.engine, state)


# ------------------------------------------------------------------ engine access and state

def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every param group the engine's optimizer steps."""
    opt = engine.optimizer
    seen = set()
    for o in (opt, getattr(opt, "optimizer", None)):
        if o is None or not hasattr(o, "param_groups"):
            continue
        for g in o.param_groups:
            if id(g) not in seen:
                g["lr"] = lr
                seen.add(id(g))


def global_grad_norm(engine) -> Optional[float]:
    """The norm DeepSpeed computed in its last step (ZeRO-1/2/3 and mixed precision), or None."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state DeepSpeed steps (flat partitions under ZeRO)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def optimizer_state_numel(engine) -> int:
    """Elements of optimizer state (exp_avg, exp_avg_sq, ...) held by this rank."""
    total = 0
    for state in inner_optimizer(engine).state.values():
        total += sum(v.numel() for k, v in state.items() if torch.is_tensor(v) and k != "step")
    return total


def _optimizer_flats(engine) -> list:
    """The tensors DeepSpeed's torch optimizer keeps state for (flat fp32 partitions)."""
    inner = inner_optimizer(engine)
    flats = [p for group in inner.param_groups for p in group["params"]]
    flats += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))  # ZeRO-3 swaps these in per step
    return [p for p in flats if p is not None]


def set_optimizer_step(engine, step: int) -> None:
    """Set AdamW's step count (bias correction) on every state DeepSpeed's optimizer holds."""
    inner = inner_optimizer(engine)
    for p in _optimizer_flats(engine):
        st = inner.state.get(p)
        if st and "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def _is_cpu_adam(opt) -> bool:
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # importing does not build the extension

    return isinstance(opt, DeepSpeedCPUAdam)


def materialize_optimizer_state(engine) -> None:
    """Give the optimizer its AdamW state (zeros, step 0) before the first step, so that state
    can be written into it (resume). Torch AdamW creates exactly these lazily at its first step;
    ZeRO-1/2 then link them to each parameter's fragment (`_lazy_init_hp_params_optimizer_state`),
    which `safe_get/set_full_optimizer_state` need; ZeRO-3 keys them by its flat fp32 sub-groups."""
    opt = engine.optimizer
    inner = inner_optimizer(engine)
    cpu_adam = _is_cpu_adam(inner)  # ZeRO-Offload: its C++ step wants an int step count
    if not (isinstance(inner, torch.optim.AdamW) or cpu_adam):
        return
    for p in _optimizer_flats(engine):
        st = inner.state[p]
        if not st:
            st["step"] = 0 if cpu_adam else torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        # ZeRO-1/2 link once, after the first step; at world > 1 the state can be re-keyed after
        # that (the fragments then hold nothing), so link again against the current state.
        opt._hp_optimizer_states_linked = False
        link()


ADAM_STATES = ("exp_avg", "exp_avg_sq")


def optimizer_state_keys(engine) -> tuple:
    """The per-parameter state tensors the engine's optimizer keeps: Adam's two moments, or none (SGD)."""
    inner = inner_optimizer(engine)
    return ADAM_STATES if isinstance(inner, torch.optim.AdamW) or _is_cpu_adam(inner) else ()


def _unfused_masters(engine) -> Optional[Dict[int, torch.Tensor]]:
    """ZeRO-0 with bf16/fp16 and a torch optimizer: {id(model parameter): its fp32 master}, else None.

    DeepSpeed's FP16_UnfusedOptimizer keeps one fp32 copy per parameter (`fp32_groups`, in
    the order of `fp16_groups`) and the torch optimizer's state is keyed by those copies;
    DeepSpeed's `safe_get_full_*` helpers do not know this wrapper (they return None).
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if not isinstance(opt, FP16_UnfusedOptimizer):
        return None
    return {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}


def get_full_fp32_param(engine, p: torch.Tensor) -> Optional[torch.Tensor]:
    """The full fp32 master value of trainable `p` (collective under ZeRO-3), or None if it has none."""
    masters = _unfused_masters(engine)
    if masters is not None:
        return masters.get(id(p))
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p)


def set_full_fp32_param(engine, p: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full fp32 master value of trainable `p` (the module parameter is the caller's)."""
    masters = _unfused_masters(engine)
    if masters is not None:
        if id(p) in masters:
            masters[id(p)].copy_(value.to(masters[id(p)].device))
        return
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, value)


def _get_state(engine, p: torch.Tensor, key: str) -> Optional[torch.Tensor]:
    masters = _unfused_masters(engine)
    if masters is None:
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(p, key)
    hp = masters.get(id(p))
    return None if hp is None else inner_optimizer(engine).state.get(hp, {}).get(key)


def _set_state(engine, p: torch.Tensor, value: torch.Tensor, key: str) -> None:
    masters = _unfused_masters(engine)
    if masters is None:
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(p, value, key)
    elif id(p) in masters:
        inner_optimizer(engine).state[masters[id(p)]][key].copy_(value)


def get_full_optimizer_state(module: nn.Module, engine) -> Dict[str, Dict[str, torch.Tensor]]:
    """{param name: {exp_avg, exp_avg_sq, step}} full tensors from a ZeRO 0-3 engine.

    Collective (DeepSpeed's `safe_get_full_optimizer_state` gathers partitions):
    every rank calls it for the same parameters in the same order.
    """
    keys = optimizer_state_keys(engine)
    if not keys:
        return {}
    materialize_optimizer_state(engine)  # links the state to each parameter's fragment
    step = next((int(st["step"]) for st in inner_optimizer(engine).state.values() if "step" in st), 0)
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        st = {s: v.detach().float().cpu().clone() for s in keys
              if (v := _get_state(engine, p, s)) is not None}
        if st:
            st["step"] = torch.tensor(float(step))
            out[name] = st
    return out


def set_full_optimizer_state(module: nn.Module, engine, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
    """Write full per-parameter Adam state (as `get_full_optimizer_state` returns) into the engine."""
    keys = optimizer_state_keys(engine)
    if not keys:
        return
    materialize_optimizer_state(engine)
    for name, p in module.named_parameters():
        if p.requires_grad and name in state:
            for s in keys:
                if s in state[name]:
                    _set_state(engine, p, state[name][s].to(p.device), s)
    steps = [int(st["step"]) for st in state.values() if "step" in st]
    if steps:
        set_optimizer_step(engine, steps[0])


