"""`moedist grow` and `moedist extract --domain`: add experts to a trained model, or cut out one domain's.

    moedist grow runs/base --add-experts 2 --group code runs/grown      # E -> E + 2, group 'code' gains them
    moedist extract runs/base --domain code runs/code_only               # shared parts + code's g experts

Both read a full moedist checkpoint (or a run directory: its final/, else its latest
checkpoint), rebuild its model, copy tensors into a model of the new expert count and
write a checkpoint keyed by global expert id (layout-independent: any EP size that
divides the new count loads it). The output is a converted model (step 0, no optimizer
state): train it with ``model.init_from=OUT`` or evaluate it with ``moedist eval OUT``.

grow (E experts -> E + N; new ids E .. E+N-1):
  * old experts, their router rows and every other tensor are copied bitwise;
  * new expert j (j = 0..N-1) is a copy of the group's expert members[j mod g] (its weights,
    or its LoRA adapters in the LoRA modes, whose frozen base is shared anyway);
  * new router rows (and noise-gate rows, balancing-bias entries) are zero: tokens of other
    domains never see the new experts (outside their groups), so their outputs are unchanged;
    for the group's own tokens the old experts keep their relative order and a new expert is
    chosen only where its logit 0 beats the token's k-th best old logit;
  * the config's moe.expert_groups[NAME] gains the new ids (a data source without a group,
    which routed over all E experts, gets the group all E old + N new ids).

extract --domain NAME (group of g experts -> a model with num_experts = g):
  * expert members[j] becomes expert j (config order), router rows sliced the same way;
  * the config keeps only that data source, moe.expert_groups = {NAME: [0..g-1]},
    moe.freeze_experts renumbered, a capacity factor scaled by g / E (same capacity);
  * on that domain's tokens its logits equal the full model's (the full model only routes
    them to the group; random group routing keeps its positions).
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from moedist.checkpoint.cli import _dir_bytes, _emptied, _fmt_bytes, _load_model, _Parser, _run, _say, _staged, full_source
from moedist.cli_format import DefaultsFormatter

ROUTER_ROWS = ("router.weight", "router.noise_weight")


def _source_names(raw: dict) -> List[str]:
    return [s.get("name") for s in ((raw.get("data") or {}).get("sources") or [])]


def expert_map_tensors(old: Dict[str, torch.Tensor], new_shapes: Dict[str, torch.Size], expert_names: set,
                       src_of_new: List[Optional[int]], zero_router_rows: bool) -> Dict[str, torch.Tensor]:
    """The tensors of the new model from the old ones (pure: no module, no file).

    Args:
        old: name -> tensor of the old model (stacked experts [E_old, ...], routers [E_old, H]).
        new_shapes: name -> shape in the new model (same names).
        expert_names: names stacked by expert (leading dim = experts).
        src_of_new: for each new expert id, the old id it comes from.
        zero_router_rows: router rows and expert-bias entries of new ids that are not an old id at the
            same index start at zero (grow) instead of copying the source row (extract).
    """
    out = {}
    idx = torch.tensor(src_of_new, dtype=torch.long)
    for name, shape in new_shapes.items():
        t = old[name]
        is_router = name.endswith(ROUTER_ROWS) or name.endswith("router.expert_bias")
        if name in expert_names or is_router:
            y = t.index_select(0, idx).clone()           # [E_new, ...]
            if is_router and zero_router_rows:
                fresh = torch.tensor([i != s for i, s in enumerate(src_of_new)])
                y[fresh] = 0
            out[name] = y
        else:
            out[name] = t.clone()
        if tuple(out[name].shape) != tuple(shape):
            raise ValueError(f"{name}: mapped shape {tuple(out[name].shape)} != model shape {tuple(shape)}")
    return out


def _rebuild(label: str, ckpt: Path, m: dict, new_raw: dict, src_of_new: List[int], zero_router_rows: bool):
    """(old model, new model) with the new model's tensors mapped from the old one."""
    from moedist.checkpoint.cli import _config
    from moedist.checkpoint.keys import param_slots
    from moedist.models.build import build_model

    old_model, _ = _load_model(label, ckpt, m)
    cfg = _config(label, ckpt, new_raw, clear_from_hf=True)
    new_model = build_model(cfg)
    old = {**dict(old_model.named_parameters()), **{n: b for n, b in old_model.named_buffers() if b is not None}}
    new = {**dict(new_model.named_parameters()), **{n: b for n, b in new_model.named_buffers() if b is not None}}
    mapped = expert_map_tensors({n: t.detach() for n, t in old.items()}, {n: t.shape for n, t in new.items()},
                                set(param_slots(new_model)), src_of_new, zero_router_rows)
    with torch.no_grad():
        for n, t in new.items():
            t.copy_(mapped[n])
    return old_model, new_model


