"""`moedist merge --method average|task_arithmetic|ties|lorahub MODEL MODEL ... OUT`: several fine-tunes of one
base combined into one moedist checkpoint, then evaluated per domain beside its inputs.

    moedist merge --method average runs/a runs/b soup                          # model soup / WARM
    moedist merge --method average --weights 0.7,0.3 runs/a runs/b soup        # weighted (normalised to sum 1)
    moedist merge --method task_arithmetic --base BASE --scale 0.8 runs/a runs/b ta
    moedist merge --method ties --base BASE --density 0.2 --scale 1.0 runs/a runs/b ties
    moedist merge --method lorahub --budget 40 --domain code runs/a runs/b hub  # LoRA runs: search the weights

MODEL and BASE are moedist checkpoints or run directories (their final/, else their latest
checkpoint), full (not adapter-only), with the same tensor keys and shapes: the first key
that differs is named in a one-line error (exit 2, nothing written). The math is
`moedist.merge.methods` (fp32, per tensor, every key including LoRA factors, router and
expert weights by global id). BASE is the checkpoint every MODEL was fine-tuned from with the
same keys (task_arithmetic, ties). `lorahub` combines the LoRA factors as sum_i w_i theta_i,
each factor on its own as LoraHub does, averages the other tensors the lora config trains
(routers, shared experts: a soup), takes the frozen ones (which must be equal) from the first
MODEL, and searches w with
`moedist.merge.lorahub` (nevergrad when installed, else coordinate search) on
--search-batches validation micro-batches.

Search and evaluation use the first MODEL's config with every named data source of all
the MODELs (`union_sources`), so each model is measured on every domain; `--set data.*=...`
replaces that.

OUT is a step-0 moedist checkpoint (the first MODEL's config), loadable by `moedist eval`,
`generate` and `train model.init_from=`. Afterwards every MODEL and OUT are evaluated per
domain (`moedist eval` code) and a table is printed (--table: also written as markdown).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from moedist.cli_format import DefaultsFormatter
from moedist.checkpoint.cli import (_checkpoint_arg, _emptied, _expected, _load_model, _manifest, _out_arg,
                                    _Parser, _run, _say, _staged, _tensor_keys)
from moedist.merge import methods
from moedist.moe.lora import is_lora_factor_key

METHODS = ("average", "task_arithmetic", "ties", "lorahub")
State = Dict[str, torch.Tensor]


def add_method_args(p: argparse.ArgumentParser) -> None:
    """The flags of the combining methods (also listed in plain `moedist merge --help`)."""
    p.add_argument("--weights", metavar="W1,W2,...", default=None,
                   help="one weight per MODEL: average = weighted mean (normalised to sum 1; default equal); "
                        "task_arithmetic/ties = weight of each task vector (default 1 each); lorahub = the search's "
                        "starting point (default 1/N each)")
    p.add_argument("--scale", type=float, default=1.0, help="task_arithmetic, ties: lambda in base + lambda * "
                   "(combined task vectors)")
    p.add_argument("--density", type=float, default=0.2, help="ties: share of each task vector's entries kept "
                   "(largest magnitudes, per tensor), in (0, 1]")
    p.add_argument("--budget", type=int, default=40, help="lorahub: most validation evaluations of the search")
    p.add_argument("--search-batches", type=int, default=2, help="lorahub: validation micro-batches per "
                   "evaluation (the 'few examples')")
    p.add_argument("--l1", type=float, default=0.05, help="lorahub: objective = val loss + l1 * sum |w_i|")
    p.add_argument("--domain", metavar="NAME", default=None, help="lorahub: minimise val_loss_NAME (a named data "
                   "source) instead of the overall val_loss")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="config override for the search and the evaluation, e.g. train.eval_batches=8 (repeatable)")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the inputs and the merged model")
    p.add_argument("--table", metavar="PATH.md", default=None, help="also write the evaluation table as markdown")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moedist merge", formatter_class=DefaultsFormatter,
                description="Combine several fine-tunes of one base (same architecture) into one moedist "
                "checkpoint: average (model soup / WARM), task_arithmetic, ties (TIES-Merging), lorahub (searched "
                "weights for LoRA adapters / LoRA experts); then evaluate inputs and result per domain. "
                "Without --method: merge one adapter into its base (moedist merge ADAPTER --base BASE OUT).")
    p.add_argument("--method", choices=METHODS, required=True, help="how to combine the MODELs")
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more moedist checkpoints or run directories")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory (must not exist, or be empty)")
    p.add_argument("--base", metavar="BASE", default=None, help="the checkpoint the MODELs were fine-tuned from "
                   "(task_arithmetic, ties: required)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists and is not empty")
    add_method_args(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """`moedist merge --method ...` (argv without the subcommand name); bad input: one line, exit 2."""
    return _run("moedist merge", _parser(), argv, run)


# ------------------------------------------------------------------ reading and checking

def _weights_arg(text: Optional[str], n: int) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights={text}: not a comma-separated list of numbers") from None
    if len(w) != n:
        raise ValueError(f"--weights={text}: {len(w)} values for {n} models")
    return w


def read_state(label: str, path: str) -> Tuple[Path, dict, State]:
    """(checkpoint dir, manifest, {key: tensor}) of a full moedist checkpoint (pickles refused, files verified)."""
    from moedist.checkpoint.io import _Reader, verify_checkpoint
    from moedist.checkpoint.safety import refuse_pickles

    if os.path.exists(path):
        refuse_pickles(path, label)
    ckpt = _checkpoint_arg(label, path)
    m = _manifest(label, ckpt)
    if m.get("adapter_only"):
        raise ValueError(f"{label}={ckpt}: an adapter-only checkpoint; merge it into its base first "
                         "(moedist merge ADAPTER --base BASE OUT)")
    verify_checkpoint(ckpt)
    reader = _Reader(ckpt, m)
    return ckpt, m, {key: reader.get(key) for key in _tensor_keys(m)}


def check_same_keys(label: str, state: State, ref_label: str, ref: State) -> None:
    """ValueError naming the first key missing, extra or of another shape in `state` than in `ref`."""
    for key in ref:
        if key not in state:
            raise ValueError(f"{label}: lacks {key} (in {ref_label}); merge needs the same architecture")
        if tuple(state[key].shape) != tuple(ref[key].shape):
            raise ValueError(f"{label}: {key} has shape {tuple(state[key].shape)} but {tuple(ref[key].shape)} in "
                             f"{ref_label}; merge needs the same architecture")
    for key in state:
        if key not in ref:
            raise ValueError(f"{label}: has {key}, which {ref_label} lacks; merge needs the same architecture")


def union_sources(manifests: List[dict]) -> List[str]:
    """['data.sources=[...]']: every named source of the inputs (first occurrence of each name), so that the
    search and the evaluation put every model on the same data; [] when an input has byte-level data."""
    import json

    seen: Dict[str, dict] = {}
    for m in manifests:
        sources = ((m.get("config") or {}).get("data") or {}).get("sources") or []
        if not sources:
            return []
        for src in sources:
            seen.setdefault(src["name"], src)
    return [f"data.sources={json.dumps(list(seen.values()))}"]


def trained_keys(model) -> List[str]:
    """Checkpoint keys of the parameters the model's config trains (LoRA factors, routers, ...)."""
    return [k for k, (_, _, trains) in _expected(model).items() if trains]


