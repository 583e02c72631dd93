"""`moedist plan CONFIG [key=value ...] --world-size N [--json] [--max-mem-gb G]`: per-rank memory.

    moedist plan configs/mixtral_8x7b.yaml --world-size 8,16,32,64
    moedist plan configs/qwen3_30b_a3b.yaml deepspeed.zero_stage=3 --world-size 16 --json
    moedist plan configs/tiny.yaml --world-size 4 --max-mem-gb 80     # exit 2 if it cannot fit

A table for humans (one row per world size), or JSON: one object
``{"per_rank": {...}, "layout": {...}, "params": {...}}`` for one world size, a list for several.
Bad input gets one line on stderr and exit 2: a layout over ``--max-mem-gb``, a world
size the EP size does not divide, a precision/offload combination DeepSpeed rejects.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from moedist.config import ConfigError, load_config, validate_world_size


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moedist plan", description="Per-rank memory estimate of a training layout "
                                "(parameters, gradients, optimizer state, activations, all-to-all buffers).")
    p.add_argument("items", nargs="*", metavar="CONFIG key=value",
                   help="YAML config (omit for defaults), then dotted overrides such as deepspeed.zero_stage=3")
    p.add_argument("--world-size", required=True, metavar="N[,N...]",
                   help="ranks (GPUs) of the job; a comma-separated list gives one row each")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--max-mem-gb", type=float, default=None, metavar="G",
                   help="memory per rank (GiB): exit 2 with one line when a layout does not fit (default: no limit)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="where the job runs (fp16 needs cuda); default cuda")
    return p


def _world_sizes(text: str) -> List[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--world-size={text!r}: must be a positive integer or a comma-separated list") from None
    if not sizes or any(n < 1 for n in sizes):
        raise ConfigError(f"--world-size={text!r}: must be a positive integer or a comma-separated list")
    return sizes


def check_layout(cfg, world_size: int, device: str = "cuda") -> None:
    """The checks DeepSpeed/moedist apply to a layout, without building it; raises `ConfigError`."""
    ds = cfg.deepspeed
    validate_world_size(cfg, world_size)

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(ds.enabled or ds.zero_stage == 0, f"deepspeed.zero_stage={ds.zero_stage}: needs deepspeed.enabled=true")
    need(ds.enabled or not (ds.bf16 or ds.fp16),
         f"deepspeed.{'bf16' if ds.bf16 else 'fp16'}=true: needs deepspeed.enabled=true")
    offload = "optimizer" if ds.offload_optimizer != "none" else "param" if ds.offload_param != "none" else None
    need(ds.enabled or offload is None, f"deepspeed.offload_{offload}=cpu: needs deepspeed.enabled=true")
    need(not ds.fp16 or device == "cuda",
         "deepspeed.fp16=true: needs a CUDA GPU (fp16 is not supported on CPU); use deepspeed.bf16")
    need(not (ds.fp16 and ds.zero_stage == 0), "deepspeed.fp16=true: needs deepspeed.zero_stage >= 1")
    need(cfg.model.dtype != "float16" or ds.fp16,
         "model.dtype='float16': frozen fp16 weights need deepspeed.fp16=true; use bfloat16")


def _resolve(cfg):
    if cfg.model.from_hf is None:
        return cfg
    from moedist.models.hf import apply_hf_config

    try:
        return apply_hf_config(cfg)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model.from_hf={cfg.model.from_hf!r}: {' '.join(str(err).split())}") from None


def plan(cfg, world_sizes: List[int], device: str = "cuda") -> List[dict]:
    """Estimates for each world size (parameters counted once, on the meta device)."""
    from moedist.plan.estimate import count_params, estimate

    cfg = _resolve(cfg)
    for n in world_sizes:
        check_layout(cfg, n, device)
    counts = count_params(cfg)
    return [estimate(cfg, n, counts, device) for n in world_sizes]


def _gb(mb: float) -> str:
    return f"{mb / 1024:.2f}"


def render_table(results: List[dict], title: str) -> str:
    """The estimates as a text table (rich), one row per world size; sizes in GiB."""
    from rich.console import Console
    from rich.table import Table

    lay = results[0]["layout"]
    prm = results[0]["params"]
    t = Table(title=title, caption=f"{prm['total'] / 1e9:.2f} B parameters ({prm['expert'] / 1e9:.2f} B in experts), "
              f"{prm['trainable'] / 1e6:.1f} M trainable; micro-batch {lay['micro_batch_size']} x seq {lay['seq_len']}, "
              f"{lay['engine']} ZeRO-{lay['zero_stage']} {lay['precision']}, model.dtype {lay['model_dtype']}, "
              f"lora {lay['lora_mode']}, checkpointing {lay['activation_checkpointing']}, "
              f"offload optimizer {lay['offload_optimizer']} / param {lay['offload_param']}; GiB per rank")
    for col in ("world", "EP x EDP", "experts/rank", "params", "grads", "optimizer", "activations", "a2a", "buffers",
                "total", "host (offload)"):
        t.add_column(col, justify="right")
    for r in results:
        lay, per = r["layout"], r["per_rank"]
        t.add_row(str(lay["world_size"]), f"{lay['ep_size']} x {lay['edp_size']}", str(lay["experts_per_rank"]),
                  *(_gb(per[k]) for k in ("params_mb", "grads_mb", "optimizer_mb", "activations_mb", "a2a_mb",
                                          "buffers_mb")),
                  f"[bold]{_gb(per['total_mb'])}[/]", _gb(per["offload_mb"]))
    console = Console(width=160, record=True, file=open(os.devnull, "w"))
    console.print(t)
    return console.export_text()


def main(argv: Optional[List[str]] = None) -> int:
    """`moedist plan` (an argv command of `moedist.cli`)."""
    args = _parser().parse_args(argv)
    items = args.items
    has_file = bool(items) and ("=" not in items[0] or os.path.isfile(items[0]))
    config, overrides = (items[0], items[1:]) if has_file else (None, items)
    try:
        sizes = _world_sizes(args.world_size)
        if args.max_mem_gb is not None and not args.max_mem_gb > 0:
            raise ConfigError(f"--max-mem-gb={args.max_mem_gb}: must be > 0")
        cfg = load_config(config, overrides)
        results = plan(cfg, sizes, args.device)
    except ConfigError as err:
        print(f"moedist plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    else:
        print(render_table(results, f"moedist plan: {config or 'defaults'} {' '.join(overrides)}".strip()), end="")
    if args.max_mem_gb is not None:
        over = [r for r in results if r["per_rank"]["total_mb"] > args.max_mem_gb * 1024]
        if over:
            r = over[0]
            lay = r["layout"]
            print(f"moedist plan: error: per-rank total {_gb(r['per_rank']['total_mb'])} GiB exceeds --max-mem-gb "
                  f"{args.max_mem_gb:g} (world {lay['world_size']}, EP {lay['ep_size']}, {lay['engine']} "
                  f"ZeRO-{lay['zero_stage']}); try more ranks, a higher ZeRO stage, offload or activation "
                  "checkpointing", file=sys.stderr)
            return 2
    return 0
