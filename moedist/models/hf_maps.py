"""Hugging Face config.json <-> MoedistConfig, and the architecture rules of both directions.

Supported HF architectures (``model_type``):

=============  =================================================================
llama          dense; optional tied embeddings
mistral        dense; its sliding window caps ``model.max_seq_len`` (shorter
               sequences attend exactly as full causal attention)
qwen2          dense; q/k/v bias
qwen3          dense; q/k RMSNorm, ``head_dim`` override
mixtral        every layer MoE: softmax top-k, renormalised
qwen2_moe      MoE every ``decoder_sparse_step`` layers except ``mlp_only_layers``;
               softmax top-k renormalised iff ``norm_topk_prob``; one shared
               expert with a sigmoid gate; q/k/v bias
qwen3_moe      as qwen2_moe without shared expert; q/k RMSNorm, ``head_dim``
=============  =================================================================

Every architecture fact lands in a typed config key (``model.head_dim``,
``model.attention_bias``, ``model.qk_norm``, ``model.mlp_only_layers``,
``model.rope_scaling``, ``moe.shared_expert_ffn_size`` and, informational,
``model.hf_model_type``), so it survives `save_config` and checkpoint manifests.
They are re-derived from ``model.from_hf`` whenever a run starts from a Hugging
Face directory. (Checkpoints written before these keys existed kept them in the
manifest's ``extra_state["moedist.arch"]``; `moedist.checkpoint.io.read_manifest`
moves them into the config.)

This module never imports transformers: it reads and writes plain JSON dicts.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Dict, Optional

from moedist.choices import HF_DENSE_TYPES, HF_MODEL_TYPES, HF_MOE_TYPES, ROPE_TYPES

DENSE_TYPES, MOE_TYPES, SUPPORTED = HF_DENSE_TYPES, HF_MOE_TYPES, HF_MODEL_TYPES
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


# Class defaults of transformers for keys a config.json may omit.
_ROPE_THETA = {"mixtral": 1e6}
_EPS = {"mixtral": 1e-5}

# Keys the HF checkpoint fixes; overriding them would no longer match the weights.
ARCH_KEYS = {
    "model": ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size",
              "rope_theta", "norm_eps", "tie_embeddings", "from_hf", "head_dim", "attention_bias", "qk_norm",
              "mlp_only_layers", "hf_model_type"),
    "moe": ("expert_ffn_size", "num_shared_experts", "shared_expert_gate", "activation", "shared_expert_ffn_size"),
}
ARCH_KEYS_MOE = {"model": ("moe_every",), "moe": ("num_experts",)}


def read_hf_config(source) -> Dict[str, Any]:
    """config.json of a model directory, or ``model.config.to_dict()`` of an in-memory HF model."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.join(os.fspath(source), "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"path_or_model={os.fspath(source)!r}: no config.json (expected a Hugging Face "
                             "model directory written by save_pretrained)")
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    config = getattr(source, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"path_or_model: expected a model directory or a transformers PreTrainedModel, "
                         f"got {type(source).__name__}")
    return config.to_dict()


