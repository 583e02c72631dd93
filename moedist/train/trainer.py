"""The training loop: model + expert parallelism + runner (PyTorch or DeepSpeed) + data + outputs.

    trainer = Trainer(cfg)                 # torch.distributed already initialised (run.py does it)
    result = trainer.train()               # metrics.jsonl, summary, plot, checkpoints under output_dir

One optimizer step consumes a global batch of world * grad_accum *
micro_batch_size sequences; rank r takes grad_accum consecutive micro-batches
(`data.micro_batch_position`), so layouts with the same global batch and
micro-batch size see the same micro-batches and the same losses.

`train/preflight.py` holds every check that needs more than the config; the
trainer runs it unless its caller did (the CLI does, before the process group).

Failure behaviour (README "Failure behaviour"): every rank checks at start that all
ranks resolved the same config and model (`consistency.check_same_config`); before
each optimizer step the ranks agree (one MAX all-reduce) on a pending SIGTERM/SIGUSR1
(`signals.PreemptionSignals`: finish the step, save, exit 0) and on a non-finite loss
or gradient (`train.nonfinite`: stop with one line, or skip the update everywhere).
`train.resume=auto` takes the newest checkpoint that verifies; `train.keep_last`
rotates old ones. Every random stream is saved per rank (`train.rng`).

Test-only hook (read in `_nan_hook`): MOEDIST_TEST_NAN_STEP=N makes the loss of step N
NaN; MOEDIST_TEST_NAN_STEP=N:PARAM instead fills PARAM's gradient with NaN after the
last backward of step N; MOEDIST_TEST_NAN_RANK=R limits either to rank R.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from moedist.config import ConfigError, save_config
from moedist.data.batch import Batch
from moedist.train.data import ByteLMData, micro_batch_position
from moedist.train.metrics import MetricsWriter, StepStats
from moedist.train.preflight import load_data, preflight, resolve_hf, run_tokenizer
from moedist.train.progress import Progress, summary_table
from moedist.train.schedule import lr_from_config
from moedist.train.signals import PreemptionSignals


# ------------------------------------------------------------------ results

@dataclass
class TrainResult:
    records: List[dict]
    summary: dict
    final_step: int
    val_loss: Optional[float] = None
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def evaluate_lm(forward: Callable, module: torch.nn.Module, batch_fn: Callable[[int, int], Batch], batches: int,
                micro_batch_size: int, device: torch.device) -> tuple:
    """(summed cross-entropy, counted tokens) of `forward` over `batches` validation micro-batches in all.

    `batch_fn(index, count)` gives validation micro-batch `index`; micro-batches 0 .. batches-1
    are split across the ranks (rank r takes r, r + W, r + 2W, ...), so every world size
    evaluates the same sequences and gets the same loss. A rank with no micro-batch left in
    the last round still runs one (EP layers all-to-all: every rank must call forward as
    often) and counts nothing. Collective when a process group exists. The mean loss is
    sum / tokens: token-weighted, masks honoured.
    """
    from moedist.train.runners import eval_mode

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = torch.zeros(2, dtype=torch.float64)
    with eval_mode(module):
        for b in range(-(-batches // world)):
            index = b * world + rank
            out = forward(batch_fn(index % batches, micro_batch_size).to(device))
            if index < batches:
                total += torch.tensor([float(out.lm_loss_sum), float(out.num_loss_tokens)], dtype=torch.float64)
    if world > 1:
        buf = total.to(device)
        dist.all_reduce(buf)
        total = buf.cpu()
    return float(total[0]), float(total[1])


def load_weights(cfg, model, verify: bool = True) -> None:
    """model.from_hf / model.init_from into this rank's materialized model (experts by global id); verify=False
    skips init_from's checksums (verified by an earlier call)."""
    if cfg.model.from_hf is not None:
        from moedist.models.hf import load_hf_weights_into

        load_hf_weights_into(model, cfg.model.from_hf)  # reads only this rank's experts; moe_lora: FFN = base
    if cfg.model.init_from is not None:  # a moedist checkpoint (convert from-hf/upcycle, a run): step 0
        from moedist.train.init_from import load_init_weights

        load_init_weights(model, cfg.model.init_from, verify=verify)  # this rank's experts by global id


