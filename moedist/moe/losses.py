"""Auxiliary router losses (pure functions, float32).

All take the router's float32 tensors for the tokens of one micro-batch on one
rank. Under expert parallelism each rank computes them on its own tokens (as
Megatron-Core and GShard do); data-parallel gradient averaging then averages
them, so results do not depend on the EP size.
"""
from __future__ import annotations

import torch

from moedist.moe.counts import count_ids


def switch_load_balancing_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4).

    loss = E * sum_e f_e * P_e, where
    f_e = (number of (token, slot) assignments to expert e) / (T * K)   (no gradient)
    P_e = mean over tokens of probs[:, e]                              (differentiable)

    Equals 1.0 for perfectly uniform routing; grows to E when one expert takes all.
    """
    T = probs_TE.shape[0]
    if T == 0:
        return probs_TE.sum() * 0.0
    counts_E = count_ids(idx_TK, num_experts).to(probs_TE.dtype)  # [E]
    f_E = counts_E / idx_TK.numel()  # [E]
    P_E = probs_TE.mean(dim=0)  # [E]
    return num_experts * torch.sum(f_E * P_E)


def _cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(x) / mean(x)^2 (population variance)."""
    if x_E.numel() <= 1:
        return x_E.sum() * 0.0
    mean = x_E.mean()
    return x_E.var(unbiased=False) / (mean * mean + 1e-10)


def importance_loss(gates_TE: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. 2017 importance loss: CV^2 of per-expert summed gate values.

    importance_e = sum_t gates[t, e]; loss = CV(importance)^2.
    `gates_TE` are the (sparse) combine weights scattered to [T, E].
    """
    return _cv_squared(gates_TE.sum(dim=0))


def load_loss(clean_logits_TE: torch.Tensor, noisy_logits_TE: torch.Tensor, noise_std_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al. 2017 smooth load loss (appendix A): CV^2 of the expected load.

    P(t, e) = Phi((clean[t,e] - threshold[t,e]) / noise_std[t,e]), where the
    threshold is the k-th largest noisy logit of token t excluding expert e
    (the k-th largest if e is not in the noisy top-k, else the (k+1)-th).
    load_e = sum_t P(t, e); loss = CV(load)^2.
    """
    T, E = noisy_logits_TE.shape
    if T == 0 or k >= E:
        return clean_logits_TE.sum() * 0.0
    top_vals, _ = noisy_logits_TE.topk(k + 1, dim=-1)  # [T, K+1]
    kth_in = top_vals[:, k : k + 1]  # [T, 1] threshold for experts outside the top-k
    kth_out = top_vals[:, k - 1 : k]  # [T, 1] threshold for experts inside the top-k
    is_in = noisy_logits_TE > kth_in  # [T, E]
    threshold = torch.where(is_in, kth_in, kth_out)  # [T, E]
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_TE = normal.cdf((clean_logits_TE - threshold) / noise_std_TE)  # [T, E]
    return _cv_squared(prob_TE.sum(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_t (logsumexp_e logits[t, e])^2."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    z_T = torch.logsumexp(logits_TE, dim=-1)  # [T]
    return torch.mean(z_T * z_T)


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the routing distribution, in nats (diagnostic): a 0-d fp32 tensor
    on the device (no host sync; read it once per logging step)."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros((), dtype=torch.float32)
    p = probs_TE.detach().clamp_min(1e-12)
    p = p / p.sum(dim=-1, keepdim=True)
    return (-(p * p.log()).sum(dim=-1).mean()).float()
