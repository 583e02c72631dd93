"""`moedist convert`: Hugging Face <-> moedist model directories, upcycling, PEFT export.

    moedist convert from-hf HF_DIR OUT [key=value ...]       # HF -> moedist model directory
    moedist convert to-hf SRC OUT [--no-merge]               # moedist -> transformers directory
    moedist convert upcycle SRC OUT --method lora_moe --num-experts 8 --top-k 2 [--lora-rank 8]
    moedist convert peft SRC OUT [--base BASE_OUT]           # LoRA (lora.mode=full) -> PEFT adapter

A moedist model directory holds ``config.yaml`` (the MoedistConfig, model.from_hf
cleared because the weights are here) and ``model.safetensors`` (the model's
state dict; the architecture facts that have no config key yet are stored in
its metadata under ``moedist.arch``). SRC is such a directory, a Hugging Face
directory (its config.json is detected), or ``--config FILE --weights FILE``
for a config plus a safetensors state dict written elsewhere (e.g. by the
trainer); expert tensors may be stacked (``layers.0.mlp.experts.w_up``
[E, H, F]) or keyed by global expert id (``layers.0.mlp.experts.3.w_up``).
Nothing is unpickled.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional

ARCH_EXTRAS = {"model": ("head_dim", "attention_bias", "qk_norm", "mlp_only_layers"), "moe": ("shared_expert_ffn_size",)}


def _arch_extras(cfg) -> Dict[str, dict]:
    return {sec: {k: getattr(getattr(cfg, sec), k) for k in keys if hasattr(getattr(cfg, sec), k)}
            for sec, keys in ARCH_EXTRAS.items()}


def save_moedist_dir(model, cfg, path: str) -> None:
    """config.yaml + model.safetensors (arch extras in its metadata)."""
    import copy

    from safetensors.torch import save_file

    from moedist.config import save_config
    from moedist.models.hf_export import _atomic_write

    os.makedirs(path, exist_ok=True)
    out = copy.deepcopy(cfg)
    out.model.from_hf = None
    save_config(out, os.path.join(path, "config.yaml"))
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "moedist.arch": json.dumps(_arch_extras(cfg))}
    _atomic_write(os.path.join(path, "model.safetensors"), lambda tmp: save_file(state, tmp, metadata=meta))


def _restack(state: Dict, expected: Dict) -> Dict:
    """Turn global-expert keys (`...experts.3.w_up`) back into stacked tensors where the model wants them."""
    import torch

    out = dict(state)
    for name, ref in expected.items():
        if name in out:
            continue
        owner, _, rest = name.rpartition(".experts.")
        if not owner:
            continue
        keys = [f"{owner}.experts.{e}.{rest}" for e in range(ref.shape[0])]
        if all(k in state for k in keys):
            out[name] = torch.stack([state[k] for k in keys])
            for k in keys:
                out.pop(k)
    return out


def load_moedist(config_path: str, weights_path: str, overrides: Optional[List[str]] = None):
    """(model, cfg) from a config YAML and a safetensors state dict."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from moedist.config import load_config
    from moedist.models.build import build_model
    from moedist.models.hf_import import apply_hf_config

    cfg = apply_hf_config(load_config(config_path, overrides))
    with safe_open(weights_path, framework="pt") as fh:
        meta = fh.metadata() or {}
    for sec, values in json.loads(meta.get("moedist.arch", "{}")).items():
        for k, v in values.items():
            setattr(getattr(cfg, sec), k, v)
    model = build_model(cfg)
    state = _restack(load_file(weights_path), model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not match the model of {config_path}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, cfg


def _load_source(src: str, config: Optional[str], weights: Optional[str], overrides=None):
    """A model from a moedist directory, a HF directory, or --config/--weights."""
    from moedist.models.hf_import import from_hf

    if config or weights:
        if not (config and weights):
            raise ValueError("--config and --weights: give both (a config YAML and a safetensors state dict)")
        return load_moedist(config, weights, overrides)
    if src is None:
        raise ValueError("SRC: give a model directory, or --config and --weights")
    if os.path.isfile(os.path.join(src, "config.yaml")):
        return load_moedist(os.path.join(src, "config.yaml"), os.path.join(src, "model.safetensors"), overrides)
    if os.path.isfile(os.path.join(src, "config.json")):
        return from_hf(src, **_sections(overrides or []))
    raise ValueError(f"SRC={src!r}: neither a moedist model directory (config.yaml) nor a Hugging Face "
                     "directory (config.json)")


def _sections(overrides: List[str]) -> Dict[str, dict]:
    """key=value items (YAML values) -> {section: {key: value}} for from_hf."""
    import yaml

    out: Dict[str, dict] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"\w+\.\w+", key.strip()):
            raise ValueError(f"override {item!r}: expected section.key=value, e.g. lora.mode=full")
        section, leaf = key.strip().split(".")
        out.setdefault(section, {})[leaf] = yaml.safe_load(text)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moedist convert", description="Convert between Hugging Face and moedist "
                                "models; upcycle a dense model; export LoRA adapters for PEFT.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def source(sp):
        sp.add_argument("src", nargs="?", help="moedist model directory or Hugging Face directory")
        sp.add_argument("out", help="output directory")
        sp.add_argument("--config", help="config YAML (with --weights, instead of SRC)")
        sp.add_argument("--weights", help="safetensors state dict (with --config)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.mode=full")

    sp = sub.add_parser("from-hf", help="Hugging Face directory -> moedist model directory")
    sp.add_argument("src", help="Hugging Face model directory (config.json + safetensors)")
    sp.add_argument("out", help="output moedist model directory")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. lora.mode=full lora.rank=8")
    sp = sub.add_parser("to-hf", help="moedist model -> transformers directory (LoRA merged)")
    source(sp)
    sp.add_argument("--no-merge", action="store_true", help="write the frozen base without the LoRA adapters")
    sp = sub.add_parser("upcycle", help="dense model -> MoE (sparse upcycling, MoEfication, LoRA-MoE)")
    source(sp)
    sp.add_argument("--method", required=True, choices=("sparse", "moefication", "lora_moe"))
    sp.add_argument("--num-experts", type=int, required=True)
    sp.add_argument("--top-k", type=int, required=True)
    sp.add_argument("--lora-rank", type=int, default=None)
    sp.add_argument("--moe-every", type=int, default=1)
    sp.add_argument("--seed", type=int, default=None)
    sp = sub.add_parser("peft", help="dense model with LoRA (lora.mode=full) -> PEFT adapter directory")
    source(sp)
    sp.add_argument("--base", help="also export the frozen base here (transformers directory)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `moedist convert` (argv without the subcommand name). Returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ValueError as err:
        print(f"moedist convert: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from moedist.models.hf_export import to_hf
    from moedist.models.hf_import import from_hf
    from moedist.models.peft_export import to_peft
    from moedist.models.upcycle import upcycle, upcycled_config

    if args.action == "from-hf":
        model, cfg = from_hf(args.src, **_sections(args.overrides))
        save_moedist_dir(model, cfg, args.out)
        print(f"wrote moedist model ({cfg.model.hf_model_type}, {sum(p.numel() for p in model.parameters())} "
              f"parameters) to {args.out}")
        return 0
    model, cfg = _load_source(args.src, args.config, args.weights, args.overrides)
    if args.action == "to-hf":
        config = to_hf(model, args.out, cfg, merge_lora=not args.no_merge)
        print(f"wrote {config['model_type']} model to {args.out}")
    elif args.action == "upcycle":
        kw = dict(lora_rank=args.lora_rank, moe_every=args.moe_every)
        upcycle(model, args.method, args.num_experts, args.top_k, seed=args.seed, cfg=cfg, **kw)
        ucfg = upcycled_config(cfg, args.method, args.num_experts, args.top_k, **kw)
        save_moedist_dir(model, ucfg, args.out)
        print(f"wrote {args.method} model ({args.num_experts} experts, top-{args.top_k}) to {args.out}")
    else:
        config = to_peft(model, args.out, base_path=args.base)
        print(f"wrote PEFT adapter (r={config['r']}, {len(config['target_modules'])} target modules) to {args.out}")
    return 0