def _write(ckpt: Path, m: dict, out: Path, overwrite: bool, model, raw: dict, note: Dict[str, str]) -> None:
    """Save `model` as a converted checkpoint (step 0, no optimizer state) plus the source's tokenizer files."""
    from moedist.checkpoint.io import save_checkpoint

    with _staged(_emptied(out, overwrite)) as tmp:
        save_checkpoint(tmp, model, step=0, config=raw, extra_state=dict(note))
        (tmp.parent / "latest").unlink(missing_ok=True)  # save_checkpoint names it `latest` beside it
        for f in ckpt.iterdir():  # the tokenizer saved beside the weights, if any
            if f.is_file() and f.name != "manifest.json" and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)


# ------------------------------------------------------------------ grow

_ADAPTER_ONLY = "an adapter-only checkpoint; merge it first (moedist merge)"

def grow(src: str, add: int, group: str, out_path: str, overwrite: bool = False) -> Path:
    """Add `add` experts to every MoE layer of the checkpoint `src`, into group `group`; write `out_path`."""
    t0 = time.perf_counter()
    ckpt, m, out = full_source("CKPT", src, out_path, overwrite, _ADAPTER_ONLY)
    if add < 1:
        raise ValueError(f"--add-experts={add}: must be >= 1")
    raw = copy.deepcopy(m["config"])
    moe = raw.setdefault("moe", {})
    if (raw.get("model") or {}).get("moe_every", 1) == 0:
        raise ValueError(f"CKPT={ckpt}: a dense model (model.moe_every=0) has no experts to grow")
    E = int(moe.get("num_experts", 8))
    groups = {k: list(v) for k, v in (moe.get("expert_groups") or {}).items()}
    names = _source_names(raw)
    if group not in groups and group not in names:
        raise ValueError(f"--group={group}: not a group or data source of CKPT's config (groups: "
                         f"{', '.join(groups) or 'none'}; sources: {', '.join(names) or 'none'}); for a new domain "
                         "grow an existing group, or set moe.expert_groups in the next run's config")
    members = groups.get(group, list(range(E)))
    new_ids = list(range(E, E + add))
    src_of_new = list(range(E)) + [members[j % len(members)] for j in range(add)]
    groups[group] = members + new_ids
    moe["num_experts"], moe["expert_groups"] = E + add, groups
    par = raw.setdefault("parallel", {})
    if (E + add) % int(par.get("ep_size", 1)):
        par["ep_size"] = 1
    _say(f"[1/2] reading {ckpt} (step {m['step']}, {E} experts, {_fmt_bytes(_dir_bytes(ckpt))})")
    _, model = _rebuild("CKPT", ckpt, m, raw, src_of_new, zero_router_rows=True)
    _say(f"[2/2] writing {E + add} experts per MoE layer (new {new_ids[0]}..{new_ids[-1]} copy {group}'s "
         f"{[members[j % len(members)] for j in range(add)]}, router rows 0) to {out}")
    _write(ckpt, m, out, overwrite, model, raw, {"grown_from": str(ckpt)})
    _say(f"grew {ckpt} from {E} to {E + add} experts (group {group}: {groups[group]}) into {out} "
         f"in {time.perf_counter() - t0:.1f} s")
    return out


