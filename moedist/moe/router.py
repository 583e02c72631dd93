"""Routers: softmax top-k, sigmoid (DeepSeek-V3), noisy top-k (Shazeer 2017), jitter.

Routing math is in pure functions; `Router` only owns the parameters. Every
computation is at least float32 whatever the model dtype: the router weight
stays fp32 and a bf16/fp16 input is upcast (float64 stays float64, so the layer
can be checked with `torch.autograd.gradcheck`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F_

from moedist.moe.init import is_meta

SCORE_FUNCS = ("softmax", "sigmoid")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32: half types go up to float32, float64 is left alone."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass
class RouterOutput:
    """What the router decided for T tokens (all float32 except indices).

    idx_TK: [T, K] int64 global expert ids; weight_TK: [T, K] combine weights;
    probs_TE: [T, E] routing distribution used by the losses; logits_TE: [T, E];
    noise: (clean_logits, noisy_logits, noise_std) for the load loss, or None.
    """

    idx_TK: torch.Tensor
    weight_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    noise: Optional[tuple] = None


def softmax_topk(logits_TE: torch.Tensor, k: int, renormalize: bool = True):
    """P = softmax(logits); keep the top-k; optionally w = topk / sum(topk).

    Returns (idx [T, K], weight [T, K], probs [T, E]).
    """
    probs_TE = torch.softmax(_upcast(logits_TE), dim=-1)  # [T, E]
    w_TK, idx_TK = probs_TE.topk(k, dim=-1)  # [T, K]
    if renormalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return idx_TK, w_TK, probs_TE


def sigmoid_topk(logits_TE: torch.Tensor, k: int, bias_E: Optional[torch.Tensor] = None, renormalize: bool = True):
    """DeepSeek-V3 scoring: s = sigmoid(logits); choose top-k of s + bias; weights from s.

    The bias (aux-loss-free balancing) changes only which experts are chosen,
    never the combine weights. Returns (idx, weight, probs) where probs = s / sum(s)
    (a distribution for the balance losses).
    """
    s_TE = torch.sigmoid(_upcast(logits_TE))  # [T, E]
    choice = s_TE if bias_E is None else s_TE + bias_E.to(s_TE.dtype)
    idx_TK = choice.topk(k, dim=-1).indices  # [T, K]
    w_TK = s_TE.gather(1, idx_TK)  # [T, K]
    if renormalize:
        w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
    probs_TE = s_TE / (s_TE.sum(dim=-1, keepdim=True) + 1e-20)
    return idx_TK, w_TK, probs_TE


def update_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing step (Wang et al. 2024): raise the bias of
    under-loaded experts, lower over-loaded ones: b += rate * sign(mean - load)."""
    load = tokens_per_expert_E.float()
    return bias_E + rate * torch.sign(load.mean() - load)


class Router(nn.Module):
    """Linear router with weight [E, H] in float32.

    Args:
        hidden_size: H. num_experts: E. top_k: K (1 <= K <= E).
        score_func: "softmax" or "sigmoid".
        renormalize: divide the top-k weights by their sum.
        noisy_gating: Shazeer noisy top-k (trainable noise scale, training only).
        jitter_eps: multiply inputs by U(1-eps, 1+eps) in training (Switch).
        expert_bias: keep a per-expert bias buffer for aux-loss-free balancing.
        init_std: std of the normal init. seed: seed of this router's own generator.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 renormalize: bool = True, noisy_gating: bool = False, jitter_eps: float = 0.0,
                 expert_bias: bool = False, init_std: float = 0.02, seed: int = 0, device=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts}: must be >= 1")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k}: must be between 1 and num_experts ({num_experts})")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r}: allowed {', '.join(SCORE_FUNCS)}")
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps={jitter_eps}: must be in [0, 1)")
        if top_k == 1 and renormalize:
            warnings.warn("Router: top_k=1 with renormalize=True gives every token combine weight 1, so the router "
                          "learns only from the auxiliary losses; Switch-style top-1 uses renormalize=False", stacklevel=2)
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.renormalize = score_func, renormalize
        self.noisy_gating, self.jitter_eps = noisy_gating, jitter_eps
        self.init_std, self.seed = init_std, seed
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32, device=device))  # [E, H]
        self.noise_weight = (nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32, device=device))
                             if noisy_gating else None)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device) if expert_bias else None)
        self._noise_gen = torch.Generator().manual_seed(seed + 7919)
        if not is_meta(self.weight):  # meta: drawn at materialization (moedist.models.materialize)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.weight.copy_(torch.randn(tuple(self.weight.shape), generator=g, device="cpu") * self.init_std)
            if self.noise_weight is not None:
                self.noise_weight.zero_()

    def init_weights(self) -> None:
        """The weight from this router's seed; noise weight and balancing bias start at zero."""
        self.reset_parameters()
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def named_generators(self) -> dict:
        """The private stream of router noise and jitter (`moedist.train.rng.OwnsGenerators`)."""
        return {"noise": self._noise_gen}

    def _randn_like(self, t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=self._noise_gen).to(t.device)

    def forward(self, x_TH: torch.Tensor) -> RouterOutput:
        x = _upcast(x_TH)  # router in fp32 (or fp64 when given fp64)
        if self.training and self.jitter_eps > 0:
            u = torch.rand(x.shape, generator=self._noise_gen).to(x.device)
            x = x * (1.0 - self.jitter_eps + 2.0 * self.jitter_eps * u)
        clean_TE = x @ self.weight.to(x.dtype).t()  # [T, E]
        noise = None
        logits_TE = clean_TE
        if self.noisy_gating and self.training:
            std_TE = F_.softplus(x @ self.noise_weight.to(x.dtype).t()) + 1e-2  # [T, E]
            logits_TE = clean_TE + self._randn_like(clean_TE) * std_TE
            noise = (clean_TE, logits_TE, std_TE)
        if self.score_func == "softmax":
            idx, w, probs = softmax_topk(logits_TE, self.top_k, self.renormalize)
        else:
            idx, w, probs = sigmoid_topk(logits_TE, self.top_k, self.expert_bias, self.renormalize)
        return RouterOutput(idx, w, probs, logits_TE, noise)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor, rate: float = 1e-3) -> None:
        """One aux-loss-free balancing update from this step's (global) expert loads."""
        if self.expert_bias is None:
            raise ValueError("update_expert_bias: router was built with expert_bias=False")
        self.expert_bias.copy_(update_bias(self.expert_bias, tokens_per_expert_E.to(self.expert_bias.device), rate))
