"""Trainer checkpoints in the layout-independent `moedist.checkpoint` format.

    path = save(trainer, tag)     # collective; <output_dir>/checkpoints/<tag>/ + checkpoints/latest
    extra = load(trainer, path)   # collective; any world size, EP size, ZeRO stage or engine

Weights are the optimizer's full fp32 values (`Runner.full_state`) and the
AdamW state (exp_avg, exp_avg_sq, step) per parameter (`Runner.optimizer_state`),
experts keyed by global id, so a run saved at EP=4 under ZeRO-3 resumes at EP=2
under ZeRO-1 or in one plain process. The data position and step travel in the
manifest's extra state.

Loading hands the values back to the runner (`Runner.load_full_state`,
`Runner.load_optimizer_state`), which pushes them into whatever holds them
(`moedist.train.state`): nothing here knows the engine, ZeRO stage or precision.
Every one of them uses this one format; nothing here (or anywhere in moedist) unpickles.

Each rank's random streams (`moedist.train.rng`: global RNG, router noise/jitter,
LoRA dropout) travel in `rng-rank<R>.safetensors` and are restored when the world
and EP sizes match, so a resumed run continues bit-identically.

    rotate(ckpt_dir, keep_last)          # rank 0: drop old step_* (never the one `latest` names)
    pick_auto_resume(ckpt_dir, warn)     # newest checkpoint that verifies, with a warning per bad one
"""
from __future__ import annotations

import os
import re
import shutil
import types
from pathlib import Path
from typing import Callable, List, Optional

import torch

from moedist.config import config_to_dict


def shadow_model(trainer, init: bool = True):
    """A plain CPU copy of the model's structure holding this rank's expert shard (built on meta and
    materialized as a shard: never the whole model). Trainable parameters are fp32; frozen ones are in
    model.dtype (`moedist.models.build.apply_param_dtype`), so bf16 frozen weights are saved as bf16."""
    from moedist.models import build_local_model, parallelize

    shadow = build_local_model(trainer.cfg, trainer.dims.ep_rank, trainer.cfg.parallel.ep_size, init=init)
    parallelize(shadow, types.SimpleNamespace(size=trainer.cfg.parallel.ep_size, rank=trainer.dims.ep_rank))
    return shadow


def _extra(trainer) -> dict:
    return {"step": trainer.step, "position": trainer.position, "world_size": trainer.world,
            "ep_size": trainer.cfg.parallel.ep_size, **trainer.runner.manifest_info(),  # engine, zero_stage
            "skipped_steps": trainer.skipped_steps}


def save(trainer, path: str, with_optimizer: bool = True, override: Optional[dict] = None) -> str:
    """Write trainer's weights (+ optimizer state) to `path` (every rank calls it).

    override: {name: tensor} replacing those weights (a weight average, `moedist.train.averaging`).
    With the optimizer state go the running weight averages (`avg_ema`/`avg_swa` per parameter).
    """
    from moedist.checkpoint import save_checkpoint

    state = trainer.runner.full_state()
    state.update(override or {})
    optim = trainer.runner.optimizer_state() if with_optimizer else None
    extra = _extra(trainer)
    if with_optimizer and trainer.averages is not None:
        per, avg_extra = trainer.averages.state()
        for name, states in per.items():
            optim.setdefault(name, {}).update(states)
        extra.update(avg_extra)
    shadow = shadow_model(trainer, init=False)  # every value is loaded next
    shadow.load_state_dict(state, strict=True)
    from moedist.train.rng import rng_states

    return os.fspath(save_checkpoint(path, shadow, step=trainer.step, optim_state=optim, extra_state=extra,
                                     config=config_to_dict(trainer.cfg), dims=trainer.dims,
                                     rng_state=rng_states(trainer.runner.module)))


