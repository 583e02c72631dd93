"""Routing options of issue 18.4 against the naive loop reference (tests/moe_reference.py).

* expert-choice routing (`moe.router_type=expert_choice`): outputs and gradients vs a
  per-expert sort of the softmax probabilities; EP=1 vs EP=2 in 2 gloo processes;
* GShard's random second expert (`moe.second_expert_policy=random`): the same uniforms
  drawn from the router's generator, a hand-written keep rule; exact replay from the
  saved RNG state; eval routes every pair;
* `moe.eval_capacity_factor`: train vs eval capacity;
* MoE-LoRA under capacity dropping: frozen FFN(x) + sum over kept pairs of w * adapter delta,
  on the fused (EP 1) and the dispatch path; a token that lost every pair gets FFN(x);
* combine accumulates bf16 in fp32 (one rounding at the end), and the shared-expert gate
  runs in fp32;
* one-line ConfigErrors for the nonsense combinations.
"""
import math

import pytest
import torch
import torch.nn as nn

from moedist.config import ConfigError, load_config
from moedist.moe import GroupedExperts, MoELayer, MoELoRAExperts, Router, SharedExperts
from moedist.moe.dispatcher import weighted_scatter_add
from moedist.train.rng import rng_states, set_rng_states
from tests.moe_reference import (Leaves, experts_dict, ref_base_ffn, ref_capacity, ref_expert, ref_expert_choice,
                                 ref_keep, ref_moe, ref_random_second_keep, ref_route, router_dict)

TOL = dict(atol=1e-5, rtol=1e-5)
E, H, F, R = 8, 6, 8, 3
B, S = 2, 6  # T = 12 tokens
T = B * S


class NoFused(nn.Module):
    """Hides `forward_tokens`: the layer takes the dispatch / forward / combine path."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.num_local = inner, inner.num_local

    def forward(self, x_NH, counts_L):
        return self.inner(x_NH, counts_L)

    def base_forward(self, x_TH):
        return self.inner.base_forward(x_TH)


def _x(seed: int) -> torch.Tensor:
    return torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def _experts(kind: str):
    """(module, reference kind): grouped experts, or MoE-LoRA adapters with non-zero B."""
    if kind == "grouped":
        return GroupedExperts(E, H, F, init_std=0.4, seed=2), "grouped"
    m = MoELoRAExperts(E, H, F, R, lora_alpha=2.0, init_std=0.4, seed=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for st in m.lora.values():
            st.lora_B.copy_(torch.randn(st.lora_B.shape, generator=g) * 0.4)
    return m, "moelora"


def _compare_grads(x, x64, leaves, layer):
    torch.testing.assert_close(x.grad.double().reshape(T, H), x64.grad, **TOL)
    for p, leaf in leaves.pairs():
        assert p.grad is not None and leaf.grad is not None
        torch.testing.assert_close(p.grad.double(), leaf.grad, **TOL)
    assert len(leaves.pairs()) == sum(1 for p in layer.parameters() if p.requires_grad)


# ------------------------------------------------------------------ expert choice
@pytest.mark.parametrize("kind, fused", [("grouped", False), ("moelora", True), ("moelora", False)])
@pytest.mark.parametrize("cf", [0.25, 1.0, 3.0])
def test_expert_choice_matches_reference(kind, fused, cf):
    router = Router(H, E, 2, init_std=0.7, seed=1)
    experts, ref_kind = _experts(kind)
    layer = MoELayer(router, experts if fused or kind == "grouped" else NoFused(experts), capacity_factor=cf,
                     aux_loss_type="none", router_type="expert_choice")
    x = _x(3)
    y, aux = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(17))
    ((y * gy).sum() + aux.loss).backward()

    C = min(ref_capacity(T, E, 2, cf), T)  # ceil(cf * 12 * 2 / 8)
    leaves = Leaves()
    x64 = x.detach().double().reshape(T, H).requires_grad_(True)
    y_ref, chosen, _ = ref_expert_choice(x64, router_dict(router, leaves), experts_dict(experts, ref_kind, leaves),
                                         C, "swiglu")
    (y_ref.reshape(B, S, H) * gy.double()).sum().backward()
    torch.testing.assert_close(y.detach().double(), y_ref.detach().reshape(B, S, H), **TOL)
    _compare_grads(x, x64, leaves, layer)
    assert aux.tokens_per_expert.tolist() == [C] * E  # every expert is exactly full
    assert aux.capacity == ref_capacity(T, E, 2, cf)
    per_token = [sum(t in c for c in chosen) for t in range(T)]
    if cf < 3.0:  # not top-k: tokens get different numbers of experts
        assert len(set(per_token)) > 1, per_token
    if cf == 0.25:  # C = 1: 8 pairs for 12 tokens
        assert min(per_token) == 0, per_token  # a token no expert chose: zero output (grouped) or FFN(x)


def test_expert_choice_refuses_what_it_cannot_do():
    router = Router(H, E, 2, seed=1)
    with pytest.raises(ValueError, match="capacity factor"):
        MoELayer(router, GroupedExperts(E, H, F), capacity_factor=None, aux_loss_type="none", router_type="expert_choice")
    with pytest.raises(ValueError, match="aux_loss_type"):
        MoELayer(router, GroupedExperts(E, H, F), capacity_factor=1.0, router_type="expert_choice")


def test_expert_choice_same_at_ep1_and_ep2():
    """Each rank chooses among its own tokens before dispatch: at EP=2 every rank's outputs, gradients
    and weights after SGD + 2 Adam steps equal the one-process layer on that rank's micro-batch."""
    from tests.ep_helpers import EPConfig, run_and_check

    cfgs = [EPConfig("ec_grouped_cf1.0", cf=1.0, aux_type="none", router_type="expert_choice", seed=300),
            EPConfig("ec_moelora_cf0.5", cf=0.5, aux_type="none", router_type="expert_choice", experts="moelora",
                     seed=301),
            EPConfig("moelora_k2_cf0.5_base", cf=0.5, experts="moelora", seed=302)]
    run = run_and_check(2, cfgs, (1, 2))
    # token / byte counts are recomputed by a top-k loop in ep_helpers, which does not apply to expert choice
    bad = [m for k, m in run["errs"] if k in ("forward", "grad", "weights") or "[ec_" not in m]
    assert not bad, "\n".join(bad[:20])
    assert run["n"] == 2 * 2 * len(cfgs)


