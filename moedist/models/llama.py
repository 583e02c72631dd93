"""A tiny Llama-style decoder: RMSNorm, RoPE, causal GQA attention, dense or MoE FFN.

Parameter names follow Hugging Face Llama (`embed_tokens`, `layers.i.self_attn.q_proj`,
`input_layernorm`, `post_attention_layernorm`, `norm`, `lm_head`) so import and
export are name maps. Attention projections are `nn.Linear` ([out, in] like HF);
FFN weights are in math orientation ([H, F] / [F, H]) like the MoE experts.

Shapes: B batch, S sequence, H hidden, V vocab, nh heads, nkv kv heads, d head dim,
P past (cached) tokens.

Packed sequences: `position_ids` [B, S] restart the rotary positions per document
and `segment_ids` [B, S] make attention block-diagonal causal (a token sees only
earlier tokens of its own document). Generation: a `KVCache` keeps each layer's
rotated keys and values, so a step feeds only the new tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F_

from moedist.moe.ffn import GATED, check_activation, ffn
from moedist.moe.init import is_meta, normal_
from moedist.moe.groups import RouteInfo, route_info
from moedist.moe.layer import MoEAux, MoELayer


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as HF Llama)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def scale_inv_freq(inv_freq: torch.Tensor, scaling: Optional[dict]) -> torch.Tensor:
    """Rotary frequency scaling as in HF: None/default, "linear" (factor) or "llama3"
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"rope_type={kind!r}: allowed default, linear, llama3")
    lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
    return torch.where(medium, smoothed, scaled)


def _inv_freq(head_dim: int, theta: float, device, scaling: Optional[dict]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))  # [d/2]
    return scale_inv_freq(inv_freq, scaling)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None, dtype=torch.float32,
                 scaling: Optional[dict] = None):
    """cos/sin tables [S, d] for rotary embeddings (HF 'rotate_half' layout); `scaling` see scale_inv_freq."""
    inv_freq = _inv_freq(head_dim, theta, device, scaling)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # [S, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_cos_sin_at(position_ids_BS: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32,
                    scaling: Optional[dict] = None):
    """cos/sin [B, 1, S, d] at explicit rotary positions (broadcast over heads); same values as `rope_cos_sin` rows."""
    inv_freq = _inv_freq(head_dim, theta, position_ids_BS.device, scaling)
    freqs = position_ids_BS.float()[..., None] * inv_freq  # [B, S, d/2]
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [B, 1, S, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_mask(S: int, past: int = 0, segment_ids_BS: Optional[torch.Tensor] = None,
                   device=None) -> Optional[torch.Tensor]:
    """Boolean mask (True = attend) for `scaled_dot_product_attention`, or None for plain `is_causal`.

    Query i (absolute position past + i) sees keys 0..past+i; with `segment_ids`
    (no past) only keys of its own segment. Returns [B, 1, S, S] with segments,
    [S, P + S] with a past of P > 0 and S > 1, None otherwise (S == 1 with a past
    sees everything: no mask needed).
    """
    if segment_ids_BS is not None:
        if past:
            raise ValueError("segment_ids with a KV cache holding past tokens is not supported")
        device = segment_ids_BS.device
    elif past == 0 or S == 1:
        return None
    q_pos = past + torch.arange(S, device=device)  # [S]
    causal = torch.arange(past + S, device=device)[None, :] <= q_pos[:, None]  # [S, P+S]
    if segment_ids_BS is None:
        return causal
    same = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]  # [B, S, S]
    return (same & causal).unsqueeze(1)  # [B, 1, S, S]


