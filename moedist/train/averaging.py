"""Weight averages kept by the trainer: EMA, SWA and LAWA of the trainable weights.

    averages = WeightAverages.from_config(cfg.train)     # None when every one is off
    averages.begin(trainer)                              # after resume: EMA starts from the current weights
    averages.after_step(trainer, skipped)                # after every optimizer step (collective under DeepSpeed)
    results = finish(trainer, averages, print_fn)        # end of run: evaluate, save final_ema/ final_swa/ final_lawa/

* EMA (`train.ema_decay` = d > 0): ema_0 = the weights at step 0 (or at the start of a run
  whose checkpoint held none), ema_t = d * ema_{t-1} + (1 - d) * w_t after every optimizer step t.
* SWA (`train.swa_start` = s > 0): the equal-weight mean of the weights after every step
  t = s, s+1, ..., max_steps (a running mean: swa_n = swa_{n-1} + (w_t - swa_{n-1}) / n).
* LAWA (`train.lawa_k` = k > 0): the mean of the weights of the latest k step checkpoints
  (train.save_every; the final step is always saved), read back from disk at the end.

Only trainable parameters are averaged (frozen ones are the same in every copy), in fp32:
the optimizer's master values (`moedist.train.state.Runner.trainable_state`). Each rank
averages only what it holds, so expert averages are EP-sharded like the experts. EMA and
SWA state travels in the step checkpoints as per-parameter state `avg_ema::<key>` /
`avg_swa::<key>` (layout-independent, split by global expert id like the optimizer state),
the SWA count in the manifest's extra_state, so a resumed run ends with the same averages
as an uninterrupted one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

Weights = Dict[str, torch.Tensor]
STATE_PREFIX = "avg_"  # per-parameter state names in checkpoints: avg_ema, avg_swa


# ------------------------------------------------------------------ pure math

def ema_update(avg: torch.Tensor, w: torch.Tensor, decay: float) -> None:
    """avg <- decay * avg + (1 - decay) * w, in place."""
    avg.mul_(decay).add_(w.to(avg.dtype), alpha=1.0 - decay)


def running_mean_update(avg: torch.Tensor, w: torch.Tensor, n: int) -> None:
    """avg <- avg + (w - avg) / n, in place: the mean of n values when avg held the mean of the first n-1."""
    avg.add_((w.to(avg.dtype) - avg) / n)


def mean_of(weights: List[Weights]) -> Weights:
    """The elementwise fp32 mean of equally keyed weight dicts."""
    out = {k: v.detach().to(torch.float32).clone() for k, v in weights[0].items()}
    for w in weights[1:]:
        for k, v in w.items():
            out[k].add_(v.to(torch.float32))
    return {k: v / len(weights) for k, v in out.items()}


@dataclass
class WeightAverages:
    """EMA and SWA state of one rank (LAWA needs none: it reads the saved checkpoints)."""

    ema_decay: float = 0.0
    swa_start: int = 0
    lawa_k: int = 0
    ema: Optional[Weights] = None
    swa: Optional[Weights] = None
    swa_count: int = 0

    @classmethod
    def from_config(cls, tr) -> Optional["WeightAverages"]:
        if not (tr.ema_decay or tr.swa_start or tr.lawa_k):
            return None
        return cls(tr.ema_decay, tr.swa_start, tr.lawa_k)

    def begin(self, trainer) -> None:
        """EMA starts from the current weights unless a resumed checkpoint brought it."""
        if self.ema_decay and self.ema is None:
            if trainer.step > 0:
                trainer._warn(f"train.ema_decay={self.ema_decay}: the checkpoint holds no EMA; it starts from the "
                              f"weights of step {trainer.step}")
            self.ema = {k: v.clone() for k, v in trainer.runner.trainable_state().items()}
        if self.swa_start and self.swa is None and trainer.step >= self.swa_start:
            trainer._warn(f"train.swa_start={self.swa_start}: the checkpoint of step {trainer.step} holds no SWA "
                          "average; it averages from the next step on")

    def after_step(self, trainer, skipped: bool = False) -> None:
        """Fold the weights of step `trainer.step` in (a skipped update changed nothing: not counted)."""
        if skipped or not (self.ema_decay or (self.swa_start and trainer.step >= self.swa_start)):
            return
        w = trainer.runner.trainable_state()  # fp32 masters (may alias parameters)
        if self.ema_decay:
            for k, v in w.items():
                ema_update(self.ema[k], v, self.ema_decay)
        if self.swa_start and trainer.step >= self.swa_start:
            self.swa_count += 1
            if self.swa is None:
                self.swa = {k: v.clone() for k, v in w.items()}
            else:
                for k, v in w.items():
                    running_mean_update(self.swa[k], v, self.swa_count)

    # -------------------------------------------------------------- checkpoints

    def state(self) -> Tuple[Dict[str, Weights], dict]:
        """({param name: {"avg_ema": t, "avg_swa": t}}, extra_state entries) for a step checkpoint."""
        per: Dict[str, Weights] = {}
        for kind, values in (("ema", self.ema), ("swa", self.swa)):
            for name, t in (values or {}).items():
                per.setdefault(name, {})[STATE_PREFIX + kind] = t.detach().to("cpu")
        return per, {"averages": {"swa_count": self.swa_count}}

    def load(self, per_param: Dict[str, Weights], extra: dict, device: torch.device) -> None:
        """Take the state `state()` wrote (as `load_checkpoint` returns it); kinds now off are ignored."""
        for kind in ("ema", "swa"):
            got = {n: s[STATE_PREFIX + kind].to(device, torch.float32) for n, s in per_param.items()
                   if STATE_PREFIX + kind in s}
            if kind == "ema" and self.ema_decay and got:
                self.ema = got
            if kind == "swa" and self.swa_start and got:
                self.swa = got
                self.swa_count = int((extra.get("averages") or {}).get("swa_count", 0))


def pop_average_state(optim_state: Dict[str, Weights]) -> Dict[str, Weights]:
    """Remove and return the `avg_*` entries of a loaded checkpoint's per-parameter state (in place)."""
    out: Dict[str, Weights] = {}
    for name, states in optim_state.items():
        for s in [s for s in states if s.startswith(STATE_PREFIX)]:
            out.setdefault(name, {})[s] = states.pop(s)
    return out


