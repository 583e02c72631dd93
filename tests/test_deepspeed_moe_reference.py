"""Our MoE layer against DeepSpeed's own `deepspeed.moe.layer.MoE`, an independent implementation.

Where the semantics coincide -- the same weights, softmax top-1 (combine weight = the
probability, no renormalisation) and top-2 (renormalised pair), no gate noise, no random
token selection (`drop_tokens=True, use_rts=False`), no second-expert sampling, capacity
ample enough that nothing is dropped -- outputs and all gradients must agree to 1e-5, and
for top-1 also the load-balancing loss (DeepSpeed's top-2 loss counts first choices only,
ours every slot, so the top-2 aux losses are not compared) and the per-expert routing counts.

On 2 gloo processes: each rank compares EP=1 layers, then both compare EP=2 layers (DeepSpeed's
all-to-all vs ours over DeepSpeed's expert-parallel group), each rank with its own tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F_

from tests._dist import run_workers

H, FF, E, T = 16, 24, 4, 24


class SwiGLUExpert(nn.Module):
    """One expert for DeepSpeed's MoE (it deep-copies this module per local expert)."""

    def __init__(self):
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(H, FF))
        self.w_up = nn.Parameter(torch.zeros(H, FF))
        self.w_down = nn.Parameter(torch.zeros(FF, H))

    def forward(self, x):
        return (F_.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


def _weights(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"router": torch.randn(E, H, generator=g) * 0.5,
            "w_gate": torch.randn(E, H, FF, generator=g) * 0.3,
            "w_up": torch.randn(E, H, FF, generator=g) * 0.3,
            "w_down": torch.randn(E, FF, H, generator=g) * 0.3}


def _compare(k: int, ep: int, rank: int, ep_comm) -> dict:
    from deepspeed.moe.layer import MoE

    from moedist.moe import GroupedExperts, MoELayer, Router, TokenDispatcher

    w = _weights()
    L = E // ep
    first = (rank % ep) * L
    cf = 4.0  # ample: capacity = ceil(cf * T * k / E) >= T
    # --- DeepSpeed
    ds = MoE(hidden_size=H, expert=SwiGLUExpert(), num_experts=E, ep_size=ep, k=k, capacity_factor=cf,
             eval_capacity_factor=cf, min_capacity=1, noisy_gate_policy=None, drop_tokens=True, use_rts=False,
             top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(w["router"])
        for l, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            for name in ("w_gate", "w_up", "w_down"):
                getattr(expert, name).copy_(w[name][first + l])
    # --- ours
    router = Router(H, E, k, renormalize=k > 1)
    experts = GroupedExperts(E, H, FF, activation="swiglu", num_local=L, first_expert=first)
    ours = MoELayer(router, experts, None, TokenDispatcher(E, ep_comm), capacity_factor=cf, min_capacity=1,
                    drop_policy="position", aux_loss_type="switch", aux_loss_coef=1.0)
    with torch.no_grad():
        router.weight.copy_(w["router"])
        for name in ("w_gate", "w_up", "w_down"):
            getattr(experts, name).copy_(w[name][first:first + L])
    # --- the same tokens and upstream gradient for both
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, T // 2, H, generator=g)
    up = torch.randn(2, T // 2, H, generator=g)
    x_ds, x_us = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ds, l_aux, counts = ds(x_ds)
    y_us, aux = ours(x_us)
    ((y_ds * up).sum() + (l_aux if k == 1 else 0)).backward()
    ((y_us * up).sum() + (aux.loss if k == 1 else 0)).backward()
    errs = {"output": (y_ds - y_us).abs().max().item(), "x.grad": (x_ds.grad - x_us.grad).abs().max().item(),
            "router.grad": (ds.deepspeed_moe.gate.wg.weight.grad - router.weight.grad).abs().max().item(),
            "dropped": int(aux.dropped_per_expert.sum())}
    for name in ("w_gate", "w_up", "w_down"):
        ds_grad = torch.stack([getattr(e, name).grad for e in ds.deepspeed_moe.experts.deepspeed_experts])
        errs[f"{name}.grad"] = (ds_grad - getattr(experts, name).grad).abs().max().item()
    if k == 1:
        errs["aux_loss"] = abs(l_aux.item() - aux.aux_loss.item())
        errs["counts"] = (counts.cpu() - (aux.tokens_per_expert + aux.dropped_per_expert).cpu()).abs().max().item()
    errs["scale"] = min(y_ds.abs().max().item(), router.weight.grad.abs().max().item())
    return errs


def compare_worker(rank: int, world: int) -> dict:
    import deepspeed

    from moedist.distributed import ExpertParallelComm
    from moedist.train import deepspeed_setup as dss

    torch.set_num_threads(1)
    dss.quiet_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out = {}
    for k in (1, 2):
        out[f"ep1 top{k}"] = _compare(k, 1, rank, ExpertParallelComm.single())
    dims = dss.init_expert_groups(2)
    for k in (1, 2):
        out[f"ep2 top{k}"] = _compare(k, 2, rank, dims.ep_comm)
    return out


def test_moe_layer_matches_deepspeed_moe():
    results = run_workers(compare_worker, 2, timeout=300)
    for rank, res in enumerate(results):
        for case, errs in res.items():
            assert errs["dropped"] == 0, (rank, case)
            assert errs["scale"] > 1e-3, (rank, case)  # outputs and router gradients are not trivially zero
            for key, err in errs.items():
                if key in ("dropped", "scale"):
                    continue
                assert err <= 1e-5, f"rank {rank} {case}: {key} differs by {err:.2e}"
            assert ("aux_loss" in errs) == case.endswith("top1")
