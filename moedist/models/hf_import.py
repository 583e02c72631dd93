"""Import Hugging Face Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen2-MoE/Qwen3-MoE weights.

    model, cfg = from_hf("path/to/hf_dir")                # build + load
    model, cfg = from_hf(hf_model, lora={"mode": "full"})  # an in-memory transformers model
    # trainer: cfg = apply_hf_config(cfg); model = build_local_model(cfg, ep_rank, ep_size)  (meta -> shard)
    #          load_hf_weights_into(model, cfg.model.from_hf)   # reads only this rank's experts

Weights are read with `safetensors` only (lazily, tensor by tensor, so an expert-
parallel rank reads only its own experts); a directory holding pickles
(``pytorch_model*.bin``, ``*.pt``) is refused before anything in it is opened. Both expert layouts
are understood: one tensor per expert (what ``save_pretrained`` writes:
``block_sparse_moe.experts.3.w1`` / ``mlp.experts.3.gate_proj``) and the
fused in-memory layout of transformers 5 (``mlp.experts.gate_up_proj``
[E, 2F, H], ``mlp.experts.down_proj`` [E, H, F]).

HF linears are [out, in]; moedist FFN/expert weights are math orientation
(``x @ W``), so they are transposed on the way in.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Set, Tuple

import torch
import torch.nn as nn

from moedist.models.build import build_model
from moedist.models.hf_export import base_linear
from moedist.models.hf_maps import hf_to_moedist_config, read_hf_config
from moedist.models.llama import CausalLM
from moedist.moe import MoELayer, MoELoRAExperts


class HFTensors:
    """Read-only access to a HF state dict: a directory (safetensors / .bin) or a dict of tensors."""

    def __init__(self, source):
        self._dict: Optional[Dict[str, torch.Tensor]] = None
        self._files: Dict[str, str] = {}   # tensor name -> file (safetensors)
        self._handles = {}
        if isinstance(source, (str, os.PathLike)):
            self._open_dir(os.fspath(source))
        elif isinstance(source, dict):
            self._dict = source
        elif isinstance(source, nn.Module):  # an in-memory transformers model
            self._dict = source.state_dict()
        else:
            raise ValueError(f"weights source: expected a directory, a state dict or a model, got {type(source).__name__}")
        names = list(self._dict) if self._dict is not None else list(self._files)
        self.root = "model." if "model.embed_tokens.weight" in names else ""
        self.names: Set[str] = set(names)

    def _open_dir(self, path: str) -> None:
        from moedist.checkpoint.safety import refuse_pickles

        refuse_pickles(path, "Hugging Face directory")  # never open a directory that holds pickles
        files = sorted(os.listdir(path)) if os.path.isdir(path) else []
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                self._files = {k: os.path.join(path, f) for k, f in json.load(fh)["weight_map"].items()}
            return
        st = [f for f in files if f.endswith(".safetensors") and not f.startswith("adapter_")]
        if st:
            from safetensors import safe_open

            for f in st:
                with safe_open(os.path.join(path, f), framework="pt") as h:
                    self._files.update({k: os.path.join(path, f) for k in h.keys()})
            return
        raise ValueError(f"{path!r}: no model.safetensors weights found (moedist reads safetensors only)")

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """Tensor `name` (row `index` of its first dimension only, when given)."""
        if name not in self.names:
            raise KeyError(name)
        if self._dict is not None:
            t = self._dict[name]
            return t if index is None else t[index]
        from safetensors import safe_open

        f = self._files[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        h = self._handles[f]
        return h.get_tensor(name) if index is None else h.get_slice(name)[index]


class _Loader:
    """Copies HF tensors into a moedist model, recording which names were used."""

    def __init__(self, tensors: HFTensors):
        self.t = tensors
        self.used: Set[str] = set()

    def take(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        if name not in self.t:
            raise ValueError(f"Hugging Face weights: missing tensor {name!r}")
        self.used.add(name)
        return self.t.get(name, index)

    @torch.no_grad()
    def copy(self, dst: torch.Tensor, name: str, transpose: bool = False) -> None:
        if dst.is_meta and name in self.t:  # not materialized here (ZeRO-3 builds a layer at a time): skip the read
            self.used.add(name)
            return
        src = self.take(name)
        src = src.t() if transpose else src
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{name}: shape {tuple(src.shape)} does not match the moedist parameter {tuple(dst.shape)}")
        dst.copy_(src)

    def dense_ffn(self, prefix: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) in math orientation ([H, F], [H, F], [F, H]) of a HF MLP."""
        return tuple(self.take(f"{prefix}{p}_proj.weight").t() for p in ("gate", "up", "down"))

    def expert(self, blk: str, e: int, F: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e of a HF MoE block as (gate, up, down) in math orientation."""
        t = self.t
        if f"{blk}experts.{e}.w1.weight" in t:       # Mixtral per-expert layout
            g, u, d = (self.take(f"{blk}experts.{e}.{w}.weight") for w in ("w1", "w3", "w2"))
            return g.t(), u.t(), d.t()
        if f"{blk}experts.{e}.gate_proj.weight" in t:  # Qwen-MoE per-expert layout
            return self.dense_ffn(f"{blk}experts.{e}.")
        if f"{blk}experts.gate_up_proj" in t:        # transformers 5 fused layout
            gu = self.take(f"{blk}experts.gate_up_proj", e)  # [2F, H] (or [H, 2F])
            d = self.take(f"{blk}experts.down_proj", e)  # [H, F] (or [F, H])
            gu = gu if gu.shape[1] == 2 * F != gu.shape[0] else gu.t()  # -> [H, 2F]
            d = d if d.shape[0] == F != d.shape[1] else d.t()  # -> [F, H]
            return gu[:, :F], gu[:, F:], d
        raise ValueError(f"Hugging Face weights: no expert {e} under {blk!r}")

    def mark_expert(self, blk: str, e: int) -> None:
        """Expert e belongs to another EP rank: its tensors are known, just not read here."""
        for w in ("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"):
            self.used.add(f"{blk}experts.{e}.{w}.weight")


def _moe_block(tensors: HFTensors, prefix: str) -> str:
    for blk in (f"{prefix}block_sparse_moe.", f"{prefix}mlp."):
        if f"{blk}gate.weight" in tensors:
            return blk
    raise ValueError(f"Hugging Face weights: no router ({prefix}mlp.gate.weight or "
                     f"{prefix}block_sparse_moe.gate.weight) for a moedist MoE layer; is the checkpoint an MoE model?")


@torch.no_grad()
def _load_ffn(ld: _Loader, mlp: nn.Module, prefix: str) -> None:
    if isinstance(mlp, MoELayer):
        _load_moe(ld, mlp, prefix)
        return
    # DenseFFN or LoRAFFN (base weights; adapters keep their init)
    for name, p in (("gate", mlp.w_gate), ("up", mlp.w_up), ("down", mlp.w_down)):
        if p is not None:
            ld.copy(p, f"{prefix}mlp.{name}_proj.weight", transpose=True)


@torch.no_grad()
def _load_moe(ld: _Loader, moe: MoELayer, prefix: str) -> None:
    ex = moe.experts
    if isinstance(ex, MoELoRAExperts):  # LoRA-MoE on a dense checkpoint: the FFN is the frozen base
        ex.load_base(*ld.dense_ffn(f"{prefix}mlp."))
        return
    blk = _moe_block(ld.t, prefix)
    ld.copy(moe.router.weight, f"{blk}gate.weight")
    F = ex.ffn_size
    for e in range(ex.num_experts):
        local = e - ex.first_expert
        if 0 <= local < ex.num_local:
            ex.load_expert(local, *ld.expert(blk, e, F))
        else:
            ld.mark_expert(blk, e)
    if f"{blk}experts.gate_up_proj" in ld.t:
        ld.used.update({f"{blk}experts.gate_up_proj", f"{blk}experts.down_proj"})
    sh = moe.shared_experts
    if sh is not None:
        for name, p in (("gate", sh.w_gate), ("up", sh.w_up), ("down", sh.w_down)):
            if p is not None:
                ld.copy(p, f"{blk}shared_expert.{name}_proj.weight", transpose=True)
        if sh.w_shared_gate is not None:
            ld.copy(sh.w_shared_gate, f"{blk}shared_expert_gate.weight", transpose=True)


@torch.no_grad()
def load_hf_weights_into(model: CausalLM, source, strict: bool = True) -> CausalLM:
    """Copy a Hugging Face checkpoint's weights into a moedist model built from its config.

    Works before or after `parallelize` (each rank reads only its local experts).
    LoRA adapters keep their initialisation (B = 0); for lora.mode=moe_lora the
    checkpoint's dense FFN becomes each MoE layer's frozen base and the routers
    keep their init.

    Args:
        model: a `CausalLM` from `build_model(cfg)` with cfg from `hf_to_moedist_config`.
        source: a HF model directory, a HF state dict, or an in-memory HF model.
        strict: fail when the checkpoint holds tensors the model has no place for.

    Raises:
        ValueError: a missing tensor, a shape mismatch, or (strict) unused tensors.
    """
    ld = _Loader(source if isinstance(source, HFTensors) else HFTensors(source))
    r = ld.t.root
    ld.copy(model.embed_tokens.weight, f"{r}embed_tokens.weight")
    for i, layer in enumerate(model.layers):
        p = f"{r}layers.{i}."
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = base_linear(getattr(attn, name))
            ld.copy(lin.weight, f"{p}self_attn.{name}.weight")
            if lin.bias is not None:
                ld.copy(lin.bias, f"{p}self_attn.{name}.bias")
        if attn.q_norm is not None:
            ld.copy(attn.q_norm.weight, f"{p}self_attn.q_norm.weight")
            ld.copy(attn.k_norm.weight, f"{p}self_attn.k_norm.weight")
        ld.copy(layer.input_layernorm.weight, f"{p}input_layernorm.weight")
        ld.copy(layer.post_attention_layernorm.weight, f"{p}post_attention_layernorm.weight")
        _load_ffn(ld, layer.mlp, p)
    ld.copy(model.norm.weight, f"{r}norm.weight")
    if model.lm_head is not None:
        ld.copy(model.lm_head.weight, "lm_head.weight")
    else:
        ld.used.add("lm_head.weight")  # tied: HF state dicts may still list it
    unused = sorted(n for n in ld.t.names - ld.used if not n.endswith("rotary_emb.inv_freq"))
    if strict and unused:
        more = f" (+{len(unused) - 5} more)" if len(unused) > 5 else ""
        raise ValueError(f"Hugging Face weights: {len(unused)} tensors have no place in the moedist model, e.g. "
                         f"{', '.join(unused[:5])}{more}")
    return model


def apply_hf_config(cfg):
    """For a config with model.from_hf set: the config with the checkpoint's architecture (else `cfg`)."""
    if not cfg.model.from_hf:
        return cfg
    return hf_to_moedist_config(read_hf_config(cfg.model.from_hf), base=cfg, from_hf=cfg.model.from_hf)


def from_hf(path_or_model, cfg=None, seed: Optional[int] = None, **overrides):
    """Build a moedist model from a Hugging Face model and load its weights.

    Args:
        path_or_model: a directory written by ``save_pretrained`` (config.json +
            safetensors), or an in-memory transformers CausalLM.
        cfg: base MoedistConfig (its train/data/lora/routing settings are kept);
            default: config defaults.
        seed: init seed of the parts the checkpoint has no weights for (routers of
            LoRA-MoE, LoRA A); default cfg.train.seed.
        **overrides: per-section dicts, e.g. ``lora={"mode": "full", "rank": 8}``
            (see `hf_to_moedist_config`).

    Returns:
        (model, cfg): the `CausalLM` (fp32, train mode, all experts local: call
        `parallelize` for EP) and the MoedistConfig that `build_model` turns into
        the same structure (model.from_hf = the directory, or null in memory).
    """
    path = os.fspath(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else None
    cfg = hf_to_moedist_config(read_hf_config(path_or_model), base=cfg, from_hf=path, **overrides)
    model = build_model(cfg, seed=seed)
    load_hf_weights_into(model, path_or_model if path is None else path)
    return model, cfg