def _rope(hf: dict, model_type: str):
    """(rope_theta, rope_scaling or None) from transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    rope = dict(hf.get("rope_scaling") or {}, **(hf.get("rope_parameters") or {}))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type={kind!r}: supported rotary embeddings are {', '.join(ROPE_TYPES)}")
    theta = float(rope.get("rope_theta") or hf.get("rope_theta") or _ROPE_THETA.get(model_type, 10000.0))
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    scaling = None if kind == "default" else dict({k: rope[k] for k in keys if k in rope}, rope_type=kind)
    return theta, scaling


def _num_experts(hf: dict) -> int:
    return int(hf.get("num_local_experts") or hf.get("num_experts") or 0)


def _apply_overrides(cfg, mt: str, overrides: Dict[str, Any]) -> None:
    """Set ``{section: {key: value}}`` on `cfg` (in place), refusing keys the checkpoint fixes or the config lacks."""
    sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    for section, values in overrides.items():
        if not isinstance(values, dict) or section not in sections:
            raise ValueError(f"from_hf override {section}={values!r}: expected a config section name "
                             "with a dict of keys, e.g. lora={'mode': 'full'}")
        fixed = ARCH_KEYS.get(section, ()) + (ARCH_KEYS_MOE.get(section, ()) if mt in MOE_TYPES else ())
        old = getattr(cfg, section)
        known = {f.name for f in dataclasses.fields(old)}
        for key in values:
            if key in fixed:
                raise ValueError(f"{section}.{key}: fixed by the Hugging Face checkpoint ({mt}), cannot be overridden")
            if key not in known:
                raise ValueError(f"{section}.{key}: unknown key for from_hf overrides")
        setattr(cfg, section, dataclasses.replace(old, **values))


def hf_to_moedist_config(hf: Dict[str, Any], base=None, from_hf: Optional[str] = None, **overrides):
    """The MoedistConfig of a Hugging Face model.

    Args:
        hf: the HF config as a dict (`read_hf_config`).
        base: a MoedistConfig whose non-architecture settings (train, data, lora,
            routing options such as moe.aux_loss_type) are kept; default: config defaults.
        from_hf: the model directory, recorded as model.from_hf.
        **overrides: per section, a dict of keys to set afterwards, e.g.
            ``lora={"mode": "full", "rank": 8}, moe={"capacity_factor": 1.25}``.
            Keys the checkpoint fixes (hidden size, experts, ...) are refused.

    What the checkpoint decides replaces the base: all model dimensions, and for
    MoE checkpoints which layers are MoE, num_experts, top_k, renormalize (Mixtral:
    true; Qwen: norm_topk_prob), softmax scoring, expert/shared-expert sizes and the
    shared-expert gate. Training-time routing options stay as in the base:
    moe.capacity_factor (default null = dropless, which is what transformers
    computes: it never drops tokens), aux/z-loss coefficients, jitter, drop policy.
    A dense checkpoint gets model.moe_every=0, unless lora.mode is moe_lora (LoRA-MoE
    on the dense FFNs): then the base's moe_every (1 when it says 0) and
    moe.num_experts/top_k stay as set.

    Raises:
        ValueError: unsupported architecture or option, or a bad override key.
    """
    from moedist.config import ConfigError, load_config, validate

    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"model_type={mt!r}: supported Hugging Face architectures are {', '.join(SUPPORTED)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r}: only silu (SwiGLU FFNs) is supported")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true: FFN biases are not supported")
    if mt in ("llama", "mistral", "qwen3", "qwen3_moe") and hf.get("attention_bias"):
        raise ValueError(f"attention_bias=true ({mt}): an o_proj bias is not supported")
    cfg = load_config(None) if base is None else copy.deepcopy(base)
    m, moe = cfg.model, cfg.moe
    H, nh = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    m.vocab_size, m.hidden_size, m.num_layers = int(hf["vocab_size"]), H, int(hf["num_hidden_layers"])
    m.num_heads, m.num_kv_heads = nh, int(hf.get("num_key_value_heads") or nh)
    m.ffn_size = int(hf["intermediate_size"])
    m.rope_theta, m.rope_scaling = _rope(hf, mt)
    m.norm_eps = float(hf.get("rms_norm_eps") or _EPS.get(mt, 1e-6))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.max_seq_len = int(hf.get("max_position_embeddings") or m.max_seq_len)
    window = hf.get("sliding_window") if (mt in ("mistral", "mixtral") or hf.get("use_sliding_window")) else None
    if window:  # attention within the window only: sequences no longer than it see full causal attention
        m.max_seq_len = min(m.max_seq_len, int(window))
    m.from_hf = from_hf
    moe.activation = "swiglu"
    # architecture facts the config has a key for but a Llama default would get wrong
    m.head_dim = int(hf.get("head_dim") or (128 if mt == "qwen3" else H // nh))
    m.attention_bias = mt == "qwen2" or (mt == "qwen2_moe" and bool(hf.get("qkv_bias", True)))
    m.qk_norm = mt in ("qwen3", "qwen3_moe")
    m.mlp_only_layers = []
    moe.shared_expert_ffn_size = None
    m.hf_model_type = mt
    if mt in MOE_TYPES:
        moe.num_experts, moe.top_k = _num_experts(hf), int(hf["num_experts_per_tok"])
        moe.score_func, moe.expert_bias, moe.noisy_gating = "softmax", False, False
        moe.num_shared_experts, moe.shared_expert_gate = 0, False
        if mt == "mixtral":
            m.moe_every, moe.renormalize, moe.expert_ffn_size = 1, True, None
        else:
            m.moe_every = int(hf.get("decoder_sparse_step") or 1)
            m.mlp_only_layers = sorted(int(i) for i in hf.get("mlp_only_layers") or [])
            moe.renormalize = bool(hf.get("norm_topk_prob", False))
            moe.expert_ffn_size = int(hf["moe_intermediate_size"])
        if mt == "qwen2_moe":
            moe.num_shared_experts, moe.shared_expert_gate = 1, True
            moe.shared_expert_ffn_size = int(hf["shared_expert_intermediate_size"])
    _apply_overrides(cfg, mt, overrides)
    m, moe = cfg.model, cfg.moe
    if mt in MOE_TYPES and cfg.lora.mode == "moe_lora":
        raise ValueError(f"lora.mode='moe_lora': needs a dense model ({mt} already has experts); "
                         "use expert_lora for LoRA on its experts")
    if mt not in MOE_TYPES:  # dense checkpoint: MoE layers only as LoRA-MoE on its FFNs
        m.moe_every = (m.moe_every or 1) if cfg.lora.mode == "moe_lora" else 0
    # One validation pass. An in-memory model has no directory, and validate() reads a missing
    # model.from_hf as "byte-level data" (vocab >= 256): check a copy that points at a directory.
    probe = cfg if m.from_hf else copy.deepcopy(cfg)
    if not m.from_hf:
        probe.model.from_hf = os.curdir
    try:
        validate(probe)
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return cfg


# ------------------------------------------------------------------ export side

def hf_config_dict(spec: Dict[str, Any]) -> Dict[str, Any]:
    """config.json content for an export `spec` (built by hf_export.describe)."""
    s = spec
    out = {
        "model_type": s["model_type"], "architectures": [ARCHITECTURES[s["model_type"]]],
        "vocab_size": s["vocab_size"], "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_layers"], "num_attention_heads": s["num_heads"],
        "num_key_value_heads": s["num_kv_heads"], "head_dim": s["head_dim"], "hidden_act": "silu",
        "max_position_embeddings": s["max_seq_len"], "rms_norm_eps": s["norm_eps"], "rope_theta": s["rope_theta"],
        "tie_word_embeddings": s["tie_embeddings"], "torch_dtype": s["dtype"], "attention_dropout": 0.0,
        "use_cache": True,
    }
    if s.get("rope_scaling"):
        out["rope_scaling"] = dict(s["rope_scaling"])
    mt = s["model_type"]
    if mt in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = s["bias"]  # llama is only chosen without bias
    if mt == "llama":
        out["mlp_bias"] = False
    if mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=s["num_layers"])
    if mt == "mixtral":
        out.update(num_local_experts=s["num_experts"], num_experts_per_tok=s["top_k"], sliding_window=None,
                   router_aux_loss_coef=s["aux_loss_coef"], router_jitter_noise=0.0, output_router_logits=False)
    if mt in ("qwen2_moe", "qwen3_moe"):
        out.update(num_experts=s["num_experts"], num_experts_per_tok=s["top_k"], norm_topk_prob=s["renormalize"],
                   moe_intermediate_size=s["expert_ffn_size"], decoder_sparse_step=1,
                   mlp_only_layers=s["dense_layers"], router_aux_loss_coef=s["aux_loss_coef"],
                   output_router_logits=False)
    if mt == "qwen2_moe":
        out.update(shared_expert_intermediate_size=s["shared_ffn_size"], qkv_bias=True)
    return out
