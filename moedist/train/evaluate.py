"""`moedist eval RUN_OR_CKPT [RUN_OR_CKPT ...] [key=value ...] [--json] [--table T.md] [--plot P.png]`.

    moedist eval runs/tiny                              # the run's final/ (else its latest checkpoint)
    moedist eval runs/tiny/checkpoints/step_000005 train.eval_batches=16 --json
    torchrun --standalone --nproc_per_node 2 -m moedist eval runs/tiny     # same number at any world size
    moedist eval runs/a runs/a/final_ema merged/ --table cmp.md --plot cmp.png   # side by side, per domain
    moedist eval path/to/hf_model data.sources=[...]   # a Hugging Face directory (what model.from_hf takes)

The model, data and tokenizer come from the run's own ``config.yaml`` (a checkpoint's
manifest for a checkpoint directory; for a Hugging Face directory the default config with
``model.from_hf`` set to it); ``key=value`` overrides apply on top, to every model (e.g.
``train.eval_batches``, ``data.*`` to evaluate other data). The checkpoint loads at any
layout: ``parallel.ep_size`` falls back to 1 when it does not divide the world size, and
DeepSpeed is off (fp32) unless an override turns it on. ``train.eval_batches``
micro-batches of fixed validation sequences are split across the ranks, so the loss is
the same at any world size. Reports ``val_loss`` (token-weighted over every source) and
``val_loss_<name>`` per named data source. Prints ``val_loss ...`` lines for one model and
a table for several, or with ``--json`` one JSON line per model on stdout:
``{"val_loss": ..., "val_loss_<name>": ..., "step": ..., "checkpoint": PATH}``. Writes
nothing but ``--table`` (markdown: rows = models, columns = overall and each domain) and
``--plot`` (grouped bar chart PNG). Every model is checked before any is evaluated: bad
input is one line and exit 2 with nothing written.

``moedist eval CONFIG.yaml [key=value ...]`` (the older form) evaluates the latest
checkpoint of that config's ``train.output_dir`` (or ``train.resume``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from moedist.cli_format import DefaultsFormatter
from moedist.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moedist eval", description="Validation loss, overall and per named data "
                                "source, of one or more runs, checkpoints or Hugging Face directories, each with its "
                                "own config (any world size gives the same numbers); several models side by side.",
                                formatter_class=DefaultsFormatter)
    p.add_argument("items", nargs="+", metavar="RUN_OR_CKPT|key=value",
                   help="one or more models: a run directory (its final/, else its latest checkpoint), a checkpoint "
                        "directory (e.g. a run's final_ema/), a Hugging Face directory, or (older form) a YAML "
                        "config whose train.output_dir holds the run; then config overrides applied to every model, "
                        "e.g. train.eval_batches=16 (an item with '=' that is not an existing path)")
    p.add_argument("--json", action="store_true", help="print one JSON line per model on stdout instead of text")
    p.add_argument("--table", metavar="PATH.md", default=None,
                   help="write a markdown table: rows = models, columns = val_loss overall and per domain")
    p.add_argument("--plot", metavar="PATH.png", default=None,
                   help="write a grouped bar chart (PNG) of val_loss overall and per domain, one bar per model")
    return p


def split_items(items: List[str]) -> Tuple[List[str], List[str]]:
    """(targets, overrides): an item with '=' that is not an existing path is an override."""
    targets = [i for i in items if os.path.exists(i) or "=" not in i]
    return targets, [i for i in items if i not in targets]


def _hf_config(target: str, overrides: List[str], world_size: int):
    """The default config with model.from_hf=target (a Hugging Face directory), overrides on top."""
    from moedist.config import _set_dotted, config_from_dict

    raw: dict = {"model": {"from_hf": os.path.abspath(target)}}
    for item in overrides:
        _set_dotted(raw, item)
    cfg = config_from_dict(raw)
    return _for_eval(cfg, None, overrides, world_size)


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
    if found is None and os.path.isfile(os.path.join(target, "config.json")):  # what model.from_hf accepts
        return _hf_config(target, overrides, world_size), os.path.abspath(target)
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


def evaluate_models(specs: List[Tuple[str, object, str]], data: Optional[List] = None) -> List[Dict]:
    """[{"model": label, **val losses, "step", "checkpoint"}] for each (label, cfg, ckpt) of `eval_config`
    (collective: every rank evaluates every model; torch.distributed must be initialised).

    data: what `preflight(cfg, world_size)` returned for each spec when the caller ran it (else the
    trainer runs it)."""
    from moedist.train.trainer import Trainer

    rows = []
    for (label, cfg, ckpt), d in zip(specs, data or [None] * len(specs)):
        trainer = Trainer(cfg, write_outputs=False, console=False, save_checkpoints=False, data=d)
        if cfg.train.resume is not None and not trainer.resume():
            raise ConfigError(f"{ckpt}: no checkpoint loaded")
        rows.append({"model": label, **trainer.evaluate_all(), "step": trainer.step, "checkpoint": ckpt})
        del trainer
    return rows


def _check_output(flag: str, path: Optional[str]) -> None:
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"{flag}={path!r}: its directory does not exist")


def main_eval(argv: Optional[List[str]] = None) -> int:
    """Entry of `moedist eval` (registered in moedist.cli.COMMANDS)."""
    args = _parser().parse_args(argv)
    from moedist.distributed.launch_env import detect_launch_env

    try:
        env = detect_launch_env(os.environ)
    except ValueError as err:
        raise ConfigError(f"launcher environment: {err}") from None
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from moedist.train.preflight import preflight

    targets, overrides = split_items(args.items)
    try:
        if not targets:
            raise ConfigError(f"RUN_OR_CKPT: none given (only overrides: {' '.join(overrides)})")
        _check_output("--table", args.table)
        _check_output("--plot", args.plot)
        specs, data = [], []
        for target in targets:  # every model checked before any is evaluated
            cfg, ckpt = eval_config(target, overrides, env.world_size)
            data.append(preflight(cfg, env.world_size))  # once: the trainer takes what it opened
            specs.append((target, cfg, ckpt))
    except ConfigError:
        if env.rank != 0:
            return 2
        raise

    import torch.distributed as dist

    from moedist.distributed import init_distributed

    init_distributed(timeout_s=specs[0][1].parallel.timeout_s)
    try:
        try:
            rows = evaluate_models(specs, data)
        except ConfigError:
            if env.rank != 0:
                return 2
            raise
        if env.rank == 0:
            _report(rows, args, env.world_size)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _report(rows: List[Dict], args, world: int) -> None:
    from moedist.train.eval_compare import markdown_table, plot_comparison, write_text_atomic

    if args.json:
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "model"}), flush=True)
    elif len(rows) == 1:
        row = rows[0]
        for k, v in row.items():
            if k.startswith("val_loss"):
                print(f"{k} {v:.4f}")
        print(f"checkpoint {row['checkpoint']} (step {row['step']}, {world} rank(s))", flush=True)
    else:
        print(markdown_table(rows), end="", flush=True)
    if args.table:
        write_text_atomic(args.table, markdown_table(rows))
    if args.plot:
        plot_comparison(rows, args.plot)