def apply_rope(x_BnSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    d2 = x_BnSd.shape[-1] // 2
    rot = torch.cat([-x_BnSd[..., d2:], x_BnSd[..., :d2]], dim=-1)
    return x_BnSd * cos_Sd + rot * sin_Sd


class LayerKV:
    """One layer's cached keys/values [B, nkv, P, d] (after RoPE, before GQA repeat)."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Add the new [B, nkv, S, d] keys/values; return all of them [B, nkv, P+S, d]."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Keys/values of every layer for incremental decoding: `model(ids, cache=cache)` appends.

        cache = KVCache(len(model.layers))
        logits = model(prompt_1S, cache=cache).logits        # prefill
        logits = model(next_11, cache=cache).logits          # one step (position = cache.past_len)
    """

    def __init__(self, num_layers: int):
        self.layers: List[LayerKV] = [LayerKV() for _ in range(num_layers)]

    @property
    def past_len(self) -> int:
        """Tokens already cached (P)."""
        return self.layers[0].length if self.layers else 0


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE; optional q/k RMSNorm (Qwen3) and qkv bias (Qwen2)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: Optional[int] = None,
                 bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        if hidden % num_heads and head_dim is None:
            raise ValueError(f"hidden_size={hidden} is not divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
        self.nh, self.nkv = num_heads, num_kv_heads
        self.d = head_dim or hidden // num_heads
        self.q_proj = nn.Linear(hidden, self.nh * self.d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.nkv * self.d, bias=bias)
        self.v_proj = nn.Linear(hidden, self.nkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.d, hidden, bias=False)
        self.q_norm = RMSNorm(self.d, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.d, norm_eps) if qk_norm else None

    def forward(self, x_BSH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                kv: Optional[LayerKV] = None) -> torch.Tensor:
        """cos/sin [S, d] or [B, 1, S, d]; mask: boolean (True = attend), None = causal; kv: this layer's cache."""
        B, S, _ = x_BSH.shape
        q = self.q_proj(x_BSH).view(B, S, self.nh, self.d)
        k = self.k_proj(x_BSH).view(B, S, self.nkv, self.d)
        v = self.v_proj(x_BSH).view(B, S, self.nkv, self.d).transpose(1, 2)  # [B, nkv, S, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, nh, S, d]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, nkv, S, d]
        past = 0
        if kv is not None:
            past = kv.length
            k, v = kv.append(k, v)  # [B, nkv, P+S, d]
        if self.nkv != self.nh:
            rep = self.nh // self.nkv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is not None:
            o = F_.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, nh, S, d]
        else:  # no past: causal; one new token after a past: it sees every key
            o = F_.scaled_dot_product_attention(q, k, v, is_causal=past == 0)  # [B, nh, S, d]
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.nh * self.d))


def draw_ffn_(w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down: torch.Tensor, seed: int, std: float) -> None:
    """A dense FFN's weights: gate (if any), up, down from one generator seeded by `seed`."""
    g = torch.Generator().manual_seed(seed)
    for w in (w_gate, w_up, w_down):
        normal_(w, g, std)


class DenseFFN(nn.Module):
    """Dense FFN with weights in math orientation: w_gate/w_up [H, F], w_down [F, H]."""

    def __init__(self, hidden: int, ffn_size: int, activation: str = "swiglu", init_std: float = 0.02, seed: int = 0):
        super().__init__()
        check_activation(activation)
        self.activation, self.seed, self.init_std = activation, seed, init_std
        self.w_gate = nn.Parameter(torch.empty(hidden, ffn_size)) if activation in GATED else None
        self.w_up = nn.Parameter(torch.empty(hidden, ffn_size))
        self.w_down = nn.Parameter(torch.empty(ffn_size, hidden))
        if not is_meta(self.w_up):  # meta: drawn at materialization (moedist.models.materialize)
            self.init_weights()

    def init_weights(self) -> None:
        """gate, up, down in that order from one generator seeded by `seed`."""
        draw_ffn_(self.w_gate, self.w_up, self.w_down, self.seed, self.init_std)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return ffn(x_BSH, self.w_gate, self.w_up, self.w_down, self.activation)


