"""Per-rank memory of a training layout, before any job is submitted (`moedist plan`).

    counts = count_params(cfg)                 # exact: the model built on the meta device
    est = estimate(cfg, world_size=16, counts=counts)
    est["per_rank"]["total_mb"]

What is counted, per rank (MB = 2**20 bytes):

* params: this rank's share of every parameter. Experts are split over EP
  (E / ep per rank); ZeRO-3 also partitions everything over its data-parallel
  group (dense: the world, experts: the expert-data-parallel group), plus the
  parameters gathered in a step (`zero3_gathered`: with DeepSpeed's default reuse distance and
  live limit a model below 1e9 elements keeps every gathered parameter until backward used it;
  on CPU/gloo one fetch bucket is copied once more). Frozen base weights are stored in
  `model.dtype`; trainable ones in fp32, or bf16/fp16 under DeepSpeed mixed precision.
* grads: trainable parameters only. ZeRO-2/3 keep a 1/dp partition plus the
  reduce bucket in flight.
* optimizer: AdamW's two fp32 moments (SGD: none); DeepSpeed ZeRO-1/2/3 and mixed
  precision also keep fp32 master weights. ZeRO >= 1 partitions them 1/dp.
  `deepspeed.offload_optimizer=cpu` moves them (and ZeRO's fp32 gradient
  partition) to host memory: `offload_mb`, not in `total_mb`.
* activations: what autograd keeps between forward and backward for one
  micro-batch (B x S tokens), per layer from coefficients measured with
  `moedist.models.act_ckpt.SavedBytes` (attention, RMSNorm, MoE: router, dispatch,
  expert intermediates [N, F] with N = B*S*K routed pairs; at EP size 1 in float32 without
  adapters the fused token path keeps no dispatched [N, H] rows), the fp32 logits and
  log-softmax of the loss; `moe`/`full` activation checkpointing keep only the
  block inputs plus one block recomputed in backward.
* a2a: all-to-all send/receive buffers of one MoE layer (dispatch and combine) in flight.

Layout invariants follow `moedist.train` exactly: non-expert weights are data
parallel over the world, expert weights over world / ep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from moedist.choices import GATED_ACTIVATIONS

MB = float(2 ** 20)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ZERO2_BUCKET = 5e8       # DeepSpeed reduce_bucket_size default (elements)
ZERO3_PREFETCH = 5e7     # DeepSpeed stage3_prefetch_bucket_size default (elements)
ZERO3_MAX_LIVE = 1e9     # DeepSpeed stage3_max_live_parameters default (elements)
ZERO3_REUSE = 1e9        # DeepSpeed stage3_max_reuse_distance default (elements)
CPU_RUNTIME_MB = {"pytorch": 64.0, "deepspeed": 128.0}  # per-process overhead of a CPU run above the model,
                         # measured with a tiny model (tests/test_plan.py), see estimate

# Activation coefficients: elements kept for backward per token, fitted (max error 2%) to
# `SavedBytes` of the real model over 14 random shapes (tests/test_plan.py checks them).
ATTN_H = 4.8             # per layer x H: RMSNorm in/out, q/k/v input, residual
ATTN_Q = 4.8             # per layer x heads * head_dim: q before/after RoPE, attention out, o_proj input
ATTN_KV = 0.5            # per layer x kv heads * head_dim
ATTN_GQA = 0.3           # per layer x heads * head_dim when k/v are repeated to every query head
FFN_H, FFN_F = 1.0, 4.0  # dense FFN (and shared experts): input, gate, up, act(gate), product
MOE_PAIR_H = 1.9         # per routed (token, expert) pair x H: permuted rows, expert output
MOE_PAIR_F = 2.1         # per routed pair x F: expert intermediates
MOE_E = 1.0              # per token x E: router logits / probabilities
# EP size 1 with the fused token path (`GroupedExperts.forward_tokens`: no adapters (lora.mode none), gated FFN,
# float32 activations) keeps no [pairs, H] rows: g and u per pair, plus its ids and weight
MOE_TOKEN_PAIR_F = 2.0   # per routed pair x F: g and u
MOE_TOKEN_PAIR = 7.0     # per routed pair: token / pair ids (int64) and combine weight
LORA_FACTOR = {"none": 1.0, "full": 1.0, "expert_lora": 0.77}   # frozen experts keep fewer tensors
MOE_LORA_H = 1.6         # lora.mode=moe_lora: per token x H for the whole block (frozen base, LoRA experts)
MODEL_H, MODEL_V = 4.0, 1.0  # embedding/final norm per token x H; fp32 logits per token x V


@dataclass
class ParamCounts:
    """Parameter elements of a model (whole model, all experts), split the ways the plan needs."""

    total: int
    expert: int              # tagged expert parameters (split over EP)
    trainable: int
    trainable_expert: int
    largest_layer: int       # elements of the largest decoder layer (ZeRO-3 gathers one at a time)
    largest_layer_expert: int

    @property
    def dense(self) -> int:
        return self.total - self.expert

    @property
    def trainable_dense(self) -> int:
        return self.trainable - self.trainable_expert


def count_params(cfg) -> ParamCounts:
    """Exact parameter counts of `cfg`'s model, built on the meta device (no memory, no init)."""
    import torch

    from moedist.models import build_model
    from moedist.distributed.grad_sync import is_expert_param

    with torch.device("meta"):
        model = build_model(cfg)
    tot = exp = tr = tr_exp = 0
    for p in model.parameters():
        n, is_exp = p.numel(), is_expert_param(p)
        tot += n
        exp += n if is_exp else 0
        tr += n if p.requires_grad else 0
        tr_exp += n if (p.requires_grad and is_exp) else 0
    largest = largest_exp = 0
    for layer in model.layers:
        ps = list(layer.parameters())
        n = sum(p.numel() for p in ps)
        if n > largest:
            largest = n
            largest_exp = sum(p.numel() for p in ps if is_expert_param(p))
    return ParamCounts(tot, exp, tr, tr_exp, largest, largest_exp)


