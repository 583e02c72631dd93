"""Build a `CausalLM` from the config sections `model`, `moe` and `lora`.

Every part gets its own seed derived from (train seed, layer, part), so the
same config gives the same weights in every process and at every EP size.
Parallelism is applied afterwards (`moedist.models.parallelize`).
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.nn as nn

from moedist.choices import LORA_MODES
from moedist.config import DataConfig, LoRAConfig, ModelConfig, MoEConfig, MoedistConfig
from moedist.models.llama import Attention, CausalLM, DecoderLayer, DenseFFN
from moedist.models.lora import LoRAFFN, LoRALinear
from moedist.moe import GroupedExperts, LoRAOnExperts, MoELayer, MoELoRAExperts, Router, SharedExperts, TokenDispatcher
from moedist.moe.lora import model_adapter_params



def _seed(seed: int, layer: int, part: int) -> int:
    return seed * 7919 + layer * 131 + part


def is_moe_layer(i: int, moe_every: int) -> bool:
    """Layer i is MoE when moe_every > 0 and (i + 1) % moe_every == 0 (1 = every layer)."""
    return moe_every > 0 and (i + 1) % moe_every == 0


def build_moe_layer(i: int, model_cfg: ModelConfig, moe_cfg: MoEConfig, lora_cfg: LoRAConfig, seed: int,
                    dense_ffn: Optional[DenseFFN] = None) -> MoELayer:
    """One MoE FFN for layer i (all experts local; EP is applied later)."""
    H, E = model_cfg.hidden_size, moe_cfg.num_experts
    F = moe_cfg.expert_ffn_size or model_cfg.ffn_size
    act, std = moe_cfg.activation, model_cfg.init_std
    router = Router(H, E, moe_cfg.top_k, score_func=moe_cfg.score_func, renormalize=moe_cfg.renormalize,
                    noisy_gating=moe_cfg.noisy_gating, jitter_eps=moe_cfg.jitter_eps,
                    expert_bias=moe_cfg.expert_bias, init_std=std, seed=_seed(seed, i, 1),
                    second_expert_policy=moe_cfg.second_expert_policy)
    lora_kw = dict(lora_rank=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, targets=lora_cfg.targets)
    if lora_cfg.mode == "moe_lora":
        # the frozen base is the layer's dense FFN (seed part 2): drawn as DenseFFN draws it, or copied from dense_ffn
        experts = MoELoRAExperts(E, H, model_cfg.ffn_size, activation=act, init_std=std, seed=_seed(seed, i, 3),
                                 base_seed=_seed(seed, i, 2), shared_rank=lora_cfg.shared_rank, **lora_kw)
        if dense_ffn is not None:
            experts.load_base(dense_ffn.w_gate, dense_ffn.w_up, dense_ffn.w_down)
    elif lora_cfg.mode in ("expert_lora", "full"):
        experts = LoRAOnExperts(E, H, F, activation=act, init_std=std, seed=_seed(seed, i, 3), **lora_kw)
    else:
        experts = GroupedExperts(E, H, F, activation=act, init_std=std, seed=_seed(seed, i, 3))
    shared = None
    if moe_cfg.num_shared_experts:
        # moe.shared_expert_ffn_size: total width (HF Qwen2-MoE's shared_expert_intermediate_size)
        F_shared = moe_cfg.shared_expert_ffn_size or F * moe_cfg.num_shared_experts
        shared = SharedExperts(H, F_shared, act, gated=moe_cfg.shared_expert_gate,
                               init_std=std, seed=_seed(seed, i, 4))
    return MoELayer(router, experts, shared, TokenDispatcher(E), capacity_factor=moe_cfg.capacity_factor,
                    min_capacity=moe_cfg.min_capacity, drop_policy=moe_cfg.drop_policy,
                    aux_loss_type=moe_cfg.aux_loss_type, aux_loss_coef=moe_cfg.aux_loss_coef,
                    z_loss_coef=moe_cfg.z_loss_coef, eval_capacity_factor=moe_cfg.eval_capacity_factor,
                    router_type=moe_cfg.router_type)


def build_model(cfg: MoedistConfig, seed: Optional[int] = None) -> CausalLM:
    """Build the model described by `cfg` (a MoedistConfig: sections model, moe, lora).

    lora.mode: none (all weights train), moe_lora (each MoE layer = frozen FFN +
    router over LoRA experts), expert_lora (LoRA on real, frozen experts),
    full (LoRA on attention and every FFN/expert projection, base frozen).
    `apply_lora_freezing` then sets requires_grad.
    """
    m, moe, lora = cfg.model, cfg.moe, cfg.lora
    seed = cfg.train.seed if seed is None else seed
    if lora.mode not in LORA_MODES:
        raise ValueError(f"lora.mode={lora.mode!r}: allowed {', '.join(LORA_MODES)}")
    head_dim = m.head_dim or m.hidden_size // m.num_heads  # null = hidden / heads (Qwen3 sets its own)
    dense_only = set(m.mlp_only_layers)  # layers kept dense (Qwen-MoE)
    layers: List[DecoderLayer] = []
    for i in range(m.num_layers):
        attn = Attention(m.hidden_size, m.num_heads, m.num_kv_heads or m.num_heads, head_dim,
                         bias=m.attention_bias, qk_norm=m.qk_norm, norm_eps=m.norm_eps)
        moe_here = is_moe_layer(i, m.moe_every) and moe.num_experts > 0 and i not in dense_only
        if moe_here:
            mlp = build_moe_layer(i, m, moe, lora, seed)
        else:
            mlp = DenseFFN(m.hidden_size, m.ffn_size, moe.activation, m.init_std, _seed(seed, i, 2))
            if lora.mode == "full":
                mlp = LoRAFFN(mlp, lora.rank, lora.alpha, lora.dropout, lora.targets, _seed(seed, i, 5))
        if lora.mode == "full":
            for j, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
                setattr(attn, name, LoRALinear(getattr(attn, name), lora.rank, lora.alpha, lora.dropout, _seed(seed, i, 10 + j)))
        layers.append(DecoderLayer(attn, mlp, m.hidden_size, m.norm_eps))
    model = CausalLM(m.vocab_size, m.hidden_size, layers, m.max_seq_len, m.rope_theta, head_dim, m.norm_eps,
                     m.tie_embeddings, m.init_std, _seed(seed, 10_000, 0),
                     rope_scaling=m.rope_scaling)
    apply_lora_freezing(model, lora)
    apply_param_dtype(model, m, lora)
    apply_expert_groups(model, moe, cfg.data)
    return model


def apply_expert_groups(model: nn.Module, moe: MoEConfig, data: DataConfig) -> None:
    """Give every MoE layer the run's expert groups (domain d = data.sources[d]) and its layer index."""
    table = None
    if moe.expert_groups or moe.group_routing != "learned":
        from moedist.moe.groups import GroupTable

        table = GroupTable.from_config(moe.expert_groups, [s["name"] for s in data.sources],
                                       moe.num_experts, moe.group_routing)
    for i, layer in enumerate(model.layers):
        if isinstance(layer.mlp, MoELayer):
            layer.mlp.groups, layer.mlp.route_seed = table, i


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_param_dtype(model: nn.Module, model_cfg: ModelConfig, lora_cfg: LoRAConfig) -> None:
    """model.dtype for the frozen weights of the LoRA modes (in place; cheap on the meta device).

    Trainable parameters stay fp32 (they are the optimizer's master weights) and so do the
    routers (routing is computed in fp32). With lora.mode=none nothing is frozen, so every
    weight stays fp32 and `deepspeed.bf16` decides the compute dtype.
    """
    dtype = DTYPES[model_cfg.dtype]
    if dtype == torch.float32 or lora_cfg.mode == "none":
        return
    for name, p in model.named_parameters():
        if not p.requires_grad and ".router." not in name and p.dtype != dtype:
            p.data = p.data.to(dtype)


def apply_lora_freezing(model: nn.Module, lora_cfg: LoRAConfig) -> None:
    """Set requires_grad by lora.mode: in LoRA modes only adapters (+ router if
    lora.train_router, + shared experts if lora.train_shared_experts) train."""
    if lora_cfg.mode == "none":
        return
    adapters = {id(p) for p in adapter_params(model)}
    for name, p in model.named_parameters():
        train = id(p) in adapters
        train |= lora_cfg.train_router and ".router." in name
        train |= lora_cfg.train_shared_experts and ".shared_experts." in name
        p.requires_grad_(train)


def adapter_params(model: nn.Module) -> List[nn.Parameter]:
    """The LoRA parameters (lora_A / lora_B) of the model: what its LoRA modules declare
    (`moedist.moe.lora.AdapterModule`), not a match on names."""
    return model_adapter_params(model)


def trainable_params(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def moe_layers(model: nn.Module) -> Iterable[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]