# ------------------------------------------------------------------ GShard random second expert
def _random_layer(cf, kind="grouped", policy="position"):
    router = Router(H, E, 2, init_std=0.7, seed=1, second_expert_policy="random")
    experts, ref_kind = _experts(kind)
    layer = MoELayer(router, experts, capacity_factor=cf, drop_policy=policy, aux_loss_coef=0.0)
    return layer, experts, ref_kind


@pytest.mark.parametrize("cf, kind, policy", [(None, "grouped", "position"), (0.5, "grouped", "position"),
                                              (0.5, "grouped", "probs"), (1.0, "moelora", "position")])
def test_random_second_expert_matches_reference(cf, kind, policy):
    layer, experts, ref_kind = _random_layer(cf, kind, policy)
    layer.train()
    gen = layer.router.named_generators()["second_expert"]
    u = torch.rand(T, generator=torch.Generator().set_state(gen.get_state()))  # the draws the router will make
    x = _x(4)
    y, aux = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(17))
    (y * gy).sum().backward()

    leaves = Leaves()
    x64 = x.detach().double().reshape(T, H).requires_grad_(True)
    y_ref, info = ref_moe(x64, router_dict(layer.router, leaves), experts_dict(experts, ref_kind, leaves), 2, "swiglu",
                          capacity_factor=cf, drop_policy=policy, second_u=u)
    (y_ref.reshape(B, S, H) * gy.double()).sum().backward()
    torch.testing.assert_close(y.detach().double(), y_ref.detach().reshape(B, S, H), **TOL)
    _compare_grads(x, x64, leaves, layer)
    assert aux.tokens_per_expert.tolist() == info["kept"] and aux.dropped_per_expert.tolist() == info["dropped"]
    active = ref_random_second_keep(info["route"]["w"], u)
    second = [a[1] for a in active]
    assert 0 < sum(second) < T  # some second choices skipped, some dispatched
    if cf == 0.5:
        assert sum(info["dropped"]) > 0


def test_random_second_expert_rule_by_hand():
    """w2 / (w1 + w2) = 0.25 -> dispatched iff u < 0.5; 0.5 -> always (probability min(1, 2 * w2))."""
    from moedist.moe.router import random_second_expert

    w = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.5, 0.5], [0.6, 0.2]])
    u = torch.tensor([0.49, 0.51, 0.999, 0.5])
    assert random_second_expert(w, u).tolist() == [[True, True], [True, False], [True, True], [True, False]]