def load_state_into(module: torch.nn.Module, state: State) -> None:
    """Copy {checkpoint key: tensor} into a module holding every expert (EP=1), stacking experts by global id."""
    from moedist.checkpoint.keys import global_keys_for, param_slots

    slots = param_slots(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in slots:
                keys = global_keys_for(name, slots[name])
                if keys[0] in state:
                    p.copy_(torch.stack([state[k] for k in keys]).to(p.dtype))
            elif name in state:
                p.copy_(state[name].to(p.dtype))


# ------------------------------------------------------------------ the command

def run(args) -> Path:
    """Check, merge, write OUT, evaluate; the process group it may open for evaluation is closed again."""
    import torch.distributed as dist

    opened = not dist.is_initialized()
    try:
        return _merge(args)
    finally:
        if opened and dist.is_initialized():
            dist.destroy_process_group()


def _merge(args) -> Path:
    t0 = time.perf_counter()
    n = len(args.models)
    if n < 2:
        raise ValueError(f"MODEL: --method {args.method} combines two or more models (got {n})")
    weights = _weights_arg(args.weights, n)
    needs_base = args.method in ("task_arithmetic", "ties")
    if needs_base and args.base is None:
        raise ValueError(f"--base: required by --method {args.method} (the checkpoint the models were tuned from)")
    if not needs_base and args.base is not None:
        raise ValueError(f"--base: not used by --method {args.method}")
    if not 0 < args.density <= 1:
        raise ValueError(f"--density={args.density}: must be in (0, 1]")
    if args.budget < 1 or args.search_batches < 1:
        raise ValueError(f"--{'budget' if args.budget < 1 else 'search-batches'}: must be >= 1")
    if args.table is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.table))):
        raise ValueError(f"--table={args.table}: its directory does not exist")
    out = _out_arg(args.out, args.overwrite)
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"--set {item}: expected key=value")
    inputs = [read_state(f"MODEL {p}", p) for p in args.models]
    first_label = f"MODEL {args.models[0]}"
    for path, (_, _, st) in zip(args.models[1:], inputs[1:]):
        check_same_keys(f"MODEL {path}", st, first_label, inputs[0][2])
    base = None
    if needs_base:
        _, _, base = read_state("--base", args.base)
        check_same_keys(f"--base {args.base}", base, first_label, inputs[0][2])
    states = [st for _, _, st in inputs]
    if not any(o.partition("=")[0].strip().startswith("data.") for o in args.overrides):
        args.overrides = [*union_sources([m for _, m, _ in inputs]), *args.overrides]
    _say(f"[1/3] read {n} models ({len(states[0])} tensors each)" + (f" and base {args.base}" if base else ""))
    model, cfg = _load_model("MODEL", inputs[0][0], inputs[0][1])  # the first model: config, buffers, frozen parts
    what = f"--method {args.method}"
    if args.method == "average":
        merged = methods.average(states, weights)
        what += f" weights {weights or 'equal'}"
    elif args.method == "task_arithmetic":
        merged = methods.task_arithmetic(base, states, args.scale, weights)
        what += f" scale {args.scale}" + (f" weights {weights}" if weights else "")
    elif args.method == "ties":
        merged = methods.ties(base, states, args.density, args.scale, weights)
        what += f" density {args.density} scale {args.scale}" + (f" weights {weights}" if weights else "")
    else:
        merged, found = _lorahub(args, cfg, model, states, weights)
        what += f" weights {found}"
    _say(f"[2/3] {what}")
    load_state_into(model, merged)
    from moedist.models.convert_cli import save_model_checkpoint

    with _staged(_emptied(out, args.overwrite)) as tmp:
        save_model_checkpoint(model, cfg, str(tmp), source=f"moedist merge {what} of {', '.join(args.models)}")
    _say(f"[3/3] wrote {out} in {time.perf_counter() - t0:.1f} s")
    if not args.no_eval:
        _evaluate([*([args.base] if args.base else []), *args.models, os.fspath(out)], args.overrides, args.table)
    return out