# ------------------------------------------------------------------ the end of a run

def lawa_weights(trainer, k: int) -> Tuple[Weights, List[str]]:
    """Mean of the trainable weights of the newest k step checkpoints up to the current step (collective)."""
    from moedist.checkpoint import load_checkpoint
    from moedist.train.checkpointing import shadow_model, step_checkpoints

    paths = [p for p in step_checkpoints(trainer.ckpt_dir)
             if int(os.path.basename(p).split("_")[1]) <= trainer.step][:k]
    shadow = shadow_model(trainer, init=False)
    names = [n for n, p in trainer.runner.module.named_parameters() if p.requires_grad]
    total: Optional[Weights] = None
    for path in paths:
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):  # load_checkpoint restores the saved global RNG states
            load_checkpoint(path, shadow, dims=trainer.dims, load_optim=False)
        values = dict(shadow.named_parameters())
        if total is None:
            total = {n: values[n].detach().to(torch.float32).clone() for n in names}
        else:
            for n in names:
                total[n].add_(values[n].detach().to(torch.float32))
    return {n: (v / len(paths)).to(trainer.device) for n, v in (total or {}).items()}, paths


@torch.no_grad()
def evaluate_with(trainer, weights: Weights) -> dict:
    """`trainer.evaluate_all()` with `weights` in place of the trainable parameters; restores them after."""
    params = dict(trainer.runner.module.named_parameters())
    kept = {n: params[n].data.clone() for n in weights}
    try:
        for n, w in weights.items():
            params[n].data.copy_(w.to(params[n].device, params[n].dtype))
        return trainer.evaluate_all()
    finally:
        for n, v in kept.items():
            params[n].data.copy_(v)


def finish(trainer, averages: WeightAverages, say: Callable[[str], None]) -> dict:
    """Evaluate each average and save it as <output_dir>/final_<kind>/ (collective).

    Returns {"averages": {kind: {val_loss..., "checkpoint": path}}, "<kind>_val_loss": ...} for summary.json.
    """
    from moedist.train import checkpointing

    todo: List[Tuple[str, str, Weights]] = []
    if averages.ema is not None:
        todo.append(("ema", f"decay {averages.ema_decay}", averages.ema))
    if averages.swa is not None:
        todo.append(("swa", f"{averages.swa_count} steps from step {averages.swa_start}", averages.swa))
    if averages.lawa_k and trainer.save_checkpoints:
        weights, paths = lawa_weights(trainer, averages.lawa_k)
        if paths:
            steps = ", ".join(os.path.basename(p).split("_")[1].lstrip("0") or "0" for p in reversed(paths))
            todo.append(("lawa", f"{len(paths)} checkpoints: steps {steps}", weights))
    out: dict = {"averages": {}}
    for kind, what, weights in todo:
        vals = evaluate_with(trainer, weights)
        path = None
        if trainer.save_checkpoints:
            path = checkpointing.save(trainer, os.path.join(trainer.cfg.train.output_dir, f"final_{kind}"),
                                      with_optimizer=False, override={n: w.to("cpu") for n, w in weights.items()})
            trainer.save_tokenizer(path)
        out["averages"][kind] = {**vals, "what": what, "checkpoint": path}
        out[f"{kind}_val_loss"] = vals["val_loss"]
        say(f"{kind} ({what}): " + "  ".join(f"{k} {v:.4f}" for k, v in vals.items())
            + (f"; saved {path}" if path else ""))
    return out
