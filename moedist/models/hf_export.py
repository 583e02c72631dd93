"""Export a moedist model as a transformers directory (config.json + model.safetensors).

    to_hf(model, "out/hf")            # AutoModelForCausalLM.from_pretrained("out/hf") loads it

The HF architecture is chosen from the model's structure (first match):

* no MoE layer: ``qwen3`` with q/k norm, ``qwen2`` with q/k/v bias, else ``llama``;
* MoE with shared experts (must be sigmoid-gated): ``qwen2_moe``;
* MoE with q/k norm: ``qwen3_moe``;
* every layer MoE, renormalised top-k, no bias: ``mixtral``;
* other MoE (dense layers in between, top-k not renormalised, q/k/v bias):
  ``qwen2_moe`` with a zero shared expert (width 1, all-zero weights and gate:
  it adds exactly 0).

LoRA is merged by default (``merge_lora=True``): a LoRA linear becomes
W + (alpha/r) B A; LoRA on experts is added to each expert; a LoRA-MoE layer
(frozen FFN + LoRA experts) becomes real experts, expert e being the FFN with
adapter e (and the shared LoRA expert, lora.shared_rank) merged in, so LoRA-MoE exports as Mixtral (or Qwen2-MoE when it has
shared experts). ``merge_lora=False`` writes the frozen base only (the base of
a PEFT export, see `peft_export`).

The files are the per-expert layout that ``save_pretrained`` writes, which
transformers 4.x and 5.x both load. Experts must all be local (not sharded by
`parallelize`).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from moedist.models.hf_maps import hf_config_dict
from moedist.models.llama import CausalLM
from moedist.models.lora import LoRAFFN, LoRALinear
from moedist.moe import GroupedExperts, LoRAOnExperts, MoELayer, MoELoRAExperts

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def base_linear(lin: nn.Module) -> nn.Linear:
    """The frozen nn.Linear of an attention projection (unwraps LoRALinear)."""
    return lin.base if isinstance(lin, LoRALinear) else lin


def linear_weight(lin: nn.Module, merge_lora: bool) -> torch.Tensor:
    """[out, in] weight of an attention projection, LoRA merged or not."""
    if isinstance(lin, LoRALinear) and merge_lora:
        return lin.merged_weight()
    return base_linear(lin).weight


def dense_ffn_weights(mlp: nn.Module, merge_lora: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [H, F], up [H, F], down [F, H]) of a DenseFFN / LoRAFFN, LoRA merged or not."""
    ws = {t: getattr(mlp, f"w_{t}") for t in ("gate", "up", "down")}
    if isinstance(mlp, LoRAFFN) and merge_lora:
        for t, (A, B) in mlp.adapters().items():
            ws[t] = ws[t] + mlp.scaling * (A @ B)
    return ws["gate"], ws["up"], ws["down"]