def _lorahub(args, cfg, model, states: List[State], weights) -> Tuple[State, List[float]]:
    """LoraHub: search w on a few validation batches of the first model's data; returns (merged, w)."""
    if cfg.lora.mode == "none":
        raise ValueError(f"MODEL {args.models[0]}: lora.mode='none'; --method lorahub combines LoRA adapters or "
                         "LoRA experts (use average, task_arithmetic or ties for full fine-tunes)")
    keys = trained_keys(model)
    frozen = [k for k in states[0] if k not in set(keys)]
    lora = [k for k in keys if is_lora_factor_key(k)]
    if not lora:
        raise ValueError(f"MODEL {args.models[0]}: no LoRA factors (lora_A/lora_B) to combine")
    # routers, shared experts, ... that the lora config also trains: their equal average (a soup), since
    # sum_i w_i theta_i with sum_i w_i != 1 would rescale them
    soup = methods.average([{k: st[k] for k in keys if k not in set(lora)} for st in states])

    def compose(w: List[float]) -> State:
        return {**methods.linear_combination(states, w, lora), **soup}

    for path, st in zip(args.models[1:], states[1:]):
        for k in frozen:
            if not torch.equal(st[k], states[0][k]):
                raise ValueError(f"MODEL {path}: frozen tensor {k} differs from MODEL {args.models[0]}'s; lorahub "
                                 "combines adapters of one base")
    from moedist.merge.lorahub import search

    trainer = _evaluator(args.models[0], [*args.overrides, f"train.eval_batches={args.search_batches}"])
    metric = f"val_loss_{args.domain}" if args.domain else "val_loss"
    calls: List[Tuple[List[float], float]] = []

    def objective(w: List[float]) -> float:
        load_state_into(trainer.model, compose(w))
        vals = trainer.evaluate_all()
        if metric not in vals:
            raise ValueError(f"--domain={args.domain}: no data source of that name (have "
                             f"{', '.join(k[len('val_loss_'):] for k in vals if k != 'val_loss')})")
        f = vals[metric] + args.l1 * sum(abs(x) for x in w)
        calls.append((w, f))
        _say(f"      lorahub {len(calls):>3}/{args.budget}: w = [{', '.join(f'{x:+.3f}' for x in w)}]  "
             f"{metric} + l1 = {f:.4f}")
        return f

    w, f, used, how = search(objective, len(states), args.budget, weights)
    _say(f"      lorahub ({how}, {used} evaluations): w = [{', '.join(f'{x:+.4f}' for x in w)}], objective {f:.4f}")
    return compose(w), [round(x, 6) for x in w]


def _ensure_dist() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        from moedist.distributed import init_distributed

        init_distributed()


def _evaluator(target: str, overrides: List[str]):
    """A one-process Trainer holding `target`'s weights (EP=1), for repeated evaluation."""
    from moedist.train.evaluate import eval_config
    from moedist.train.trainer import Trainer

    cfg, ckpt = eval_config(target, [*overrides, "parallel.ep_size=1"], 1)
    _ensure_dist()
    trainer = Trainer(cfg, write_outputs=False, console=False, save_checkpoints=False)
    if cfg.train.resume is not None:
        trainer.resume()
    return trainer


def _evaluate(targets: List[str], overrides: List[str], table: Optional[str]) -> None:
    """Every input and the merged model per domain (the code of `moedist eval`), printed as a table."""
    from moedist.train.eval_compare import markdown_table, write_text_atomic
    from moedist.train.evaluate import eval_config, evaluate_models

    specs = [(t, *eval_config(t, overrides, 1)) for t in targets]
    _ensure_dist()
    text = markdown_table(evaluate_models(specs))
    _say(text.rstrip("\n"))
    if table:
        write_text_atomic(table, text)