_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_checkpoints(ckpt_dir: str) -> List[str]:
    """The `step_*` checkpoint directories under `ckpt_dir`, newest (highest step) first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(ckpt_dir)
             if (m := _STEP_DIR.match(name)) and os.path.isdir(os.path.join(ckpt_dir, name))]
    return [os.path.join(ckpt_dir, name) for _, name in sorted(found, reverse=True)]


def latest_named(ckpt_dir: str) -> Optional[str]:
    """The checkpoint `ckpt_dir/latest` names (path), or None."""
    try:
        name = Path(ckpt_dir, "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return os.path.join(ckpt_dir, name) if name and "/" not in name and name not in (".", "..") else None


def rotate(ckpt_dir: str, keep_last: int) -> List[str]:
    """Delete all but the newest `keep_last` step checkpoints (0 = keep all); returns what was deleted.

    Never deletes the one `latest` names, nor anything outside `step_*` (e.g. the run's `final/`).
    Also clears `.tmp-*`/`.old-*` leftovers of saves that were killed. Rank 0 only, after a save.
    """
    removed = []
    keep = {latest_named(ckpt_dir)}
    for i, path in enumerate(step_checkpoints(ckpt_dir)):
        if keep_last and i >= keep_last and path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.startswith((".tmp-step_", ".old-step_")):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    return removed


def pick_auto_resume(ckpt_dir: str, warn: Callable[[str], None]) -> Optional[str]:
    """For train.resume=auto: the newest checkpoint that verifies (SHA-256), else None if there is none.

    Candidates: the one `latest` names, then every `step_*` newest first. Each one that fails
    verification is reported through `warn` (naming the bad file) and skipped. Raises
    ConfigError (one line) when checkpoints exist but none verifies.
    """
    from moedist.checkpoint.io import CorruptCheckpoint, verify_checkpoint
    from moedist.checkpoint.safety import refuse_pickles
    from moedist.config import ConfigError

    candidates = []
    for path in [latest_named(ckpt_dir)] + step_checkpoints(ckpt_dir):
        if path is not None and path not in candidates and os.path.isdir(path):
            candidates.append(path)
    if not candidates:
        return None
    bad = []
    for path in candidates:
        try:
            refuse_pickles(path, "train.resume=auto")
            verify_checkpoint(path)
        except CorruptCheckpoint as err:
            bad.append(str(err))
            continue
        except ConfigError as err:  # a planted pickle: never a fallback target
            bad.append(str(err))
            continue
        for problem in bad:
            warn(f"train.resume=auto: skipping a corrupt checkpoint: {problem}; resuming from {path}")
        return path
    raise ConfigError(f"train.resume=auto: no loadable checkpoint in {ckpt_dir} ({len(bad)} corrupt; newest: "
                      f"{bad[0]}); delete it or start fresh with train.resume=null")


def is_moedist_checkpoint(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def resume_target(path: str, warn: Callable[[str], None] = lambda message: None, key: str = "train.resume") -> str:
    """The checkpoint `train.resume=path` means: `path` itself, or for a run directory the newest checkpoint
    under its `checkpoints/` that verifies (its `final/` holds no optimizer state). Pickles are refused first."""
    from moedist.checkpoint.safety import refuse_pickles
    from moedist.config import ConfigError

    path = os.path.abspath(path.rstrip("/") or "/")
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r}: no such checkpoint directory")
    refuse_pickles(path, key)
    if is_moedist_checkpoint(path):
        return path
    found = pick_auto_resume(os.path.join(path, "checkpoints"), warn)
    if found is None:
        hint = (f"; it holds only final/ (no optimizer state): start a new run from it with model.init_from={path}"
                if is_moedist_checkpoint(os.path.join(path, "final")) else "")
        raise ConfigError(f"{key}={path!r}: not a moedist checkpoint (no manifest.json) nor a run directory with "
                          f"checkpoints/{hint}")
    return found


def check_resumable(path: str, key: str = "train.resume") -> None:
    """ConfigError unless `path` is a moedist checkpoint (or run directory) free of pickles, saved by training
    (nothing is opened before the pickle check)."""
    from moedist.config import ConfigError

    path = resume_target(path, key=key)
    from moedist.checkpoint.io import CorruptCheckpoint, read_manifest

    try:
        manifest = read_manifest(path)  # an unreadable manifest: one line (files are verified when loaded)
    except CorruptCheckpoint as err:
        raise ConfigError(f"{key}={path!r}: {err}") from None
    if "step" not in (manifest.get("extra_state") or {}) or manifest.get("adapter_only"):
        raise ConfigError(f"{key}={path!r}: a model without training state (written by moedist convert/extract: no "
                          f"step, data position or optimizer); start a new run from it with model.init_from={path}")


@torch.no_grad()
def load(trainer, path: str, verify: bool = True) -> dict:
    """Load a moedist checkpoint into the trainer's runner at its current layout; returns extra state."""
    from moedist.checkpoint import load_checkpoint

    shadow = shadow_model(trainer)
    loaded = load_checkpoint(path, shadow, dims=trainer.dims, verify=verify)
    runner = trainer.runner
    runner.load_full_state({**dict(shadow.named_parameters()), **dict(shadow.named_buffers())})
    from moedist.train.averaging import pop_average_state

    averaged = pop_average_state(loaded.optim_state)  # before the optimizer sees the state
    if trainer.averages is not None:
        trainer.averages.load(averaged, loaded.extra_state, trainer.device)
    runner.load_optimizer_state(loaded.optim_state)
    module = runner.module
    if loaded.rng_state:  # same world and EP size: continue every random stream exactly
        from moedist.train.rng import set_rng_states

        try:
            set_rng_states(module, loaded.rng_state)
        except ValueError as err:
            import sys

            if trainer.is_main:
                print(f"moedist: warning: {path}: {err}; random streams restart from their seeds", file=sys.stderr)
    return loaded.extra_state