def test_random_second_expert_replays_from_saved_rng_and_eval_routes_all():
    layer, _, _ = _random_layer(1.0)
    assert "second_expert" in layer.router.named_generators()
    assert "second_expert" not in Router(H, E, 2, seed=1).named_generators()  # older checkpoints stay loadable
    layer.train()
    x = _x(5).detach()
    states = rng_states(layer)
    y1, a1 = layer(x)
    y2, a2 = layer(x)
    assert not torch.equal(a1.tokens_per_expert, a2.tokens_per_expert) or not torch.equal(y1, y2)  # fresh draws
    set_rng_states(layer, states)
    y1b, _ = layer(x)
    assert torch.equal(y1, y1b)  # resume replays the same dispatch
    layer.eval()
    _, ae = layer(x)
    assert int(ae.tokens_per_expert.sum() + ae.dropped_per_expert.sum()) == 2 * T  # every pair routed in eval


# ------------------------------------------------------------------ eval capacity factor
@pytest.mark.parametrize("eval_cf, want", [(None, 2), (2.0, 6), (0, None)])
def test_eval_capacity_factor(eval_cf, want):
    router = Router(H, E, 2, init_std=0.7, seed=1)
    experts, _ = _experts("grouped")
    layer = MoELayer(router, experts, capacity_factor=0.5, eval_capacity_factor=eval_cf)
    x = _x(6).detach()
    _, a_train = layer.train()(x)
    assert a_train.capacity == 2  # ceil(0.5 * 12 * 2 / 8)
    with torch.no_grad():
        y, a_eval = layer.eval()(x)
    assert a_eval.capacity == want
    leaves = Leaves()
    y_ref, info = ref_moe(x.double().reshape(T, H), router_dict(router, leaves), experts_dict(experts, "grouped", leaves),
                          2, "swiglu", capacity_factor=0.5 if eval_cf is None else eval_cf)
    torch.testing.assert_close(y.double(), y_ref.detach().reshape(B, S, H), **TOL)
    assert (sum(info["dropped"]) > 0) == (want is not None and want < 6)


# ------------------------------------------------------------------ MoE-LoRA keeps the frozen FFN
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_lora_capacity_drops_only_adapters(fused, renormalize):
    """Hand reference: y[t] = FFN(x_t) + sum over t's KEPT pairs of w * (FFN_e(x_t) - FFN(x_t))."""
    router = Router(H, E, 2, init_std=0.7, seed=1, renormalize=renormalize)
    experts, _ = _experts("moelora")
    layer = MoELayer(router, experts if fused else NoFused(experts), capacity_factor=0.25, min_capacity=1)
    x = _x(7)
    y, _ = layer(x)
    leaves = Leaves()
    rd, ed = router_dict(router, leaves), experts_dict(experts, "moelora", leaves)
    x64 = x.detach().double().reshape(T, H)
    r = ref_route(x64, rd, 2, renormalize=renormalize)
    keep, dropped = ref_keep(r["idx"], r["w"], E, 1, "position")
    rows, lost = [], []
    for t in range(T):
        base = ref_base_ffn(x64[t], ed, "swiglu")
        row = base.clone()
        for k in range(2):
            if keep[t][k]:
                row = row + r["w"][t][k] * (ref_expert(r["idx"][t][k], x64[t], ed, "swiglu") - base)
        rows.append(row)
        if not any(keep[t]):
            lost.append(t)
    want = torch.stack(rows).detach()
    got = y.detach().double().reshape(T, H)
    torch.testing.assert_close(got, want, **TOL)
    assert len(lost) >= 3 and sum(dropped) > 0
    base_lost = torch.stack([ref_base_ffn(x64[t], ed, "swiglu") for t in lost]).detach()
    torch.testing.assert_close(got[lost], base_lost, **TOL)  # a fully dropped token still gets FFN(x)
    assert base_lost.abs().sum(1).min() > 0


# ------------------------------------------------------------------ fp32 accumulation in combine
def test_bf16_combine_accumulates_in_fp32():
    # crafted: 1 + 4 * 2^-9 in bf16 steps stays 1.0 (each 2^-9 is half an ulp of 1, rounded to even),
    # while the fp32 sum is 1 + 2^-7, which bf16 holds exactly
    y = torch.tensor([[1.0], [2 ** -9], [2 ** -9], [2 ** -9], [2 ** -9]], dtype=torch.bfloat16)
    w = torch.ones(5)
    tok = torch.zeros(5, dtype=torch.long)
    out = weighted_scatter_add(y, w, tok, 1)
    assert out.dtype == torch.float32
    seq = torch.zeros(1, dtype=torch.bfloat16)
    for n in range(5):
        seq = (seq + y[n] * w[n].to(torch.bfloat16)).to(torch.bfloat16)
    assert float(seq) == 1.0 and float(out.to(torch.bfloat16)) == 1.0 + 2 ** -7
    # random rows: equal to the fp64 sum up to the one final bf16 rounding
    g = torch.Generator().manual_seed(0)
    y = torch.randn(40, 16, generator=g).to(torch.bfloat16)
    w = torch.rand(40, generator=g)
    tok = torch.randint(0, 6, (40,), generator=g)
    out = weighted_scatter_add(y, w, tok, 6).to(torch.bfloat16)
    ref = torch.zeros(6, 16, dtype=torch.float64).index_add_(0, tok, y.double() * w.double().unsqueeze(1))
    torch.testing.assert_close(out.double(), ref.to(torch.bfloat16).double(), atol=1e-6, rtol=2 ** -8)


