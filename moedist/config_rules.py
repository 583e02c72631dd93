"""The cross-key rules of a run config: what no single key's type, bounds or choices can say.

Called once from :func:`moedist.config.validate` after the per-key pass; no torch here. Every
problem is one :class:`ConfigError` line that starts with the dotted key.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from moedist.choices import LORA_TARGETS, ROPE_SCALING_TYPES, SOURCE_FORMATS, SOURCE_KEYS
from moedist.config_yaml import ConfigError
from moedist.config_yaml import fmt_value as _fmt


_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_scaling_rules(rs: dict | None) -> None:
    """`model.rope_scaling`: null (or {}) = none, else an HF-style mapping the rotary code can apply."""
    if not rs:
        return
    kind = rs.get("rope_type")
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(f"model.rope_scaling.rope_type={_fmt(kind)}: must be one of {'|'.join(ROPE_SCALING_TYPES)}")
    keys = _ROPE_KEYS[kind]
    for k in keys:
        v = rs.get(k)
        if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"model.rope_scaling.{k}={_fmt(v)}: must be a number > 0 (rope_type {kind} needs "
                              f"{', '.join(keys)})")
    extra = sorted(set(rs) - set(keys) - {"rope_type"})
    if extra:
        raise ConfigError(f"model.rope_scaling.{extra[0]}: unknown key for rope_type {kind} (allowed: "
                          f"rope_type, {', '.join(keys)})")
    if kind == "llama3" and rs["high_freq_factor"] <= rs["low_freq_factor"]:
        raise ConfigError(f"model.rope_scaling.high_freq_factor={_fmt(rs['high_freq_factor'])}: must be > "
                          f"low_freq_factor ({_fmt(rs['low_freq_factor'])})")


def cross_key_rules(cfg: Any) -> None:
    """Raise ConfigError for the first cross-key problem of `cfg` (a `MoedistConfig`)."""
    m, moe, lora, par, tr, data, ds = cfg.model, cfg.moe, cfg.lora, cfg.parallel, cfg.train, cfg.data, cfg.deepspeed

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(cfg.name.strip() != "", f"name={_fmt(cfg.name)}: must be a non-empty string")
    # model shape
    need(m.head_dim is not None or m.hidden_size % m.num_heads == 0,
         f"model.hidden_size={m.hidden_size}: must be divisible by model.num_heads ({m.num_heads})")
    need(m.num_heads % m.num_kv_heads == 0,
         f"model.num_kv_heads={m.num_kv_heads}: must divide model.num_heads ({m.num_heads})")
    need(m.head_dim is not None or (m.hidden_size // m.num_heads) % 2 == 0,
         f"model.hidden_size={m.hidden_size}: head dim hidden_size / num_heads "
         f"({m.hidden_size // m.num_heads}) must be even for rotary embeddings")
    need(m.head_dim is None or m.head_dim % 2 == 0, f"model.head_dim={m.head_dim}: must be even for rotary embeddings")
    need(m.moe_every <= m.num_layers, f"model.moe_every={m.moe_every}: must be <= model.num_layers "
                                      f"({m.num_layers}), or 0 for a dense model")
    bad_layers = [i for i in m.mlp_only_layers if not 0 <= i < m.num_layers]
    need(not bad_layers, f"model.mlp_only_layers={_fmt(m.mlp_only_layers)}: each must be a layer index 0 .. "
                         f"{m.num_layers - 1} (model.num_layers={m.num_layers}; {bad_layers[0] if bad_layers else ''} "
                         "is not)")
    rope_scaling_rules(m.rope_scaling)
    need(m.from_hf is None or os.path.isdir(m.from_hf),
         f"model.from_hf={_fmt(m.from_hf)}: must be an existing local model directory or null")
    need(m.init_from is None or os.path.isdir(m.init_from),
         f"model.init_from={_fmt(m.init_from)}: must be an existing moedist checkpoint or run directory, or null")
    need(m.init_from is None or m.from_hf is None,
         f"model.init_from={_fmt(m.init_from)}: cannot be combined with model.from_hf={_fmt(m.from_hf)}; "
         "convert the Hugging Face model first (moedist convert from-hf) or use one of them")
    need(m.from_hf is not None or m.init_from is not None or m.vocab_size >= 256,
         f"model.vocab_size={m.vocab_size}: must be >= 256 for byte-level data (no model.from_hf)")
    # routing
    has_moe = m.moe_every > 0
    need(moe.top_k <= moe.num_experts, f"moe.top_k={moe.top_k}: must be <= moe.num_experts ({moe.num_experts})")
    need(moe.num_experts % par.ep_size == 0,
         f"moe.num_experts={moe.num_experts}: must be divisible by parallel.ep_size ({par.ep_size})")
    need(not moe.shared_expert_gate or moe.num_shared_experts > 0,
         "moe.shared_expert_gate=true: needs moe.num_shared_experts >= 1 (got 0)")
    need(not moe.expert_bias or moe.score_func == "sigmoid",
         "moe.expert_bias=true: needs moe.score_func=sigmoid (the bias only biases the sigmoid top-k choice; "
         "with softmax it would be ignored)")
    expert_choice = moe.router_type == "expert_choice"
    need(not expert_choice or bool(moe.capacity_factor),
         "moe.router_type=expert_choice: needs moe.capacity_factor > 0 (each expert takes capacity_factor * T * "
         "top_k / E tokens)")
    need(not expert_choice or moe.eval_capacity_factor != 0,
         "moe.eval_capacity_factor=0: expert_choice routing has no dropless mode; use null or a factor > 0")
    need(not expert_choice or moe.aux_loss_type == "none",
         f"moe.aux_loss_type={_fmt(moe.aux_loss_type)}: expert_choice routing is balanced by construction; "
         "set moe.aux_loss_type=none")
    need(not expert_choice or moe.score_func == "softmax",
         "moe.score_func=sigmoid: expert_choice routing picks tokens by their softmax probability; use softmax")
    need(not expert_choice or not moe.expert_bias,
         "moe.expert_bias=true: balances token-choice routing; it has no effect with moe.router_type=expert_choice")
    need(moe.second_expert_policy == "all" or (moe.top_k == 2 and not expert_choice),
         f"moe.second_expert_policy={_fmt(moe.second_expert_policy)}: needs moe.top_k=2 and "
         f"moe.router_type=token_choice (got top_k={moe.top_k}, router_type={_fmt(moe.router_type)})")
    need(par.ep_size == 1 or has_moe,
         f"parallel.ep_size={par.ep_size}: expert parallelism needs MoE layers but model.moe_every=0")
    # LoRA
    need(lora.mode == "none" or lora.rank > 0, f"lora.rank={lora.rank}: must be > 0 when lora.mode={_fmt(lora.mode)}")
    need(lora.mode not in ("moe_lora", "expert_lora") or has_moe,
         f"lora.mode={_fmt(lora.mode)}: needs MoE layers but model.moe_every=0 (dense model); "
         f"set model.moe_every >= 1 or lora.mode to none|full")
    need(lora.shared_rank == 0 or lora.mode == "moe_lora",
         f"lora.shared_rank={lora.shared_rank}: a shared LoRA expert needs lora.mode=moe_lora "
         f"(got lora.mode={_fmt(lora.mode)}); set lora.shared_rank=0")
    need(lora.mode == "none" or len(lora.targets) > 0,
         f"lora.targets=[]: must name one of {'|'.join(LORA_TARGETS)} when lora.mode={_fmt(lora.mode)}")
    need(len(set(lora.targets)) == len(lora.targets), f"lora.targets={_fmt(lora.targets)}: has duplicates")
    # optimisation
    need(tr.lr_schedule == "constant" or tr.min_lr <= tr.lr,
         f"train.min_lr={_fmt(tr.min_lr)}: must be <= train.lr ({_fmt(tr.lr)})")
    need(all(0 <= b < 1 for b in tr.adam_betas), f"train.adam_betas={_fmt(tr.adam_betas)}: each must be in [0, 1)")
    need(tr.output_dir.strip() != "", f"train.output_dir={_fmt(tr.output_dir)}: must be a non-empty path")
    need(tr.swa_start <= tr.max_steps,
         f"train.swa_start={tr.swa_start}: must be <= train.max_steps ({tr.max_steps}), or 0 = off")
    need(not tr.lawa_k or tr.save_every > 0,
         f"train.lawa_k={tr.lawa_k}: averages saved checkpoints, so it needs train.save_every > 0 (got 0)")
    need(not tr.lawa_k or tr.keep_last == 0 or tr.keep_last >= tr.lawa_k,
         f"train.lawa_k={tr.lawa_k}: needs train.keep_last=0 or >= {tr.lawa_k} (got {tr.keep_last}); older "
         "checkpoints would be deleted before they are averaged")
    need(not tr.lawa_k or tr.save_every == 0 or -(-tr.max_steps // tr.save_every) >= tr.lawa_k,
         f"train.lawa_k={tr.lawa_k}: only {-(-tr.max_steps // max(1, tr.save_every))} checkpoints are saved "
         f"(max_steps={tr.max_steps}, save_every={tr.save_every})")
    need(not (ds.enabled and ds.zero_stage == 3) or not (tr.ema_decay or tr.swa_start or tr.lawa_k),
         f"train.{'ema_decay' if tr.ema_decay else 'swa_start' if tr.swa_start else 'lawa_k'}: weight averages "
         "need whole weights per rank; not supported with deepspeed.zero_stage=3 (use zero_stage 0-2)")
    need(tr.resume in (None, "auto") or os.path.isdir(tr.resume),
         f"train.resume={_fmt(tr.resume)}: must be null, 'auto' or an existing checkpoint directory")
    # data
    need(data.source != "file" or data.path is not None, "data.path=null: must be set when data.source='file'")
    need(data.path is None or (data.source == "file" and not data.sources),
         f"data.path={_fmt(data.path)}: has no effect " + ("with data.sources (list the file there)" if data.sources
                                                           else f"unless data.source='file' (got {_fmt(data.source)})"))
    need(data.source != "file" or os.path.isfile(data.path),
         f"data.path={_fmt(data.path)}: no such file (data.source='file')")
    need(data.seq_len <= m.max_seq_len, f"data.seq_len={data.seq_len}: must be <= model.max_seq_len ({m.max_seq_len})")
    _validate_sources(data.sources)
    from moedist.config_lifelong import validate_lifelong

    validate_lifelong(cfg)
    need(data.tokenizer in (None, "bytes") or bool(data.sources),
         f"data.tokenizer={_fmt(data.tokenizer)}: only used with data.sources (data.source={_fmt(data.source)} "
         "is byte-level); list your files under data.sources")
    # DeepSpeed
    need(not (ds.bf16 and ds.fp16), "deepspeed.fp16=true: cannot be combined with deepspeed.bf16=true")
    need(ds.offload_param == "none" or ds.zero_stage == 3,
         f"deepspeed.offload_param={ds.offload_param!r}: needs deepspeed.zero_stage=3 (got {ds.zero_stage})")
    need(ds.offload_optimizer == "none" or ds.zero_stage >= 1,
         f"deepspeed.offload_optimizer={ds.offload_optimizer!r}: needs deepspeed.zero_stage >= 1 (got {ds.zero_stage})")
    need(ds.offload_optimizer == "none" or tr.optimizer == "adamw",
         f"deepspeed.offload_optimizer={ds.offload_optimizer!r}: needs train.optimizer=adamw (CPU Adam)")
    try:
        json.dumps(ds.extra, allow_nan=False)
    except (TypeError, ValueError):
        raise ConfigError(f"deepspeed.extra={_fmt(ds.extra)}: must be JSON-serializable") from None


def _validate_sources(sources: list) -> None:
    """data.sources: each a mapping with known keys, a unique name, an allowed format and a positive weight."""
    names = set()
    for i, src in enumerate(sources):
        key = f"data.sources[{i}]"
        for k in src:
            if k not in SOURCE_KEYS:
                raise ConfigError(f"{key}.{k}: unknown key (allowed: {', '.join(SOURCE_KEYS)})")
        for k in ("name", "path", "format"):
            if k not in src:
                raise ConfigError(f"{key}.{k}: missing (each source needs name, path and format)")
        for k in ("name", "path", "format", "text_field"):
            if k in src and (not isinstance(src[k], str) or not src[k].strip()):
                raise ConfigError(f"{key}.{k}={_fmt(src[k])}: must be a non-empty string")
        name = src["name"]
        if not all(c.isalnum() or c in "_-." for c in name):
            raise ConfigError(f"{key}.name={_fmt(name)}: only letters, digits, '_', '-' and '.' are allowed "
                              "(it names the metric val_loss_<name>)")
        if name in names:
            raise ConfigError(f"{key}.name={_fmt(name)}: duplicate source name")
        names.add(name)
        if src["format"] not in SOURCE_FORMATS:
            raise ConfigError(f"{key}.format={_fmt(src['format'])}: must be one of {'|'.join(SOURCE_FORMATS)}")
        w = src.get("weight", 1.0)
        if type(w) not in (int, float) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"{key}.weight={_fmt(w)}: must be a finite number > 0")
        path = os.path.expanduser(src["path"])
        if not os.path.exists(path):
            raise ConfigError(f"{key}.path={_fmt(src['path'])}: no such file or directory")


def validate_world_size(cfg: Any, world_size: int) -> None:
    """The checks that need the launched world size; call once the process group exists."""
    if world_size % cfg.parallel.ep_size:
        raise ConfigError(f"parallel.ep_size={cfg.parallel.ep_size}: must divide the world size ({world_size})")