class NonFiniteError(ConfigError):
    """train.nonfinite=stop: one line naming the step and the first non-finite gradient (or the loss)."""


def _nan_hook(rank: int):
    """Test-only (see module docstring): (step, param name or None) to poison on this rank, or None."""
    spec = os.environ.get("MOEDIST_TEST_NAN_STEP")
    only = os.environ.get("MOEDIST_TEST_NAN_RANK")
    if not spec or (only is not None and int(only) != rank):
        return None
    step, _, param = spec.partition(":")
    return int(step), (param or None)


def _mean(sum_count: tuple) -> float:
    return sum_count[0] / max(1.0, sum_count[1])


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    """Builds everything for one run of `cfg` in this process (one rank).

    Args:
        cfg: a validated `MoedistConfig`.
        model_init: optional `fn(model)` called on this rank's materialized model (experts
            already sharded, dispatchers not yet wired), e.g. to load a dense base into LoRA-MoE layers.
        write_outputs: False keeps rank 0 from writing output_dir (tests).
        save_checkpoints: False skips checkpoints (tests).
        console: show the progress bar and summary on rank 0.
        eval_data: extra named validation sets {name: ByteLMData} evaluated with the
            run's own data at eval time and at the end (`val_loss_<name>`).
        signals: an already-entered `PreemptionSignals` (the CLI installs it before start-up, so a
            signal during start-up is kept); default: train() installs its own.
        data: what `preflight(cfg, world_size)` returned when the caller ran it already (the CLI does,
            before the process group exists); default: the trainer runs it.
    """

    def __init__(self, cfg, model_init: Optional[Callable] = None, write_outputs: bool = True,
                 console: bool = True, eval_data: Optional[dict] = None, save_checkpoints: bool = True,
                 signals: Optional[PreemptionSignals] = None, data=None):
        from moedist.models import moe_layers, parallelize

        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        data = preflight(cfg, self.world) if data is None else data
        cfg = resolve_hf(cfg)  # a Hugging Face checkpoint decides the architecture
        self.cfg = cfg
        self.is_main = self.rank == 0
        self.write = write_outputs and self.is_main
        self.console = console
        self.save_checkpoints = save_checkpoints
        self.device = _device()
        self.data = data  # opened (and tokenized if new) by preflight
        self.tokenizer = run_tokenizer(cfg, self.data)
        self.eval_data = dict(eval_data or {})
        torch.manual_seed(cfg.train.seed)
        ep = cfg.parallel.ep_size
        from moedist.train.runners import runner_class

        Runner = runner_class(cfg)  # PyTorch or DeepSpeed, behind moedist.train.state.Runner
        self.dims = Runner.process_groups(cfg, self.world, self.rank)
        from moedist.models.materialize import build_local_model, build_meta_model
        from moedist.train.memory import MemoryMeter

        self.memory = MemoryMeter(self.device)  # baseline right before the model: peak_mem_mb counts from here
        meta = build_meta_model(cfg)  # structure only: no rank ever holds the whole model
        from moedist.train.consistency import check_same_config

        check_same_config(cfg, meta, self.device)  # before the first collective that could hang on a mismatch
        self.total_params = sum(p.numel() for p in meta.parameters())
        self.trainable_params = sum(p.numel() for p in meta.parameters() if p.requires_grad)
        # shard on meta, then allocate and draw only this rank's experts and the replicated parts
        partition = Runner.partitioner(cfg, self.dims) if model_init is None else None
        if partition is not None:  # ZeRO-3: one decoder layer whole at a time
            from moedist.models.materialize import build_partitioned_model

            calls = []  # per layer, while only that layer is real; checksums once

            def load(m) -> None:
                load_weights(cfg, m, verify=not calls)
                calls.append(1)

            model = build_partitioned_model(cfg, partition, self.dims.ep_rank, ep, device=self.device,
                                            meta_model=meta,
                                            load=load if cfg.model.from_hf or cfg.model.init_from else None)
        else:  # (model_init writes whole tensors: ZeRO-3 then partitions in deepspeed.initialize)
            model = build_local_model(cfg, self.dims.ep_rank, ep, device=self.device, meta_model=meta)
            load_weights(cfg, model)
        if model_init is not None:
            model_init(model)
        parallelize(model, self.dims.ep_comm)  # experts are sharded already: wires the dispatchers
        if cfg.train.activation_checkpointing != "none":  # after parallelize: the recompute runs the all-to-all again
            from moedist.models.act_ckpt import apply_activation_checkpointing
            from moedist.train.rng import model_generators

            apply_activation_checkpointing(model, cfg.train.activation_checkpointing, model_generators)
        self.num_moe_layers = len(moe_layers(model))
        self._poison = None  # test hook where gradients leave p.grad in backward (DeepSpeed), see _nan_hook
        spec = _nan_hook(self.rank)
        if not Runner.guard_sees_gradients and spec is not None and spec[1] is not None:
            from moedist.train.nonfinite import poison_hook  # test hook: the NaN enters inside backward

            self._poison = poison_hook(dict(model.named_parameters())[spec[1]])  # before the runner's watch
        self.runner = Runner(model, cfg, self.dims, self.device)
        self.model = self.runner.module
        from moedist.train.balance import ExpertBiasUpdater

        # moe.expert_bias: aux-loss-free balancing from the global routed load, after each optimizer step
        self.bias_updater = ExpertBiasUpdater(self.model, cfg.moe.expert_bias_update_rate)
        self.frozen = None  # moe.freeze_experts (moedist.train.freeze): hooks now, restore around each step
        if cfg.moe.freeze_experts:
            from moedist.train.freeze import FrozenExperts

            self.frozen = FrozenExperts.from_model(self.model, cfg.moe.freeze_experts)
        self.step = 0
        self.position = 0
        self.ckpt_dir = os.path.join(cfg.train.output_dir, "checkpoints")
        self.last_checkpoint: Optional[str] = None
        self.initial_val: Optional[Dict[str, float]] = None   # validation before the first step, when run
        self.skipped_steps = 0  # train.nonfinite=skip: steps whose update was dropped
        self.preempted = False  # every rank agreed to stop after this step (SIGTERM/SIGUSR1/SIGINT)
        self.interrupted = False  # ... and it was Ctrl-C (SIGINT): save only if train.save_on_interrupt
        self.resumed_from: Optional[str] = None
        self._outer_signals = signals
        self._signals = signals or PreemptionSignals(enabled=False)
        self._loss_finite = True
        self._skipped_now = False
        self._nan = _nan_hook(self.rank)
        from moedist.train.averaging import WeightAverages

        self.averages = WeightAverages.from_config(cfg.train)  # EMA/SWA/LAWA (train.ema_decay, swa_start, lawa_k)

    # ---------------------------------------------------------------- pieces

    @property
    def layout(self) -> str:
        ep = self.cfg.parallel.ep_size
        return f"{self.world} rank(s), EP {ep} x EDP {self.world // ep}, {self.runner.describe()}, {self.device.type}"

    def _model_text(self) -> str:
        m, moe, lora = self.cfg.model, self.cfg.moe, self.cfg.lora
        if m.moe_every == 0:
            kind = "dense"
        else:
            cap = "dropless" if not moe.capacity_factor else f"capacity {moe.capacity_factor}"
            kind = f"{moe.num_experts} experts top-{moe.top_k}, {cap}"
        return (f"{m.num_layers} layers, H {m.hidden_size}, {kind}, lora {lora.mode}"
                + (f" r{lora.rank}" if lora.mode != "none" else ""))

    def _barrier(self) -> None:
        if dist.is_initialized() and self.world > 1:
            dist.barrier()

    def _eval(self, batch_fn: Callable[[int, int], Batch], batches: Optional[int] = None) -> tuple:
        return evaluate_lm(self.runner.eval_forward, self.model, batch_fn, batches or self.cfg.train.eval_batches,
                           self.cfg.train.micro_batch_size, self.device)

    def evaluate(self, data: Optional[ByteLMData] = None, batches: Optional[int] = None) -> float:
        """Mean LM loss (no aux, token-weighted) over `batches` validation micro-batches in all (collective).

        data: a byte-level `ByteLMData` (default: the run's own data; with data.sources the
        token-weighted mean over every source's validation split).
        """
        if data is None and self.cfg.data.sources:
            return self.evaluate_all(batches)["val_loss"]
        d = data or self.data
        return _mean(self._eval(lambda i, n: d.val_micro(None, i, n), batches))

    def evaluate_all(self, batches: Optional[int] = None) -> dict:
        """{"val_loss": ..., "val_loss_<source>": ...} (collective).

        With data.sources: one value per source and val_loss = their token-weighted mean;
        plus any extra `eval_data` sets given to the trainer.
        """
        out = {}
        if self.cfg.data.sources:
            per = {name: self._eval(lambda i, n, name=name: self.data.val_micro(name, i, n), batches)
                   for name in self.data.names}
            out["val_loss"] = _mean((sum(v[0] for v in per.values()), sum(v[1] for v in per.values())))
            out.update({f"val_loss_{name}": _mean(v) for name, v in per.items()})
        else:
            out["val_loss"] = self.evaluate(batches=batches)
        for name, d in self.eval_data.items():
            out[f"val_loss_{name}"] = self.evaluate(d, batches)
        return out

    def save_tokenizer(self, folder: str) -> None:
        """Write the run's tokenizer beside a checkpoint or export (rank 0), so the folder is self-contained."""
        if self.is_main and os.path.isdir(folder):
            self.tokenizer.save(folder)

    def save(self) -> str:
        """Save a checkpoint of the current step (collective) in the layout-independent moedist format."""
        from moedist.train import checkpointing

        tag = f"step_{self.step:06d}"
        self.last_checkpoint = checkpointing.save(self, os.path.join(self.ckpt_dir, tag))
        self.save_tokenizer(self.last_checkpoint)
        if self.is_main:  # after the save: `latest` already names the new one, which rotation never deletes
            checkpointing.rotate(self.ckpt_dir, self.cfg.train.keep_last)
        return self.last_checkpoint

    def _warn(self, message: str) -> None:
        if self.is_main:
            import sys

            print(f"moedist: warning: {message}", file=sys.stderr, flush=True)

    def resume_path(self) -> Optional[str]:
        """The checkpoint `train.resume` names ('auto' = latest in output_dir), or None."""
        spec = self.cfg.train.resume
        if spec is None:
            return None
        if spec == "auto":  # the newest checkpoint that verifies; a warning names each corrupt one skipped
            from moedist.train import checkpointing

            return checkpointing.pick_auto_resume(self.ckpt_dir, self._warn)
        from moedist.train import checkpointing

        return checkpointing.resume_target(spec, self._warn)  # a checkpoint, or a run directory's newest one

    def resume(self) -> bool:
        """Load `train.resume`; True if resumed. Any world size, EP size, ZeRO stage or engine."""
        from moedist.train import checkpointing

        from moedist.checkpoint.io import CorruptCheckpoint, verify_checkpoint

        path = self.resume_path()  # resume=auto: verified already
        if path is None:
            return False
        if self.cfg.train.resume != "auto":
            checkpointing.check_resumable(path)
            try:
                verify_checkpoint(path)
            except CorruptCheckpoint as err:
                raise ConfigError(f"train.resume={path!r}: {err}") from None
        state = checkpointing.load(self, path, verify=False)
        self.step, self.position = int(state["step"]), int(state["position"])
        self._warn_schedule_change(path)
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.resumed_from = path
        return True

    def _warn_traps(self) -> None:
        """One line each for settings that do something other than what they seem to."""
        c = self.cfg
        if c.train.warmup_steps > c.train.max_steps:
            self._warn(f"train.warmup_steps={c.train.warmup_steps} > train.max_steps={c.train.max_steps}: warm-up "
                       f"clamped to {c.train.max_steps} steps")
        from moedist.models.hf_maps import MOE_TYPES

        hf_type = c.model.hf_model_type  # set by the Hugging Face import
        if c.model.from_hf and hf_type in MOE_TYPES and c.moe.capacity_factor:
            self._warn(f"model.from_hf is a {hf_type} model, which routes dropless; moe.capacity_factor="
                       f"{c.moe.capacity_factor} from the config drops tokens over capacity (set "
                       "moe.capacity_factor=null for the model's own routing)")

    def _warn_schedule_change(self, path: str) -> None:
        """One warning line when the LR schedule differs from the one the checkpoint was trained with."""
        from moedist.checkpoint.io import read_manifest

        saved = ((read_manifest(path).get("config") or {}).get("train") or {})
        keys = ("max_steps", "warmup_steps", "lr", "min_lr", "lr_schedule")
        changed = [f"train.{k} {saved[k]} -> {getattr(self.cfg.train, k)}" for k in keys
                   if k in saved and saved[k] != getattr(self.cfg.train, k)]
        if changed:
            self._warn(f"resuming {path} with another learning-rate schedule ({', '.join(changed)}): from step "
                       f"{self.step + 1} the LR follows the new one, not a continuation of the old")

    # ---------------------------------------------------------------- the loop

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns the global metrics record."""
        tr = self.cfg.train
        A, M = tr.grad_accum, tr.micro_batch_size
        lr = lr_from_config(tr, self.step)
        stats = StepStats(self.num_moe_layers, self.cfg.moe.num_experts if self.num_moe_layers else 0)
        t0 = time.perf_counter()
        self.model.train()
        norm = None
        micro = [self.data.train_micro(micro_batch_position(self.position, self.rank, a, A, M), M) for a in range(A)]
        scales = self._loss_scales(micro)
        poison = self._nan if self._nan is not None and self._nan[0] == self.step + 1 else None
        self._loss_finite, self._skipped_now = True, False
        for a, (batch, scale) in enumerate(zip(micro, scales)):
            out = self.runner.forward(batch.to(self.device))
            # token-weighted mean over the global batch: this micro-batch's share of the counted tokens.
            # Added to out.loss (not rebuilt) so backward still starts from the tensor a ZeRO-3 engine returned.
            loss = out.loss if scale == 1.0 else out.loss + out.lm_loss * (scale - 1.0)
            if poison is not None and poison[1] is None:
                loss = loss * float("nan")  # test hook
            self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()))
            if self._poison is not None:  # test hook (DeepSpeed): ZeRO-1/2/3 hold no p.grad
                self._poison.armed = poison is not None and poison[1] is not None and a == A - 1
            self.runner.backward(loss)
            if poison is not None and poison[1] is not None and a == A - 1:
                p = dict(self.model.named_parameters())[poison[1]]  # test hook: KeyError = a typo in the test
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            stats.add(out, batch.input_ids.numel())
            self.bias_updater.add(out.moe_aux)
            # only the last micro-batch reaches the optimizer (the runners step at the accumulation boundary)
            snap = self.frozen.snapshot() if self.frozen is not None and a == A - 1 else None
            got = self.runner.step(lr, guard=self._guard)
            if snap is not None:
                self.frozen.restore(snap)
            norm = got if got is not None else norm
        if norm is not None and not math.isfinite(norm) and not self._skipped_now:  # DeepSpeed: seen after the step
            if not self._guard(norm, self.runner.nonfinite_grad()) and not self.runner.skipped:
                raise RuntimeError("train.nonfinite=skip: the engine applied a step with non-finite gradients")
        if self._skipped_now:  # no optimizer update, no bias update (the same decision on every rank)
            self.bias_updater.reset()
        self.bias_updater.step(self.device if self.device.type == "cuda" else None)
        self.position += self.world * A * M
        self.step += 1
        rec = stats.reduce(self.device if self.device.type == "cuda" else None)
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "loss": rec.pop("loss"), "lm_loss": rec.pop("lm_loss"),
               "aux_loss": rec.pop("aux_loss"), "lr": lr, "grad_norm": norm,
               "tokens_per_s": rec["tokens"] / dt if dt > 0 else None, "step_time_s": dt, **rec,
               "skipped": self._skipped_now, "skipped_steps": self.skipped_steps}
        return rec

    def _guard(self, norm: Optional[float], bad: Optional[str]) -> bool:
        """Before the optimizer step, on every rank: agree on preemption and non-finite values (collective).

        Returns False to skip the update (train.nonfinite=skip); raises NonFiniteError for 'stop'.
        """
        from moedist.train.consistency import agree_flags

        grad_bad = bad is not None or (norm is not None and not math.isfinite(norm))
        preempt, interrupted, loss_bad, grad_bad = agree_flags(
            [self._signals.requested, self._signals.interrupted, not self._loss_finite, grad_bad], self.device)
        self.preempted = self.preempted or preempt
        self.interrupted = self.interrupted or interrupted
        if not (loss_bad or grad_bad):
            return True
        if self.cfg.train.nonfinite == "skip":
            self.skipped_steps += 1
            self._skipped_now = True
            if self.is_main:
                print(f"moedist: warning: step {self.step + 1}: non-finite "
                      f"{'loss' if loss_bad else 'gradient' + (f' of {bad}' if bad else '')}: update skipped "
                      f"on every rank (train.nonfinite=skip; {self.skipped_steps} skipped so far)",
                      file=sys.stderr, flush=True)
            return False
        if loss_bad:
            what = "the loss is non-finite (NaN/Inf)"
        elif bad is not None:
            what = f"the gradient of {bad} is non-finite (NaN/Inf; the first such parameter)"
        elif norm is not None and self.runner.guard_sees_gradients:  # each rank named its own first bad one
            what = "a parameter gradient on another rank is non-finite (NaN/Inf)"
        else:
            what = f"the gradient norm is {norm} (DeepSpeed does not say which parameter)"
        raise NonFiniteError(f"train.nonfinite=stop: step {self.step + 1}: {what}; nothing was saved for this "
                             "step (set train.nonfinite=skip to drop such steps)")

    def _loss_scales(self, micro: List[Batch]) -> List[float]:
        """Per micro-batch factor on its mean LM loss so that the step's gradient is that of the mean over
        every counted token of the global batch (runners average over ranks and micro-batches).

        n_m * world * grad_accum / N_global; exactly 1.0 when every micro-batch counts as many tokens
        (byte-level data), which leaves those runs bit-identical. Collective (one small all-reduce).
        """
        counts = [b.num_loss_tokens for b in micro]
        total = torch.tensor([float(sum(counts))], dtype=torch.float64)
        if dist.is_initialized() and self.world > 1:
            buf = total.to(self.device)
            dist.all_reduce(buf)
            total = buf.cpu()
        n_global = float(total[0])
        if n_global == 0:
            return [0.0 if n == 0 else 1.0 for n in counts]
        return [n * self.world * len(micro) / n_global for n in counts]

    def train(self) -> TrainResult:
        cfg, tr = self.cfg, self.cfg.train
        resumed = self.resume()
        if self.write:
            os.makedirs(tr.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(tr.output_dir, "config.yaml"))
            self.save_tokenizer(tr.output_dir)
        writer = MetricsWriter(tr.output_dir, self.write, tr.tensorboard, resume_step=self.step if resumed else 0)
        bar = Progress(tr.max_steps, self.is_main and self.console, tr.log_every, start=self.step, title=cfg.name,
                       memory=self.memory.peak_mb)
        if resumed:
            bar.print(f"resumed at step {self.step} from {self.resumed_from}")
        self._warn_traps()
        if self.averages is not None:
            self.averages.begin(self)
        bar.print(f"[bold]{cfg.name}[/]: {self._model_text()}; {self.layout}; "
                  f"{self.trainable_params:,}/{self.total_params:,} parameters train")
        t_start = time.perf_counter()
        val = None
        self.initial_val = None
        if tr.eval_every and self.step == 0:  # the starting point of the validation curves
            self.initial_val = self.evaluate_all()
            bar.print("before training: " + "  ".join(f"{k} {v:.4f}" for k, v in self.initial_val.items()))
        records = list(writer.records)  # the same on every rank: each record is all-reduced
        try:
            with (self._outer_signals or PreemptionSignals()) as self._signals:
                while self.step < tr.max_steps:
                    rec = self.train_step()
                    if self.averages is not None:
                        self.averages.after_step(self, skipped=self._skipped_now)
                    if tr.eval_every and self.step % tr.eval_every == 0 and self.step < tr.max_steps:
                        rec.update(self.evaluate_all())
                    if self.step == tr.max_steps:
                        val = self.evaluate_all()
                        rec.update(val)
                    records.append(rec)
                    writer.write(rec)
                    bar.update(rec)
                    saved = False
                    if (tr.save_every and self.step % tr.save_every == 0) or self.step == tr.max_steps:
                        if self.save_checkpoints:
                            self.save()
                            saved = True
                    if self.preempted and self.step < tr.max_steps:  # every rank agreed in _guard
                        keep = not self.interrupted or tr.save_on_interrupt
                        if self.save_checkpoints and not saved and keep:
                            self.save()
                        if not self.interrupted:  # Ctrl-C: `moedist train` prints one line with the resume command
                            bar.print(f"preempted ({self._signals.signal_name or 'signal on another rank'}): saved "
                                      f"{self.last_checkpoint} at step {self.step}; resume with train.resume=auto")
                        break
        finally:
            self._signals = self._outer_signals or PreemptionSignals(enabled=False)
            bar.close()
            writer.close()
        averaged = {}
        if self.averages is not None and self.step == tr.max_steps:  # before final/: `latest` names final
            from moedist.train.averaging import finish

            averaged = finish(self, self.averages, bar.print)  # the end-of-run log: one line each
        final = None
        if self.save_checkpoints and self.step == tr.max_steps:
            from moedist.train import checkpointing

            final = checkpointing.save(self, os.path.join(tr.output_dir, "final"), with_optimizer=False)
            self.save_tokenizer(final)
        elapsed = time.perf_counter() - t_start
        summary = self._summary(records, elapsed, val)
        summary["final"] = final
        summary.update(averaged)
        summary["preempted"] = self.preempted and self.step < tr.max_steps
        summary["interrupted"] = self.interrupted and self.step < tr.max_steps
        summary["skipped_steps"] = self.skipped_steps
        if self.write:
            def write_summary() -> None:
                with open(os.path.join(tr.output_dir, "summary.json"), "w") as fh:
                    json.dump(summary, fh, indent=1)

            write_summary()  # before the plot: a second Ctrl-C while matplotlib draws still leaves the summary
            if tr.plot and records:
                from moedist.train.plot import plot_run

                summary["plot"] = plot_run(writer.path, os.path.join(tr.output_dir, "plot.png"), cfg.name,
                                           records, initial=self.initial_val,
                                           val_label="val loss (" + (", ".join(self.data.names) if cfg.data.sources
                                                                     else cfg.data.source) + ")")
                write_summary()
        if self.is_main and self.console:
            bar.console.print(summary_table(summary))
        self._barrier()
        return TrainResult(records, summary, self.step, (val or {}).get("val_loss"))

    def _summary(self, records: List[dict], elapsed: float, val: Optional[dict]) -> dict:
        last = records[-1] if records else {}
        tps = [r["tokens_per_s"] for r in records[1:] if r.get("tokens_per_s")] or \
              [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
        out = {
            "name": self.cfg.name, "layout": self.layout, "model": self._model_text(),
            "steps": self.step, "tokens": sum(r["tokens"] for r in records), "time_s": elapsed,
            "first_loss": records[0]["loss"] if records else None, "last_loss": last.get("loss"),
            "last_lm_loss": last.get("lm_loss"), "last_aux_loss": last.get("aux_loss"),
            "val_loss": (val or {}).get("val_loss"),
            "tokens_per_s": sum(tps) / len(tps) if tps else None,
            "dropped_frac": (sum(r["dropped_frac"] for r in records) / len(records)) if records else 0.0,
            "expert_load": last.get("expert_load", []),
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            "metrics": os.path.join(self.cfg.train.output_dir, "metrics.jsonl") if self.write else None,
            "checkpoint": self.last_checkpoint, "initial_val": self.initial_val,
        }
        from moedist.train.memory import gather_peaks

        out["peak_mem_mb"] = self.memory.peak_mb()  # this rank, since just before the model was built
        out["peak_mem_mb_per_rank"] = gather_peaks(out["peak_mem_mb"], self.device)  # collective
        for k, v in (val or {}).items():
            out[k] = v
        return out
