"""`moedist eval RUN_OR_CKPT [key=value ...] [--json]`: validation loss of a run or a checkpoint.

    moedist eval runs/tiny                              # the run's final/ (else its latest checkpoint)
    moedist eval runs/tiny/checkpoints/step_000005 train.eval_batches=16 --json
    torchrun --standalone --nproc_per_node 2 -m moedist eval runs/tiny     # same number at any world size

The model, data and tokenizer come from the run's own ``config.yaml`` (a checkpoint's
manifest for a checkpoint directory); ``key=value`` overrides apply on top (e.g.
``train.eval_batches``, ``data.*`` to evaluate other data). The checkpoint loads at any
layout: ``parallel.ep_size`` falls back to 1 when it does not divide the world size, and
DeepSpeed is off (fp32) unless an override turns it on. ``train.eval_batches``
micro-batches of fixed validation sequences are split across the ranks, so the loss is
the same at any world size. Prints ``val_loss ...`` lines, or with ``--json`` one JSON
line on stdout: ``{"val_loss": ..., "val_loss_<name>": ..., "step": ..., "checkpoint": PATH}``.
Writes nothing.

``moedist eval CONFIG.yaml [key=value ...]`` (the older form) evaluates the latest
checkpoint of that config's ``train.output_dir`` (or ``train.resume``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from moedist.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moedist eval", description="Validation loss of a run directory or a "
                                "checkpoint, with the run's own config (any world size gives the same number).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("target", metavar="RUN_OR_CKPT",
                   help="a run directory (its final/, else its latest checkpoint), a checkpoint directory, "
                        "or (older form) a YAML config whose train.output_dir holds the run")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides on top of the run's config, e.g. train.eval_batches=16")
    p.add_argument("--json", action="store_true", help="print one JSON line on stdout instead of text")
    return p


def eval_config(target: str, overrides: List[str], world_size: int):
    """(cfg, checkpoint path) for `moedist eval TARGET`; ConfigError (one line) when there is nothing to evaluate."""
    import dataclasses

    from moedist.checkpoint.io import CorruptCheckpoint, read_manifest, resolve_checkpoint
    from moedist.config import config_from_dict, load_config, parse_yaml
    from moedist.train import checkpointing

    if os.path.isfile(target):  # older form: a YAML config naming train.output_dir / train.resume
        cfg = load_config(target, overrides)
        if cfg.train.resume in (None, "auto"):
            ckpt_dir = os.path.join(cfg.train.output_dir, "checkpoints")
            ckpt = checkpointing.pick_auto_resume(ckpt_dir, lambda m: print(f"moedist: warning: {m}", file=sys.stderr))
            if ckpt is None:
                raise ConfigError(f"train.output_dir={cfg.train.output_dir!r}: no checkpoint found (no "
                                  f"{os.path.join(ckpt_dir, 'latest')}); train first or set "
                                  "train.resume=<checkpoint directory>")
        else:
            ckpt = checkpointing.resume_target(cfg.train.resume)
        return _for_eval(cfg, ckpt, overrides, world_size), ckpt
    if not os.path.isdir(target):
        raise ConfigError(f"RUN_OR_CKPT={target!r}: no such run or checkpoint directory")
    found = resolve_checkpoint(target)  # refuses pickles before anything is opened
    if found is None:
        raise ConfigError(f"RUN_OR_CKPT={target!r}: no checkpoint found (no manifest.json, final/ or "
                          "checkpoints/latest); train first")
    ckpt = os.path.abspath(os.fspath(found))
    try:
        manifest = read_manifest(ckpt)
    except CorruptCheckpoint as err:
        raise ConfigError(str(err)) from None
    run_yaml = os.path.join(target, "config.yaml")
    if os.path.isfile(run_yaml):  # the run's own resolved config
        with open(run_yaml, encoding="utf-8") as fh:
            raw = parse_yaml(fh.read(), run_yaml) or {}
    elif manifest.get("config"):
        raw = manifest["config"]
    else:
        raise ConfigError(f"RUN_OR_CKPT={target!r}: {ckpt} has no config; cannot rebuild its model")
    raw = dict(raw)
    model = dict(raw.get("model") or {})
    model["init_from"] = None  # every weight comes from the checkpoint
    if model.get("from_hf") and not os.path.isdir(model["from_hf"]):
        model["from_hf"] = None
    raw["model"] = model
    trained = "step" in (manifest.get("extra_state") or {}) and not manifest.get("adapter_only")
    if not trained:  # a converted model (convert from-hf/upcycle): its weights, step 0
        model["init_from"] = ckpt
        model["from_hf"] = None
    raw["train"] = dict(raw.get("train") or {}, resume=ckpt if trained else None)
    from moedist.config import _set_dotted  # the same override rules as the command line

    for item in overrides:
        _set_dotted(raw, item)
    try:
        cfg = config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{run_yaml if os.path.isfile(run_yaml) else ckpt}: {err}") from None
    if cfg.data.sources and cfg.data.tokenizer is None:
        from moedist.data.tokenizer import tokenizer_from_dir

        if tokenizer_from_dir(ckpt) is not None and not cfg.model.from_hf:  # the tokenizer saved with the weights
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=ckpt))
    return _for_eval(cfg, ckpt if trained else None, overrides, world_size), ckpt


def _for_eval(cfg, ckpt: str, overrides: List[str], world_size: int):
    """Any layout: fall back to EP=1 and the plain fp32 runner unless the overrides say otherwise."""
    import dataclasses

    given = {o.partition("=")[0].strip() for o in overrides}
    par, ds, tr = cfg.parallel, cfg.deepspeed, cfg.train
    if world_size % par.ep_size and "parallel.ep_size" not in given:
        par = dataclasses.replace(par, ep_size=1)
    if not any(k.startswith("deepspeed.") for k in given):
        ds = dataclasses.replace(ds, enabled=False, zero_stage=0, bf16=False, fp16=False, offload_optimizer="none",
                                 offload_param="none", extra={})
    tr = dataclasses.replace(tr, resume=ckpt, tensorboard=False, plot=False,
                             nonfinite="stop" if "train.nonfinite" not in given else tr.nonfinite)
    model = cfg.model
    if model.dtype != "float32" and cfg.lora.mode == "none" and not ds.bf16:
        model = dataclasses.replace(model, dtype="float32")
    return dataclasses.replace(cfg, parallel=par, deepspeed=ds, train=tr, model=model)


def main_eval(argv: Optional[List[str]] = None) -> int:
    """Entry of `moedist eval` (registered in moedist.cli.COMMANDS)."""
    args = _parser().parse_args(argv)
    from moedist.distributed.launch_env import detect_launch_env

    try:
        env = detect_launch_env(os.environ)
    except ValueError as err:
        raise ConfigError(f"launcher environment: {err}") from None
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from moedist.train.trainer import preflight

    try:
        cfg, ckpt = eval_config(args.target, args.overrides, env.world_size)
        preflight(cfg, env.world_size)
    except ConfigError:
        if env.rank != 0:
            return 2
        raise

    import torch.distributed as dist

    from moedist.distributed import init_distributed
    from moedist.train.trainer import Trainer

    init_distributed(timeout_s=cfg.parallel.timeout_s)
    try:
        try:
            trainer = Trainer(cfg, write_outputs=False, console=False, save_checkpoints=False)
            if cfg.train.resume is not None and not trainer.resume():
                raise ConfigError(f"{ckpt}: no checkpoint loaded")
            vals = trainer.evaluate_all()
        except ConfigError:
            if env.rank != 0:
                return 2
            raise
        if trainer.is_main:
            if args.json:
                print(json.dumps({**vals, "step": trainer.step, "checkpoint": ckpt}), flush=True)
            else:
                for k, v in vals.items():
                    print(f"{k} {v:.4f}")
                print(f"checkpoint {ckpt} (step {trainer.step}, {trainer.world} rank(s))", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