def zero3_gathered(gatherable: float, largest_layer: float, zero: dict, gloo: bool) -> float:
    """Elements of full (gathered) parameters a ZeRO-3 rank holds at its peak within a step.

    Args:
        gatherable: this rank's parameters as built (non-expert whole, experts E / ep).
        largest_layer: the largest decoder layer's share of those.
        zero: `deepspeed.extra.zero_optimization` (DeepSpeed defaults for missing keys).
        gloo: the all-gather has no `all_gather_into_tensor` (CPU/gloo): the partitions are gathered
            into a list and then copied into the flat buffer, one more copy of the bucket in flight.

    DeepSpeed releases a gathered parameter only when it will not be used again within
    `stage3_max_reuse_distance` elements of fetches and more than `stage3_max_live_parameters`
    are live; with the defaults (1e9 each) a model below that keeps every parameter it gathered
    in forward until backward has used it. Otherwise one layer plus the prefetch bucket is live.
    """
    prefetch = float(zero.get("stage3_prefetch_bucket_size", ZERO3_PREFETCH))
    live = float(zero.get("stage3_max_live_parameters", ZERO3_MAX_LIVE))
    reuse = float(zero.get("stage3_max_reuse_distance", ZERO3_REUSE))
    in_flight = min(max(prefetch, largest_layer), gatherable)  # one fetch: a prefetch bucket or a layer
    if reuse >= gatherable:
        kept = min(gatherable, max(live, largest_layer))
    else:
        kept = min(gatherable, largest_layer + in_flight)
    return kept + (in_flight if gloo else 0.0)


def _moe_layers(m) -> int:
    if m.moe_every == 0:
        return 0
    skip = set(m.mlp_only_layers or ())
    return sum(1 for i in range(m.num_layers) if (i + 1) % m.moe_every == 0 and i not in skip)


def _token_path(cfg, act_bytes: int) -> bool:
    """Whether the MoE layers run `GroupedExperts.forward_tokens` with its fused kernel: EP size 1,
    trainable or frozen experts without adapters, a gated FFN, float32 activations (bf16 takes the
    grouped kernel, which keeps the permuted rows)."""
    return (cfg.parallel.ep_size == 1 and cfg.lora.mode == "none" and act_bytes == 4
            and cfg.moe.activation in GATED_ACTIVATIONS)


