"""`moedist convert`: Hugging Face <-> moedist checkpoints, upcycling, PEFT export.

    moedist convert from-hf HF_DIR OUT [key=value ...]       # HF -> moedist checkpoint (step 0)
    moedist convert to-hf SRC OUT [--no-merge]               # moedist -> transformers directory
    moedist convert upcycle SRC OUT --method lora_moe --num-experts 8 --top-k 2 [--lora-rank 8]
    moedist convert peft SRC OUT [--base BASE_OUT]           # LoRA (lora.mode=full) -> PEFT adapter

SRC is a moedist checkpoint (`moedist.checkpoint` format: manifest.json with the
config, safetensors keyed by global expert id; or a run directory whose
``latest`` names one) or a Hugging Face directory (config.json; key=value
overrides such as ``lora.mode=full`` apply to it). Checkpoints written here
store the config with model.from_hf cleared (the weights are in the
checkpoint); the architecture facts (head_dim, q/k norm, model.hf_model_type, ...)
are config keys. An adapter-only checkpoint is loaded on top of its config's
model.from_hf. Nothing is unpickled.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Optional

from moedist.choices import UPCYCLE_METHODS
from moedist.cli_format import DefaultsFormatter
from moedist.config import MoedistConfig


def save_model_checkpoint(model, cfg: MoedistConfig, path: str, source: Optional[str] = None) -> None:
    """A step-0 moedist checkpoint of `model` (`moedist.checkpoint` format).

    The config is stored with model.from_hf cleared (the weights are in the checkpoint).
    """
    import dataclasses

    from moedist.checkpoint import save_checkpoint
    from moedist.config import config_to_dict

    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, from_hf=None))
    save_checkpoint(path, model, step=0, config=config_to_dict(out), extra_state={"source": source})


def load_model_checkpoint(path: str):
    """(model, cfg) from a moedist checkpoint directory (or a run directory: its latest checkpoint)."""
    from moedist.checkpoint import load_checkpoint, read_manifest, resolve_checkpoint
    from moedist.config import ConfigError, config_from_dict
    from moedist.models.build import build_model
    from moedist.models.hf_import import apply_hf_config, load_hf_weights_into

    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    if not manifest.get("config"):
        raise ValueError(f"{ckpt}: the checkpoint has no config; cannot rebuild its model")
    try:
        cfg = apply_hf_config(config_from_dict(manifest["config"]))
    except ConfigError as err:
        raise ValueError(f"{ckpt}/manifest.json config: {err}") from None
    model = build_model(cfg)
    if manifest.get("adapter_only"):
        if not cfg.model.from_hf:
            raise ValueError(f"{ckpt}: an adapter-only checkpoint needs its base model (model.from_hf is null)")
        load_hf_weights_into(model, cfg.model.from_hf)
    load_checkpoint(ckpt, model, load_optim=False)
    return model, cfg


def _load_source(src: str, overrides: List[str]):
    """A model from a moedist checkpoint / run directory or a Hugging Face directory."""
    from moedist.checkpoint import resolve_checkpoint
    from moedist.models.hf_import import from_hf

    if resolve_checkpoint(src) is not None:
        if overrides:
            raise ValueError(f"overrides {overrides}: only allowed with a Hugging Face SRC")
        return load_model_checkpoint(src)
    if os.path.isfile(os.path.join(src, "config.json")):
        return from_hf(src, **_sections(overrides))
    raise ValueError(f"SRC={src!r}: neither a moedist checkpoint (manifest.json, or a run directory with "
                     "'latest') nor a Hugging Face directory (config.json)")


def _copy_tokenizer(src: str, out: str) -> None:
    """Save the tokenizer of SRC (its checkpoint, else the run or HF directory itself) into OUT, if any."""
    from moedist.checkpoint import resolve_checkpoint
    from moedist.data.tokenizer import tokenizer_from_dir

    ckpt = resolve_checkpoint(src)
    tok = (tokenizer_from_dir(os.fspath(ckpt)) if ckpt is not None else None) or tokenizer_from_dir(src)
    if tok is not None and os.path.isdir(out):
        tok.save(out)


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
    p.set_defaults(base=None)  # only `peft` has --base
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def source(sp):
        sp.add_argument("src", help="moedist checkpoint (or run directory) or Hugging Face directory")
        sp.add_argument("out", help="output directory")
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for a Hugging Face SRC, e.g. lora.mode=full")

    def overwrite(sp):
        sp.add_argument("--overwrite", action="store_true",
                        help="replace OUT when it exists and is not empty (default: refuse)")

    fmt = DefaultsFormatter
    sp = sub.add_parser("from-hf", help="Hugging Face directory -> moedist checkpoint (step 0)", formatter_class=fmt)
    sp.add_argument("src", help="Hugging Face model directory (config.json + safetensors)")
    sp.add_argument("out", help="output checkpoint directory (train from it with model.init_from=OUT)")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. lora.mode=full lora.rank=8")
    overwrite(sp)
    sp = sub.add_parser("to-hf", help="moedist model -> transformers directory (LoRA merged)", formatter_class=fmt)
    source(sp)
    sp.add_argument("--no-merge", action="store_true", help="write the frozen base without the LoRA adapters")
    overwrite(sp)
    sp = sub.add_parser("upcycle", help="dense model -> MoE (sparse upcycling, MoEfication, LoRA-MoE)",
                        formatter_class=fmt)
    source(sp)
    sp.add_argument("--method", required=True, choices=UPCYCLE_METHODS,
                    help="sparse: copy the FFN into every expert; moefication: split the FFN into experts; "
                         "lora_moe: frozen FFN + a router over LoRA experts")
    sp.add_argument("--num-experts", type=int, required=True, help="experts per MoE layer")
    sp.add_argument("--top-k", type=int, required=True, help="experts chosen per token")
    sp.add_argument("--lora-rank", type=int, default=None, help="LoRA rank of the lora_moe experts")
    sp.add_argument("--moe-every", type=int, default=1, help="make every n-th layer MoE")
    sp.add_argument("--seed", type=int, default=None, help="init seed of routers/LoRA (default: the config's)")
    overwrite(sp)
    sp = sub.add_parser("peft", help="dense model with LoRA (lora.mode=full) -> PEFT adapter directory",
                        formatter_class=fmt)
    source(sp)
    sp.add_argument("--base", help="also export the frozen base here (transformers directory)")
    overwrite(sp)
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

    from moedist.checkpoint.outdir import check_out

    outs = [("OUT", args.out)] + ([("--base", args.base)] if args.base else [])
    for label, path in outs:
        if os.path.abspath(path) == os.path.abspath(args.src):
            raise ValueError(f"{label}={path}: is SRC; choose another output directory")
        check_out(path, args.overwrite, label, clear=False)  # refuse early; cleared after SRC is read
    if args.action == "from-hf":
        model, cfg = from_hf(args.src, **_sections(args.overrides))
        _clear_outs(outs, args.overwrite)
        save_model_checkpoint(model, cfg, args.out, source=os.path.abspath(args.src))
        _copy_tokenizer(args.src, args.out)
        print(f"wrote moedist model ({cfg.model.hf_model_type}, {sum(p.numel() for p in model.parameters())} "
              f"parameters) to {args.out}")
        return 0
    model, cfg = _load_source(args.src, args.overrides)
    _clear_outs(outs, args.overwrite)
    if args.action == "to-hf":
        if cfg.model.moe_every and cfg.moe.capacity_factor:
            print(f"moedist convert: warning: the model was trained with moe.capacity_factor={cfg.moe.capacity_factor} "
                  "(over-full experts drop tokens); transformers runs it dropless, so its outputs can differ where "
                  "tokens were dropped", file=sys.stderr, flush=True)
        every = list(range(cfg.moe.num_experts))
        if cfg.model.moe_every and (cfg.moe.group_routing != "learned" or any(
                sorted(ids) != every for ids in cfg.moe.expert_groups.values())):  # an extracted sub-model: no
            print("moedist convert: warning: moe.expert_groups / group_routing are not part of the Hugging Face "
                  "format: transformers routes every token over all experts by the router (moedist extract "
                  "--domain NAME first gives one domain's sub-model)", file=sys.stderr, flush=True)
        config = to_hf(model, args.out, cfg, merge_lora=not args.no_merge)
        _copy_tokenizer(args.src, args.out)
        print(f"wrote {config['model_type']} model to {args.out}")
    elif args.action == "upcycle":
        kw = dict(lora_rank=args.lora_rank, moe_every=args.moe_every)
        upcycle(model, args.method, args.num_experts, args.top_k, seed=args.seed, cfg=cfg, **kw)
        ucfg = upcycled_config(cfg, args.method, args.num_experts, args.top_k, **kw)
        save_model_checkpoint(model, ucfg, args.out, source=args.src)
        print(f"wrote {args.method} model ({args.num_experts} experts, top-{args.top_k}) to {args.out}")
    else:
        config = to_peft(model, args.out, base_path=args.base,
                         base_model_name_or_path=_peft_base_name(args.src, cfg, args.base))
        print(f"wrote PEFT adapter (r={config['r']}, {len(config['target_modules'])} target modules) to {args.out}")
    return 0


def _clear_outs(outs, overwrite: bool) -> None:
    """--overwrite: empty the output directories (after SRC was read, so a failed load leaves them alone)."""
    from moedist.checkpoint.outdir import check_out

    for label, path in outs:
        check_out(path, overwrite, label)


def _peft_base_name(src: str, cfg, base_out: Optional[str]) -> Optional[str]:
    """adapter_config.json's base_model_name_or_path: --base (absolute), else the Hugging Face directory the
    model came from (model.from_hf of the run, the source of a converted checkpoint, or SRC itself), absolute."""
    from moedist.checkpoint import read_manifest, resolve_checkpoint

    if base_out:
        return os.path.abspath(base_out)
    candidates, seen = [cfg.model.from_hf], set()
    ckpt = resolve_checkpoint(src)
    if ckpt is None:
        candidates.append(src)
    while ckpt is not None and os.path.abspath(ckpt) not in seen:  # follow model.init_from back to the HF model
        seen.add(os.path.abspath(ckpt))
        m = read_manifest(ckpt)
        model = (m.get("config") or {}).get("model") or {}
        candidates += [model.get("from_hf"), (m.get("extra_state") or {}).get("source")]
        init = model.get("init_from")
        ckpt = resolve_checkpoint(init) if isinstance(init, str) and os.path.isdir(init) else None
    for c in candidates:
        if isinstance(c, str) and os.path.isfile(os.path.join(c, "config.json")):
            return os.path.abspath(c)
    return next((c for c in candidates if isinstance(c, str) and c), None)  # e.g. an HF id