def _grow_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moedist grow", description="Add experts to every MoE layer of a trained checkpoint. Old "
                "experts, router rows and all other weights are copied bitwise; new expert j copies the group's "
                "expert members[j mod g] (weights, or LoRA adapters in the LoRA modes); new router rows start at "
                "zero, so other domains' routing and outputs are unchanged. The group gains the new ids in the "
                "saved moe.expert_groups. Output: a step-0 checkpoint for model.init_from or moedist eval.",
                formatter_class=DefaultsFormatter)
    p.add_argument("ckpt", metavar="CKPT", help="full moedist checkpoint, or a run directory (its final/, else "
                   "its latest checkpoint)")
    p.add_argument("--add-experts", type=int, required=True, metavar="N", default=argparse.SUPPRESS,
                   help="experts to add per MoE layer (>= 1; required)")
    p.add_argument("--group", required=True, metavar="NAME", default=argparse.SUPPRESS,
                   help="the domain (a moe.expert_groups key or a data.sources name of CKPT's config) that gets "
                        "the new experts (required)")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory (must not exist, or be empty)")
    p.add_argument("--overwrite", action="store_true", default=False,
                   help="replace OUT when it exists and is not empty")
    return p


def main_grow(argv: Optional[List[str]] = None) -> int:
    """Entry point of `moedist grow` (argv without the subcommand name). Returns the exit code."""
    return _run("moedist grow", _grow_parser(), argv,
                lambda a: grow(a.ckpt, a.add_experts, a.group, a.out, a.overwrite))


# ------------------------------------------------------------------ extract --domain

def domain_config(raw: dict, domain: str) -> Tuple[dict, List[int]]:
    """(config of the sub-model of `domain`, its experts' old ids in new-id order); ValueError if no group."""
    raw = copy.deepcopy(raw)
    moe = raw.setdefault("moe", {})
    groups = moe.get("expert_groups") or {}
    if domain not in groups:
        raise ValueError(f"--domain={domain}: CKPT's config has no group {domain!r} in moe.expert_groups "
                         f"(groups: {', '.join(groups) or 'none'})")
    members = [int(i) for i in groups[domain]]
    E, g = int(moe.get("num_experts", 8)), len(members)
    moe["num_experts"], moe["expert_groups"] = g, {domain: list(range(g))}
    moe["freeze_experts"] = [members.index(i) for i in moe.get("freeze_experts") or [] if i in members]
    if moe.get("capacity_factor"):
        moe["capacity_factor"] = float(moe["capacity_factor"]) * g / E   # the same ceil(f * T * K / E)
    data = raw.setdefault("data", {})
    data["sources"] = [s for s in data.get("sources") or [] if s.get("name") == domain]
    par = raw.setdefault("parallel", {})
    if g % int(par.get("ep_size", 1)):
        par["ep_size"] = 1
    return raw, members


def extract_domain(src: str, domain: str, out_path: str, overwrite: bool = False) -> Path:
    """Write the sub-model of `domain` (shared parts + its group's experts, renumbered) to `out_path`."""
    t0 = time.perf_counter()
    ckpt, m, out = full_source("CKPT", src, out_path, overwrite, _ADAPTER_ONLY)
    raw, members = domain_config(m["config"], domain)
    E = int((m["config"].get("moe") or {}).get("num_experts", 8))
    _say(f"[1/2] reading {ckpt} (step {m['step']}, {E} experts, {_fmt_bytes(_dir_bytes(ckpt))})")
    old, model = _rebuild("CKPT", ckpt, m, raw, members, zero_router_rows=False)
    _say(f"[2/2] writing {len(members)} experts (old ids {members} -> 0..{len(members) - 1}) to {out}")
    _write(ckpt, m, out, overwrite, model, raw, {"extracted_from": str(ckpt), "domain": domain})
    total, kept = sum(p.numel() for p in old.parameters()), sum(p.numel() for p in model.parameters())
    _say(f"extracted domain {domain} from {ckpt} to {out}: parameters {total:,} -> {kept:,} "
         f"({100.0 * kept / max(total, 1):.1f}%) in {time.perf_counter() - t0:.1f} s")
    return out
