"""`model.init_from`: start a new run from the weights of a moedist checkpoint or run directory.

    moedist convert from-hf PATH/TO/hf_model runs/base
    moedist convert upcycle --method lora_moe --num-experts 8 --top-k 2 --lora-rank 8 runs/base runs/lora_moe
    moedist train configs/tiny.yaml model.init_from=runs/lora_moe train.output_dir=runs/ft

Like `model.from_hf`, the checkpoint decides the architecture: every `model.*` dimension, the
experts (`moe.num_experts`, `top_k`, sizes, scoring, shared experts) and, when it carries
adapters, `lora.mode/rank/alpha/targets`. The run's own settings stay: training, data,
parallelism, routing options such as `moe.capacity_factor`. Unlike `train.resume` it starts at
step 0 with a fresh optimizer and fresh random streams.

A checkpoint without adapters (`lora.mode=none`, e.g. `convert from-hf`) can start any LoRA mode:
the frozen base takes its weights (`q_proj.weight` -> `q_proj.base.weight`; for `moe_lora` the dense
FFN `mlp.w_up` -> `mlp.experts.w_up`), adapters and routers keep their initialisation. Anything
else the model has and the checkpoint lacks is an error naming the parameter.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Iterable, List, Optional, TypeVar

from moedist.config import ConfigError, MoedistConfig

# Keys the checkpoint fixes (its tensors have these shapes); everything else stays as the run sets it.
MODEL_KEEP = ("from_hf", "init_from", "dtype", "init_std")
MOE_ARCH = ("num_experts", "top_k", "num_shared_experts", "shared_expert_gate", "shared_expert_ffn_size",
            "expert_ffn_size", "activation", "score_func", "renormalize", "expert_bias")
LORA_ARCH = ("mode", "rank", "shared_rank", "alpha", "targets")


def init_checkpoint(path: str) -> Path:
    """The checkpoint `model.init_from` names (a checkpoint, or a run directory's final/ or latest one).

    Raises ConfigError (one line) for a directory holding pickles, or one that holds no checkpoint.
    """
    from moedist.checkpoint.io import CorruptCheckpoint, read_manifest, resolve_checkpoint
    from moedist.checkpoint.safety import refuse_pickles

    if not os.path.isdir(path):
        raise ConfigError(f"model.init_from={path!r}: no such directory")
    refuse_pickles(path, "model.init_from")
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"model.init_from={path!r}: not a moedist checkpoint or run directory (no manifest.json, "
                          "final/ or checkpoints/latest); for a Hugging Face directory use model.from_hf")
    try:
        manifest = read_manifest(ckpt)
    except CorruptCheckpoint as err:
        raise ConfigError(f"model.init_from={path!r}: {err}") from None
    if not manifest.get("config"):
        raise ConfigError(f"model.init_from={path!r}: {ckpt} has no config; cannot rebuild its model")
    if manifest.get("adapter_only"):
        raise ConfigError(f"model.init_from={path!r}: {ckpt} is adapter-only; merge it first "
                          "(moedist merge ADAPTER --base BASE OUT)")
    return ckpt


def apply_init_from(cfg: MoedistConfig) -> MoedistConfig:
    """For a config with model.init_from set: the config with the checkpoint's architecture (else `cfg`)."""
    if not cfg.model.init_from:
        return cfg
    from moedist.checkpoint.io import read_manifest
    from moedist.config import config_from_dict

    ckpt = init_checkpoint(cfg.model.init_from)
    manifest = read_manifest(ckpt)
    try:
        src = config_from_dict(_without_paths(manifest["config"]))
    except ConfigError as err:
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: {ckpt}/manifest.json config: {err}") from None
    model_arch = [f.name for f in dataclasses.fields(src.model) if f.name not in MODEL_KEEP]
    out = dataclasses.replace(copy.deepcopy(cfg), model=_take(cfg.model, src.model, model_arch),
                              moe=_take(cfg.moe, src.moe, MOE_ARCH))
    if src.lora.mode != "none":  # its adapters are weights too
        out.lora = _take(cfg.lora, src.lora, LORA_ARCH)
    elif out.lora.mode == "moe_lora" and src.model.moe_every == 0:
        # LoRA-MoE on the dense FFNs: the run's layers and experts
        out.model = dataclasses.replace(out.model, moe_every=cfg.model.moe_every or 1)
        out.moe = copy.deepcopy(cfg.moe)
    elif out.lora.mode == "moe_lora":
        raise ConfigError(f"lora.mode='moe_lora': needs a dense model but model.init_from={cfg.model.init_from!r} "
                          "already has experts; use expert_lora for LoRA on its experts")
    from moedist.config import validate

    probe = copy.deepcopy(out)
    try:
        validate(probe)
    except ConfigError as err:
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: with its architecture: {err}") from None
    return out


T = TypeVar("T")  # a config section dataclass


def _take(dst: T, src: T, names: Iterable[str]) -> T:
    """A copy of config section `dst` with the fields `names` taken from `src` (same section type)."""
    return dataclasses.replace(copy.deepcopy(dst), **{f: copy.deepcopy(getattr(src, f)) for f in names})


def _without_paths(config: dict) -> dict:
    """A stored config whose paths may no longer exist (data files, resume): only its model matters here."""
    config = copy.deepcopy(config)
    config.get("model", {})["from_hf"] = None
    config.get("model", {})["init_from"] = None
    config.setdefault("train", {})["resume"] = None
    config["data"] = {k: v for k, v in (config.get("data") or {}).items() if k == "seq_len"}  # <= max_seq_len
    config.get("moe", {}).pop("expert_groups", None)  # groups name data sources: the run's own config sets them
    config.get("moe", {}).pop("freeze_experts", None)
    return config


def _candidates(name: str) -> List[str]:
    """Names a parameter may have in a checkpoint without adapters (the frozen base of a LoRA mode)."""
    out = [name]
    if ".base." in name:
        out.append(name.replace(".base.", ".", 1))
    if ".mlp.experts.w_" in name:
        out.append(name.replace(".mlp.experts.w_", ".mlp.w_", 1))
    return out


def _is_fresh(name: str, p, adapters: set) -> bool:
    """Parameters a LoRA mode adds on top of a base (its adapters, `adapters` by id, and the routers):
    they keep their initialisation."""
    return id(p) in adapters or ".router." in name


def load_init_weights(model, path: str, names: Optional[Iterable[str]] = None, verify: bool = True) -> int:
    """Copy the checkpoint's weights into this rank's (sharded or whole) model; returns the tensors loaded.

    Expert tensors are read by global expert id, so any EP layout works. Raises ConfigError naming
    the first parameter the checkpoint lacks (other than adapters/routers) or whose shape differs.
    Meta parameters are checked but not read. verify=False skips the checksums (already verified:
    ZeRO-3 construction calls this once per decoder layer).
    """
    import torch

    from moedist.checkpoint.io import CorruptCheckpoint, _Reader, read_manifest, verify_checkpoint
    from moedist.checkpoint.keys import global_keys_for, param_slots
    from moedist.moe.lora import model_adapter_params

    ckpt = init_checkpoint(path)
    try:
        if verify:
            verify_checkpoint(ckpt)
    except CorruptCheckpoint as err:
        raise ConfigError(f"model.init_from={path!r}: {err}") from None
    rd = _Reader(ckpt, read_manifest(ckpt))
    slots = param_slots(model)
    adapters = {id(p) for p in model_adapter_params(model)}
    loaded = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            for cand in ([name] if name in slots else _candidates(name)):
                keys = global_keys_for(cand, slots[name]) if name in slots else [cand]
                if rd.has(keys[0]):
                    break
            else:
                if _is_fresh(name, p, adapters):
                    continue
                raise ConfigError(f"model.init_from={path!r}: {ckpt} has no weights for {name}")
            if p.is_meta:  # not materialized here (ZeRO-3 builds a layer at a time): nothing to read into
                continue
            t = torch.stack([rd.get(k) for k in keys]) if name in slots else rd.get(keys[0])
            if t.shape != p.shape:
                raise ConfigError(f"model.init_from={path!r}: {name}: checkpoint shape {tuple(t.shape)} != model "
                                  f"shape {tuple(p.shape)}")
            p.copy_(t.to(device=p.device, dtype=p.dtype))
            loaded += 1
        for name, b in model.named_buffers():
            key = f"buffer::{name}"
            if b is not None and rd.has(key):
                b.copy_(rd.get(key).to(device=b.device, dtype=b.dtype))
    return loaded


def model_dir(cfg) -> Optional[str]:
    """The directory the run's weights come from (model.from_hf, or model.init_from's checkpoint), or None;
    its tokenizer is the default data.tokenizer."""
    if cfg.model.from_hf:
        return cfg.model.from_hf
    if cfg.model.init_from:
        return os.fspath(init_checkpoint(cfg.model.init_from))
    return None