class DecoderLayer(nn.Module):
    # Activation checkpointing (set by `moedist.models.act_ckpt.apply_activation_checkpointing`):
    # a `Recompute` for the whole layer or for its FFN/MoE block; None = keep activations.
    recompute_layer = None
    recompute_mlp = None

    def __init__(self, attn: Attention, mlp: nn.Module, hidden: int, norm_eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(hidden, norm_eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos, sin, mask: Optional[torch.Tensor] = None, kv: Optional[LayerKV] = None,
                route: Optional[RouteInfo] = None):
        if self.recompute_layer is not None and kv is None:
            return self.recompute_layer(self._forward, x, cos, sin, mask, None, route)
        return self._forward(x, cos, sin, mask, kv, route)

    def _forward(self, x: torch.Tensor, cos, sin, mask: Optional[torch.Tensor] = None, kv: Optional[LayerKV] = None,
                 route: Optional[RouteInfo] = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        h = self.post_attention_layernorm(x)
        args = (h, route) if isinstance(self.mlp, MoELayer) else (h,)  # the route picks a MoE layer's expert group
        out = self.mlp(*args) if self.recompute_mlp is None else self.recompute_mlp(self.mlp, *args)
        aux = None
        if isinstance(out, tuple):  # MoE layer: (y, MoEAux)
            out, aux = out
        return x + out, aux


@dataclass
class CausalLMOutput:
    """logits [B, S, V]; loss = lm_loss + aux_loss (when labels given); moe_aux per MoE layer.

    lm_loss is the mean cross-entropy over counted labels (!= -100), a finite 0
    (with a grad path) when none is counted; lm_loss_sum = lm_loss * num_loss_tokens
    (fp32) and num_loss_tokens (int64, 0-d) let callers weight micro-batches by tokens.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    moe_aux: List[MoEAux] = field(default_factory=list)
    lm_loss_sum: Optional[torch.Tensor] = None
    num_loss_tokens: Optional[torch.Tensor] = None


class CausalLM(nn.Module):
    """Decoder-only language model built from a list of `DecoderLayer`s (see models/build.py)."""

    def __init__(self, vocab_size: int, hidden: int, layers: List[DecoderLayer], max_seq_len: int, rope_theta: float,
                 head_dim: int, norm_eps: float = 1e-6, tie_embeddings: bool = False, init_std: float = 0.02, seed: int = 0,
                 rope_scaling: Optional[dict] = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, norm_eps)
        self.lm_head = None if tie_embeddings else nn.Linear(hidden, vocab_size, bias=False)
        self.max_seq_len, self.rope_theta, self.head_dim = max_seq_len, rope_theta, head_dim
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None  # HF-style, e.g. {"rope_type": "llama3", ...}
        scale_inv_freq(torch.tensor([1.0], device="cpu"), self.rope_scaling)  # reject an unknown rope_type at build time
        self.init_std, self.seed = init_std, seed
        if not is_meta(self.embed_tokens.weight):  # meta: drawn at materialization
            self.init_weights()

    def init_weights(self) -> None:
        """Embedding, output head and every attention projection (bias zero), in that order, from one
        generator seeded by `seed`; the FFNs, norms and LoRA adapters draw their own."""
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            normal_(self.embed_tokens.weight, g, self.init_std)
            normal_(None if self.lm_head is None else self.lm_head.weight, g, self.init_std)
            for layer in self.layers:
                attn = layer.self_attn
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                    normal_(lin.weight, g, self.init_std)
                    if lin.bias is not None:
                        lin.bias.zero_()

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, domain_ids: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """Logits (and losses when `labels` are given) of a batch.

        Args:
            input_ids: [B, S] token ids.
            labels: [B, S] targets already aligned with the logits (-100 = not counted).
            position_ids: [B, S] rotary positions (default 0..S-1, or past_len.. with a cache).
            segment_ids: [B, S] packed-document ids: attention stays inside a segment.
            cache: a `KVCache`; new keys/values are appended and attention sees the past.
            domain_ids: [B] (or [B, S]) data-source index of each sequence (token), -1 = none: picks the
                expert group of every MoE layer (`moe.expert_groups`); None = no domain.

        Returns:
            CausalLMOutput (losses None without labels).
        """
        B, S = input_ids.shape
        past = 0 if cache is None else cache.past_len
        if past + S > self.max_seq_len:
            what = f"sequence length {S}" if not past else f"past {past} + new {S} tokens"
            raise ValueError(f"{what} exceeds model.max_seq_len={self.max_seq_len}")
        x = self.embed_tokens(input_ids)  # [B, S, H]
        if position_ids is None and past == 0:
            cos, sin = rope_cos_sin(S, self.head_dim, self.rope_theta, device=x.device, dtype=x.dtype,
                                    scaling=self.rope_scaling)  # [S, d]
        else:
            if position_ids is None:
                position_ids = (past + torch.arange(S, device=x.device)).expand(B, S)
            cos, sin = rope_cos_sin_at(position_ids, self.head_dim, self.rope_theta, dtype=x.dtype,
                                       scaling=self.rope_scaling)  # [B, 1, S, d]
        mask = attention_mask(S, past, segment_ids, device=x.device)
        auxes = []
        route = route_info(input_ids, domain_ids)
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, mask, None if cache is None else cache.layers[i], route)
            if aux is not None:
                auxes.append(aux)
        x = self.norm(x)
        logits = F_.linear(x, self.output_weight())  # [B, S, V]
        out = CausalLMOutput(logits=logits, moe_aux=auxes)
        if labels is not None:
            lm, n = lm_loss(logits, labels)
            aux_total = sum((a.loss for a in auxes), torch.zeros((), device=lm.device))
            out.lm_loss, out.aux_loss, out.loss = lm, aux_total, lm + aux_total
            out.lm_loss_sum, out.num_loss_tokens = lm * n, n
        return out


def lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor):
    """(mean cross-entropy over labels != -100 in fp32, count int64 0-d).

    No host sync: with nothing counted the mean (0/0 = NaN) is replaced by a 0
    that keeps the graph; its gradient is exactly 0 (ignored rows get none).
    """
    flat = logits_BSV.float().reshape(-1, logits_BSV.shape[-1])  # [B*S, V]
    ce = F_.cross_entropy(flat, labels_BS.reshape(-1), ignore_index=-100)
    n = (labels_BS != -100).sum()
    return torch.where(n > 0, ce, torch.zeros_like(ce)), n
