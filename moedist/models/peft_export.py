"""Export the LoRA adapters of a dense model (lora.mode=full) in PEFT's format.

    to_peft(model, "out/adapter", base_path="out/base")
    # then, with transformers + peft:
    #   base = AutoModelForCausalLM.from_pretrained("out/base")
    #   model = PeftModel.from_pretrained(base, "out/adapter")

Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ...), and,
with ``base_path``, the frozen base as a transformers directory (`to_hf` with
``merge_lora=False``). PEFT computes ``W x + (alpha / r) B A x`` per linear,
which is exactly moedist's `LoRALinear` (same [r, in] / [out, r] orientation)
and `LoRAFFN` (math orientation [in, r] / [r, out], transposed here).

LoRA on experts and LoRA-MoE have no PEFT equivalent: export those merged with
`to_hf` (LoRA-MoE becomes a Mixtral / Qwen2-MoE model).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from moedist.models.hf_export import describe, save_json_and_safetensors, to_hf
from moedist.models.llama import CausalLM
from moedist.models.lora import LoRAFFN, LoRALinear
from moedist.moe import MoELayer
from moedist.moe.lora import model_adapter_params

_FFN_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _adapters(model: CausalLM):
    """Yield (HF module path, A [r, in], B [out, r], rank, alpha, dropout) for every LoRA in the model."""
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, name)
            if isinstance(lin, LoRALinear):
                yield f"{p}self_attn.{name}", lin.lora_A, lin.lora_B, lin.lora_rank, lin.scaling * lin.lora_rank, lin.dropout
        mlp = layer.mlp
        if isinstance(mlp, MoELayer):
            if model_adapter_params(mlp):
                raise ValueError(f"layer {i}: LoRA on experts / LoRA-MoE has no PEFT format; export it merged with to_hf")
        elif isinstance(mlp, LoRAFFN):
            for t, (A, B) in mlp.adapters().items():  # [in, r], [r, out]
                r = A.shape[1]
                yield f"{p}mlp.{_FFN_NAMES[t]}", A.t(), B.t(), r, mlp.scaling * r, mlp.dropout


def peft_adapter(model: CausalLM, base_model_name_or_path: Optional[str] = None):
    """(adapter_config dict, tensors dict) in PEFT's LoRA format."""
    found = list(_adapters(model))
    if not found:
        raise ValueError("to_peft: the model has no LoRA adapters (build it with lora.mode=full)")
    ranks = {(r, float(a)) for _, _, _, r, a, _ in found}
    if len(ranks) > 1:
        raise ValueError(f"to_peft: adapters differ in rank/alpha {sorted(ranks)}; PEFT export needs one rank and alpha")
    (rank, alpha), = ranks
    paths = [path for path, *_ in found]
    suffixes = sorted({p.rsplit(".", 1)[1] for p in paths})
    # Suffix names (the usual PEFT form) match every module of that name; use them only when the
    # adapters cover exactly those modules, else list the full module paths.
    covered = {f"model.layers.{i}.{grp}.{s}" for i in range(len(model.layers)) for s in suffixes
               for grp in (("self_attn",) if s.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else ("mlp",))}
    targets = suffixes if covered == set(paths) else sorted(paths)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": alpha,
        "lora_dropout": float(found[0][5]), "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
    }
    tensors: Dict[str, torch.Tensor] = {}
    for path, A, B, *_ in found:
        tensors[f"base_model.model.{path}.lora_A.weight"] = A.detach().cpu().contiguous().clone()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B.detach().cpu().contiguous().clone()
    return config, tensors


def to_peft(model: CausalLM, path, base_path=None, base_model_name_or_path: Optional[str] = None) -> dict:
    """Write the model's LoRA adapters as a PEFT adapter directory (and the base, with `base_path`).

    Args:
        model: a dense moedist model with LoRA (lora.mode=full).
        path: adapter directory (adapter_config.json + adapter_model.safetensors).
        base_path: when given, the frozen base is exported there with `to_hf(merge_lora=False)`.
        base_model_name_or_path: recorded in adapter_config.json (default: base_path).

    Returns:
        The adapter_config dict.

    Raises:
        ValueError: no adapters, adapters on experts, or mixed ranks.
    """
    if describe(model)["model_type"] not in ("llama", "qwen2", "qwen3"):
        raise ValueError("to_peft: PEFT export supports dense models; export MoE models merged with to_hf")
    name = base_model_name_or_path or (os.fspath(base_path) if base_path is not None else None)
    config, tensors = peft_adapter(model, name)
    save_json_and_safetensors(os.fspath(path), "adapter_config.json", config, "adapter_model.safetensors", tensors)
    if base_path is not None:
        to_hf(model, base_path, merge_lora=False)
    return config