def expert_weights(experts: nn.Module, local: int, merge_lora: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of local expert `local`, math orientation, its LoRA merged or not."""
    if isinstance(experts, MoELoRAExperts):
        if not merge_lora:
            raise ValueError("merge_lora=false: a LoRA-MoE layer's experts exist only as adapters; export it merged")
        ws = experts.base_weights()  # W + S: the shared LoRA expert (lora.shared_rank) folds into every expert
    elif isinstance(experts, GroupedExperts):
        ws = {"gate": None if experts.w_gate is None else experts.w_gate[local],
              "up": experts.w_up[local], "down": experts.w_down[local]}
    else:
        raise ValueError(f"cannot export experts of type {type(experts).__name__}")
    if merge_lora and isinstance(experts, (LoRAOnExperts, MoELoRAExperts)):  # per-expert adapters
        for t, stack in experts.lora.items():
            ws[t] = ws[t] + experts.scaling * stack.merged(local)
    return ws["gate"], ws["up"], ws["down"]


def _check_swiglu(mod: nn.Module, where: str) -> None:
    if mod.activation != "swiglu":
        raise ValueError(f"{where}: activation={mod.activation!r}; Hugging Face export supports swiglu only")


def describe(model: CausalLM) -> Dict[str, Any]:
    """The export spec (HF architecture and sizes) of a model; raises ValueError if none fits."""
    V, H = model.embed_tokens.weight.shape
    attn = model.layers[0].self_attn
    spec = dict(vocab_size=V, hidden_size=H, num_layers=len(model.layers), num_heads=attn.nh, num_kv_heads=attn.nkv,
                head_dim=attn.d, max_seq_len=model.max_seq_len, norm_eps=model.norm.eps, rope_theta=model.rope_theta,
                rope_scaling=model.rope_scaling,
                tie_embeddings=model.lm_head is None, dtype=_DTYPES.get(model.embed_tokens.weight.dtype, "float32"),
                bias=base_linear(attn.q_proj).bias is not None, qk_norm=attn.q_norm is not None)
    dense_F, moe_sig, dense_layers = set(), set(), []
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        if not isinstance(mlp, MoELayer):
            _check_swiglu(mlp, f"layer {i} FFN")
            dense_F.add(mlp.w_up.shape[1])
            dense_layers.append(i)
            continue
        r, ex, sh = mlp.router, mlp.experts, mlp.shared_experts
        _check_swiglu(ex, f"layer {i} experts")
        if ex.num_local != ex.num_experts:
            raise ValueError(f"layer {i}: experts are sharded over ranks ({ex.num_local} of {ex.num_experts} local); "
                             "export an unsharded model (gather the experts or load a checkpoint at EP=1)")
        if r.score_func != "softmax" or r.expert_bias is not None:
            raise ValueError(f"layer {i}: router score_func={r.score_func!r}, expert_bias={r.expert_bias is not None}; "
                             "Hugging Face export supports softmax routing without expert bias")
        if isinstance(ex, MoELoRAExperts) and not r.renormalize:
            raise ValueError(f"layer {i}: LoRA-MoE with moe.renormalize=false computes FFN(x) + sum_k w_k * "
                             "delta_k(x) (the frozen FFN at full weight), a Hugging Face MoE layer sum_k w_k * "
                             "expert_k(x); they agree only when the top-k weights sum to 1 (moe.renormalize=true)")
        if sh is not None:
            _check_swiglu(sh, f"layer {i} shared experts")
            if sh.w_shared_gate is None:
                raise ValueError(f"layer {i}: ungated shared experts have no supported Hugging Face equivalent "
                                 "(Qwen2-MoE's shared expert has a sigmoid gate); use moe.shared_expert_gate=true")
        moe_sig.add((r.num_experts, r.top_k, r.renormalize, ex.ffn_size, None if sh is None else sh.w_up.shape[1],
                     mlp.aux_loss_coef))
    if len(dense_F) > 1 or len(moe_sig) > 1:
        raise ValueError("layers differ in FFN/expert sizes or routing; Hugging Face configs need them uniform")
    if not moe_sig:
        mt = "qwen3" if spec["qk_norm"] else "qwen2" if spec["bias"] else "llama"
        return dict(spec, model_type=mt, intermediate_size=dense_F.pop())
    E, K, renorm, Fe, Fs, aux = moe_sig.pop()
    if Fs is not None and spec["qk_norm"]:
        raise ValueError("shared experts together with q/k norm: no supported Hugging Face architecture has both")
    if Fs is not None:
        mt = "qwen2_moe"
    elif spec["qk_norm"]:
        mt = "qwen3_moe"
    elif not dense_layers and renorm and not spec["bias"]:
        mt = "mixtral"
    else:
        mt = "qwen2_moe"
    return dict(spec, model_type=mt, intermediate_size=dense_F.pop() if dense_F else Fe, num_experts=E, top_k=K,
                renormalize=renorm, expert_ffn_size=Fe, shared_ffn_size=Fs or 1, zero_shared=Fs is None,
                dense_layers=dense_layers, aux_loss_coef=aux)


@torch.no_grad()
def hf_state_dict(model: CausalLM, spec: Dict[str, Any], merge_lora: bool = True) -> Dict[str, torch.Tensor]:
    """The HF tensors (per-expert layout, HF names and [out, in] orientation) of `model`."""
    mt, H = spec["model_type"], spec["hidden_size"]
    out: Dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed_tokens.weight,
                                    "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight
    qkv_bias = mt in ("qwen2", "qwen2_moe") or spec["bias"]   # written as zeros where moedist has none
    o_bias = mt in ("qwen3", "qwen3_moe") and spec["bias"]      # attention_bias=true there biases o_proj too
    for i, layer in enumerate(model.layers):
        p, attn = f"model.layers.{i}.", layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, name)
            w = linear_weight(lin, merge_lora)
            out[f"{p}self_attn.{name}.weight"] = w
            if (name != "o_proj" and qkv_bias) or (name == "o_proj" and o_bias):
                b = base_linear(lin).bias
                out[f"{p}self_attn.{name}.bias"] = b if b is not None else w.new_zeros(w.shape[0])
        if attn.q_norm is not None:
            out[f"{p}self_attn.q_norm.weight"] = attn.q_norm.weight
            out[f"{p}self_attn.k_norm.weight"] = attn.k_norm.weight
        out[f"{p}input_layernorm.weight"] = layer.input_layernorm.weight
        out[f"{p}post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        mlp = layer.mlp
        if not isinstance(mlp, MoELayer):
            g, u, d = dense_ffn_weights(mlp, merge_lora)
            out.update({f"{p}mlp.gate_proj.weight": g.t(), f"{p}mlp.up_proj.weight": u.t(), f"{p}mlp.down_proj.weight": d.t()})
            continue
        blk = f"{p}block_sparse_moe." if mt == "mixtral" else f"{p}mlp."
        out[f"{blk}gate.weight"] = mlp.router.weight
        names = ("w1", "w3", "w2") if mt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(mlp.num_experts):
            for n, w in zip(names, expert_weights(mlp.experts, e, merge_lora)):
                out[f"{blk}experts.{e}.{n}.weight"] = w.t()
        if mt == "qwen2_moe":
            sh = mlp.shared_experts
            if sh is None:  # width-1 all-zero shared expert and gate: contributes exactly 0
                z = model.embed_tokens.weight.new_zeros(1, H)
                g, u, d, sg = z, z, z.t(), z
            else:
                g, u, d, sg = sh.w_gate.t(), sh.w_up.t(), sh.w_down.t(), sh.w_shared_gate.t()
            out.update({f"{blk}shared_expert.gate_proj.weight": g, f"{blk}shared_expert.up_proj.weight": u,
                        f"{blk}shared_expert.down_proj.weight": d, f"{blk}shared_expert_gate.weight": sg})
    dtype = model.embed_tokens.weight.dtype
    return {k: v.detach().to(dtype=dtype, device="cpu").contiguous().clone() for k, v in out.items()}


def _atomic_write(path: str, write) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it into place."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    from moedist.config import chmod_umask

    try:
        write(tmp)
        chmod_umask(tmp)  # mkstemp (and safetensors) make 0600; the result gets the process umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json_and_safetensors(path: str, json_name: str, obj: Dict[str, Any], st_name: str,
                              tensors: Dict[str, torch.Tensor]) -> None:
    """Write `obj` as JSON and `tensors` as safetensors into directory `path` (created), each atomically."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)

    _atomic_write(os.path.join(path, json_name), write_json)
    _atomic_write(os.path.join(path, st_name), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def to_hf(model: CausalLM, path, cfg=None, merge_lora: bool = True) -> Dict[str, Any]:
    """Save `model` as a transformers model directory (config.json + model.safetensors).

    Args:
        model: a moedist `CausalLM` (experts unsharded).
        path: output directory (created).
        cfg: the model's MoedistConfig, optional: everything the export needs is read
            from the model itself (so a model changed after building, e.g. upcycled,
            exports as it is).
        merge_lora: merge LoRA adapters (incl. LoRA-MoE experts) into the weights;
            False writes the frozen base weights only.

    Returns:
        The HF config dict that was written (``model_type`` says which architecture).

    Raises:
        ValueError: the model has no Hugging Face equivalent (see the module docstring).
    """
    spec = describe(model)
    config = hf_config_dict(spec)
    save_json_and_safetensors(os.fspath(path), "config.json", config, "model.safetensors",
                              hf_state_dict(model, spec, merge_lora))
    return config