def test_bf16_layer_output_rounded_once():
    """A bf16 layer's output = the fp32-accumulated combine of its bf16 expert rows, cast to bf16 once."""
    router = Router(H, E, 4, init_std=0.7, seed=1)
    experts = GroupedExperts(E, H, F, init_std=0.4, seed=2, dtype=torch.bfloat16)
    layer = MoELayer(router, experts)
    x = _x(8).detach().to(torch.bfloat16)
    y, _ = layer(x)
    r = router(x.reshape(T, H))
    rows = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(4):
            e = int(r.idx_TK[t, k])
            out = experts(x.reshape(T, H)[t:t + 1], [1 if j == e else 0 for j in range(E)])  # bf16 expert row
            rows[t] += float(r.weight_TK[t, k]) * out[0].double()
    torch.testing.assert_close(y.reshape(T, H).double(), rows.to(torch.bfloat16).double(), atol=1e-6, rtol=2 ** -8)


def test_shared_expert_gate_in_fp32():
    sh = SharedExperts(H, F, gated=True, init_std=0.4, seed=3, dtype=torch.bfloat16)
    x = _x(9).detach().reshape(T, H).to(torch.bfloat16)
    y = sh(x)
    assert y.dtype == torch.bfloat16
    gate32 = torch.sigmoid(x.float() @ sh.w_shared_gate.float())
    from moedist.moe.ffn import ffn
    want = (gate32 * ffn(x, sh.w_gate, sh.w_up, sh.w_down, "swiglu")).to(torch.bfloat16)
    assert torch.equal(y, want)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, key", [
    (["moe.expert_bias=true"], "moe.expert_bias="),
    (["moe.router_type=expert_choice"], "moe.router_type="),
    (["moe.router_type=expert_choice", "moe.capacity_factor=1.0"], "moe.aux_loss_type="),
    (["moe.router_type=expert_choice", "moe.capacity_factor=1.0", "moe.aux_loss_type=none",
      "moe.eval_capacity_factor=0"], "moe.eval_capacity_factor="),
    (["moe.second_expert_policy=random", "moe.top_k=1"], "moe.second_expert_policy="),
    (["moe.second_expert_policy=sometimes"], "moe.second_expert_policy="),
    (["moe.router_type=tokens"], "moe.router_type="),
    (["moe.eval_capacity_factor=-1"], "moe.eval_capacity_factor="),
    (["moe.expert_bias_update_rate=-0.1"], "moe.expert_bias_update_rate="),
])
def test_config_refuses_nonsense_in_one_line(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert msg.startswith(key) and "\n" not in msg


def test_config_accepts_the_options():
    cfg = load_config(None, ["moe.router_type=expert_choice", "moe.capacity_factor=1.25", "moe.aux_loss_type=none",
                             "moe.eval_capacity_factor=2.0"])
    assert cfg.moe.router_type == "expert_choice" and cfg.moe.eval_capacity_factor == 2.0
    cfg = load_config(None, ["moe.second_expert_policy=random", "moe.score_func=sigmoid", "moe.expert_bias=true"])
    assert cfg.moe.expert_bias_update_rate == 0.001 and math.isclose(cfg.moe.expert_bias_update_rate, 1e-3)


# ------------------------------------------------------------------ activation checkpointing
def test_recompute_replays_random_second_expert_and_moe_lora_base():
    """Activation checkpointing recomputes the MoE forward: the random second-expert draws are replayed
    from the saved generator state (same routing, same gradients as without recompute)."""
    from tests.test_act_ckpt import _cfg, _run

    cfg = _cfg({"lora": {"mode": "moe_lora"}, "moe": {"second_expert_policy": "random", "capacity_factor": 1.0,
                                                      "top_k": 2}})
    _, ref, ref_grads = _run(cfg, "none")
    _, got, grads = _run(cfg, "moe")
    for (l0, t0, _), (l1, t1, _) in zip(ref, got):
        assert l1 == pytest.approx(l0, rel=1e-6, abs=1e-7)
        assert all(torch.equal(a, b) for a, b in zip(t0, t1))
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