def activation_bytes(cfg, act_bytes: int) -> dict:
    """Activation bytes kept for backward per micro-batch, and the transient all-to-all buffers."""
    m, moe, tr = cfg.model, cfg.moe, cfg.train
    T = tr.micro_batch_size * cfg.data.seq_len
    H, V = m.hidden_size, m.vocab_size
    d = m.head_dim or H // m.num_heads
    q_dim, kv_dim = m.num_heads * d, m.num_kv_heads * d
    F = moe.expert_ffn_size or m.ffn_size
    K = moe.top_k
    cf = moe.capacity_factor
    pairs = T * K * (min(1.0, cf) if cf else 1.0)  # routed (token, expert) pairs kept
    n_moe = _moe_layers(m)
    n_dense = m.num_layers - n_moe
    gqa = m.num_kv_heads != m.num_heads  # k and v repeated to every query head
    attn = T * (ATTN_H * H + ATTN_Q * q_dim + ATTN_KV * kv_dim + (ATTN_GQA * q_dim if gqa else 0))
    dense_ffn = T * (FFN_H * H + FFN_F * m.ffn_size)
    shared_F = (moe.shared_expert_ffn_size or F * moe.num_shared_experts) if moe.num_shared_experts else 0
    if cfg.lora.mode == "moe_lora":
        moe_ffn = T * (MOE_LORA_H * H + MOE_E * moe.num_experts)
    elif _token_path(cfg, act_bytes):
        moe_ffn = T * MOE_E * moe.num_experts + pairs * (MOE_TOKEN_PAIR_F * F + MOE_TOKEN_PAIR)
    else:
        moe_ffn = (T * MOE_E * moe.num_experts
                   + pairs * (MOE_PAIR_H * H + MOE_PAIR_F * F) * LORA_FACTOR[cfg.lora.mode])
    moe_ffn += T * FFN_F * shared_F
    # the loss works on fp32 logits (a bf16 model keeps its bf16 logits too)
    model_part = T * MODEL_H * H + T * V * MODEL_V * (4 + (2 if act_bytes == 2 else 0)) / act_bytes
    mode = tr.activation_checkpointing
    if mode == "full":  # keep each layer's input; recompute one layer at a time in backward
        layer_max = attn + max(dense_ffn if n_dense else 0, moe_ffn if n_moe else 0)
        kept = m.num_layers * T * H + layer_max
    elif mode == "moe":  # MoE blocks keep their input only; one block is recomputed at a time
        kept = m.num_layers * attn + n_dense * dense_ffn + n_moe * T * H + (moe_ffn if n_moe else 0)
    else:
        kept = m.num_layers * attn + n_dense * dense_ffn + n_moe * moe_ffn
    a2a = 4 * pairs * H if (n_moe and cfg.parallel.ep_size > 1) else 0  # send + receive, dispatch and combine
    return {"activations": (kept + model_part) * act_bytes, "a2a": a2a * act_bytes}


