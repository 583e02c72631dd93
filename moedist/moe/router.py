"""Routers: softmax top-k, sigmoid (DeepSeek-V3), noisy top-k (Shazeer 2017), jitter,
GShard's random second-expert dispatch.

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

from moedist.choices import SCORE_FUNCS, SECOND_EXPERT_POLICIES
from moedist.moe.groups import mask_bias, mask_logits
from moedist.moe.init import is_meta



def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32: half types go up to float32, float64 is left alone."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass
class RouterOutput:
    """What the router decided for T tokens (all float32 except indices).

    idx_TK: [T, K] int64 global expert ids; weight_TK: [T, K] combine weights;
    probs_TE: [T, E] routing distribution used by the losses; logits_TE: [T, E];
    noise: (clean_logits, noisy_logits, noise_std) for the load loss, or None.
    active_TK: [T, K] bool, the pairs dispatched at all (second_expert_policy="random"
    skips some second choices), or None when every pair is.
    """

    idx_TK: torch.Tensor
    weight_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    noise: Optional[tuple] = None
    active_TK: Optional[torch.Tensor] = None


def softmax_topk(logits_TE: torch.Tensor, k: int, renormalize: bool = True):
    """P = softmax(logits); keep the top-k; optionally w = topk / sum(topk).

    Returns (idx [T, K], weight [T, K], probs [T, E]).
    """
    probs_TE = torch.softmax(_upcast(logits_TE), dim=-1)  # [T, E]
    w_TK, idx_TK = probs_TE.topk(k, dim=-1)  # [T, K]
    if renormalize and k == 1:  # p / p is 1: its autograd "gradient" would be rounding noise (1/p - p/p^2)
        w_TK = torch.ones_like(w_TK)
    elif renormalize:
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


def random_second_expert(weight_TK: torch.Tensor, u_T: torch.Tensor) -> torch.Tensor:
    """GShard's random dispatch of the second expert (Lepikhin et al. 2020, Algorithm 1; fairseq
    `top2gating(second_expert_policy="random")`): pair (t, 1) is dispatched when 2 * w2 > u_t with
    w2 = w[t, 1] / (w[t, 0] + w[t, 1]), i.e. with probability min(1, 2 * w2).

    weight_TK: [T, 2] combine weights; u_T: [T] uniforms in [0, 1). Returns active_TK [T, 2] bool.
    """
    w = weight_TK.detach()
    w2_T = w[:, 1] / (w[:, 0] + w[:, 1]).clamp_min(torch.finfo(w.dtype).tiny)  # [T]
    first_T = torch.ones_like(w2_T, dtype=torch.bool)
    return torch.stack([first_T, 2.0 * w2_T > u_T.to(w2_T.dtype)], dim=1)  # [T, 2]


def update_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing step (Wang et al. 2024): raise the bias of
    under-loaded experts, lower over-loaded ones: b += rate * sign(mean - load)."""
    load = tokens_per_expert_E.double()  # exact for integer counts
    return (bias_E.double() + rate * torch.sign(load.mean() - load)).to(bias_E.dtype)


class Router(nn.Module):
    """Linear router with weight [E, H] in float32.

    Args:
        hidden_size: H. num_experts: E. top_k: K (1 <= K <= E).
        score_func: "softmax" or "sigmoid".
        renormalize: divide the top-k weights by their sum.
        noisy_gating: Shazeer noisy top-k (trainable noise scale, training only).
        jitter_eps: multiply inputs by U(1-eps, 1+eps) in training (Switch).
        expert_bias: keep a per-expert bias buffer for aux-loss-free balancing (sigmoid only).
        init_std: std of the normal init. seed: seed of this router's own generator.
        second_expert_policy: top-2 only: "all", or "random" (GShard; training only,
            from a private generator seeded by seed + 104729).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 renormalize: bool = True, noisy_gating: bool = False, jitter_eps: float = 0.0,
                 expert_bias: bool = False, init_std: float = 0.02, seed: int = 0, device=None,
                 second_expert_policy: str = "all"):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts}: must be >= 1")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k}: must be between 1 and num_experts ({num_experts})")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r}: allowed {', '.join(SCORE_FUNCS)}")
        if expert_bias and score_func != "sigmoid":
            raise ValueError(f"expert_bias=True needs score_func='sigmoid' (got {score_func!r}): "
                             "the bias only biases the sigmoid top-k choice")
        if second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(f"second_expert_policy={second_expert_policy!r}: allowed {', '.join(SECOND_EXPERT_POLICIES)}")
        if second_expert_policy == "random" and top_k != 2:
            raise ValueError(f"second_expert_policy='random' needs top_k=2 (got {top_k})")
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
        self.second_expert_policy = second_expert_policy
        self._second_gen = torch.Generator().manual_seed(seed + 104729) if second_expert_policy == "random" else None
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
        gens = {"noise": self._noise_gen}
        if self._second_gen is not None:  # only then: older checkpoints name no such stream
            gens["second_expert"] = self._second_gen
        return gens

    def _randn_like(self, t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=self._noise_gen).to(t.device)

    def forward(self, x_TH: torch.Tensor, allowed_TE: Optional[torch.Tensor] = None) -> RouterOutput:
        """Route T tokens; allowed_TE [T, E] bool (expert groups) masks the scores outside each token's group
        before top-k (`moedist.moe.groups`)."""
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
        bias = self.expert_bias
        if allowed_TE is not None:  # expert groups: -inf outside the group, for the scores and the selection bias
            logits_TE = mask_logits(logits_TE, allowed_TE)
            bias = mask_bias(bias, allowed_TE, logits_TE.dtype) if self.score_func == "sigmoid" else bias
        if self.score_func == "softmax":
            idx, w, probs = softmax_topk(logits_TE, self.top_k, self.renormalize)
        else:
            idx, w, probs = sigmoid_topk(logits_TE, self.top_k, bias, self.renormalize)
        active = None
        if self._second_gen is not None and self.training:
            u_T = torch.rand(idx.shape[0], generator=self._second_gen).to(w.device)  # [T]
            active = random_second_expert(w, u_T)
        return RouterOutput(idx, w, probs, logits_TE, noise, active)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor, rate: float = 1e-3) -> None:
        """One aux-loss-free balancing update from this step's (global) expert loads."""
        if self.expert_bias is None:
            raise ValueError("update_expert_bias: router was built with expert_bias=False")
        self.expert_bias.copy_(update_bias(self.expert_bias, tokens_per_expert_E.to(self.expert_bias.device), rate))