def estimate(cfg, world_size: int, counts: Optional[ParamCounts] = None, device: str = "cuda") -> dict:
    """The per-rank memory estimate of `cfg` on `world_size` ranks (see the module docstring).

    Returns {"per_rank": {params_mb, grads_mb, optimizer_mb, activations_mb, a2a_mb, buffers_mb,
    runtime_mb, total_mb, offload_mb}, "layout": {...}, "params": {...}}. `device` "cpu" adds the
    measured per-process overhead of CPU runs (`runtime_mb`).
    """
    counts = counts or count_params(cfg)
    ds, par, tr = cfg.deepspeed, cfg.parallel, cfg.train
    ep = par.ep_size
    edp = world_size // ep
    stage = ds.zero_stage if ds.enabled else 0
    mixed = ds.enabled and (ds.bf16 or ds.fp16)
    frozen_b = 2 if mixed else DTYPE_BYTES[cfg.model.dtype]
    train_b = 2 if mixed else 4
    act_b = 2 if (mixed or cfg.model.dtype != "float32") else 4

    # elements held by this rank before ZeRO partitioning (experts: E / ep of them)
    local_tr = counts.trainable_dense + counts.trainable_expert / ep
    local_frozen = (counts.dense - counts.trainable_dense) + (counts.expert - counts.trainable_expert) / ep
    # elements after ZeRO partitioning over the data-parallel groups (dense: world, experts: world / ep)
    part_tr = counts.trainable_dense / world_size + counts.trainable_expert / ep / edp
    part_frozen = ((counts.dense - counts.trainable_dense) / world_size
                   + (counts.expert - counts.trainable_expert) / ep / edp)

    buffers = 0.0
    if stage == 3:
        params = part_tr * train_b + part_frozen * frozen_b
        layer = counts.largest_layer - counts.largest_layer_expert + counts.largest_layer_expert / ep
        zero = (ds.extra or {}).get("zero_optimization") or {}
        # gathered parameters are in the compute dtype (frozen and trainable alike under mixed precision)
        gathered_b = 2 if mixed else (frozen_b * (local_frozen / max(1.0, local_tr + local_frozen))
                                      + train_b * (local_tr / max(1.0, local_tr + local_frozen)))
        buffers += zero3_gathered(local_tr + local_frozen, layer, zero, gloo=device == "cpu") * gathered_b
    else:
        params = local_tr * train_b + local_frozen * frozen_b
    if not ds.enabled:  # moedist's own reduction: every gradient bucket in flight at once (a flat copy)
        buffers += local_tr * train_b
    offload_params = 0.0
    if ds.offload_param == "cpu":  # the partition lives on the host; the gathered layer stays on the device
        offload_params, params = params, 0.0

    if stage >= 2:
        grads = part_tr * 4  # the fp32 gradient partition the optimizer steps
        buffers += min(ZERO2_BUCKET, local_tr) * train_b  # reduce bucket in flight
    elif stage == 1:
        grads = local_tr * train_b + part_tr * 4  # full grads, then the fp32 partition the optimizer steps
    else:
        grads = local_tr * train_b + (local_tr * 4 if mixed else 0)  # ZeRO-0 mixed: fp32 grad accumulators

    states = 2 if tr.optimizer == "adamw" else 0
    n_opt = part_tr if stage >= 1 else local_tr
    masters = 1 if (ds.enabled and (stage >= 1 or mixed)) else 0
    optimizer = n_opt * 4 * (states + masters)
    offload_opt = 0.0
    if ds.offload_optimizer == "cpu":
        offload_opt = optimizer + (part_tr * 4 if stage >= 1 else 0)
        optimizer = 0.0
        grads -= part_tr * 4 if stage >= 1 else 0
        grads = max(grads, 0.0)

    act = activation_bytes(cfg, act_b)
    per = {"params_mb": params / MB, "grads_mb": grads / MB, "optimizer_mb": optimizer / MB,
           "activations_mb": act["activations"] / MB, "a2a_mb": act["a2a"] / MB, "buffers_mb": buffers / MB}
    # CPU: what a process adds above the model (allocator arenas, code and pages first touched after the
    # model is built; measured on the tests' runs); CUDA: max_memory_allocated has no such part
    per["runtime_mb"] = CPU_RUNTIME_MB["deepspeed" if ds.enabled else "pytorch"] if device == "cpu" else 0.0
    per["total_mb"] = sum(per.values())
    per["offload_mb"] = (offload_opt + offload_params) / MB
    layout = {
        "world_size": world_size, "ep_size": ep, "edp_size": edp,
        "engine": "deepspeed" if ds.enabled else "pytorch", "zero_stage": stage,
        "precision": "bf16" if (ds.enabled and ds.bf16) else "fp16" if (ds.enabled and ds.fp16) else "fp32",
        "model_dtype": cfg.model.dtype, "lora_mode": cfg.lora.mode, "optimizer": tr.optimizer,
        "offload_optimizer": ds.offload_optimizer, "offload_param": ds.offload_param,
        "activation_checkpointing": tr.activation_checkpointing,
        "micro_batch_size": tr.micro_batch_size, "seq_len": cfg.data.seq_len,
        "experts_per_rank": cfg.moe.num_experts // ep, "device": device,
    }
    params_info = {"total": counts.total, "expert": counts.expert, "trainable": counts.trainable,
                   "trainable_expert": counts.trainable_expert,
                   "per_rank_before_zero": int(local_tr + local_frozen)}
    return {"per_rank": per, "layout": layout, "params": params_info}
