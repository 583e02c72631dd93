"""MoELayer end to end vs the naive loop reference (tests/moe_reference.py).

Every routing / capacity / expert path: top-1/2/4; dropless and capacity
factors 0.5, 1.0, 1.25 with both drop policies; grouped experts, LoRA on
experts, MoE-LoRA experts through the fused `forward_tokens` path and through
the generic `forward` path; swiglu / gelu; shared experts plain and gated;
sigmoid scoring with expert bias; noisy gating (same noise) and jitter.
Outputs, aux losses, drop counts and the gradients of the input, router,
expert weights, LoRA factors and shared expert are compared in fp32 against
the fp64 reference to 1e-5. Plus float64 gradcheck, the dense-FFN equivalence
of a LoRA-MoE layer at initialisation, argument errors and buffer sizes.
"""
import itertools

import pytest
import torch
import torch.nn as nn
from torch.autograd import gradcheck

from moedist.distributed.comm import ExpertParallelComm
from moedist.moe import (GroupedExperts, LoRAOnExperts, MoELayer, MoELoRAExperts, Router, SharedExperts,
                         TokenDispatcher)
from moedist.moe.dispatcher import permute_pairs
from tests.moe_reference import (Leaves, experts_dict, ref_base_ffn, ref_dense_ffn, ref_importance_loss, ref_load_loss,
                                 ref_moe, ref_switch_loss, ref_z_loss, router_dict, shared_dict)

TOL = dict(atol=1e-5, rtol=1e-5)
E, H, F, R = 8, 6, 8, 3
B, S = 2, 6  # T = 12 tokens
AUX_COEF, Z_COEF = 0.1, 0.01
KINDS = ("grouped", "lora_on_experts", "moelora_fused", "moelora_generic")


class NoFused(nn.Module):
    """Hides `forward_tokens` so MoELayer takes the generic dispatch/forward/combine path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.num_local = inner.num_local

    def forward(self, x_NH, counts_L):
        return self.inner(x_NH, counts_L)

    def base_forward(self, x_TH):  # the frozen FFN under MoE-LoRA experts (applies to dropped pairs too)
        return self.inner.base_forward(x_TH)


class Recorder(nn.Module):
    """Passes through and records the rows and counts the experts were given."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.num_local, self.seen = inner, inner.num_local, []

    def forward(self, x_NH, counts_L):
        self.seen.append((tuple(x_NH.shape), list(counts_L)))
        return self.inner(x_NH, counts_L)


def _randomise_lora_B(module, seed=1, std=0.4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for st in module.lora.values():
            st.lora_B.copy_(torch.randn(st.lora_B.shape, generator=g) * std)


def make_experts(kind, activation, seed=2):
    """Returns (module for the layer, inner module, reference kind)."""
    if kind == "grouped":
        m = GroupedExperts(E, H, F, activation=activation, init_std=0.4, seed=seed)
        return m, m, "grouped"
    if kind == "lora_on_experts":
        m = LoRAOnExperts(E, H, F, R, lora_alpha=6.0, activation=activation, freeze_base=False, init_std=0.4, seed=seed)
        _randomise_lora_B(m, seed)
        return m, m, "lora_on_experts"
    m = MoELoRAExperts(E, H, F, R, lora_alpha=2.0, activation=activation, init_std=0.4, seed=seed)
    _randomise_lora_B(m, seed)
    for p in (m.w_gate, m.w_up, m.w_down):  # check the frozen base's gradients as well
        if p is not None:
            p.requires_grad_(True)
    return (m if kind == "moelora_fused" else NoFused(m)), m, "moelora"


def make_layer(kind="grouped", K=2, activation="swiglu", shared=None, cf=None, policy="position", score_func="softmax",
               renormalize=True, expert_bias=False, noisy=False, jitter=0.0, aux_type="switch", min_capacity=0):
    router = Router(H, E, K, score_func=score_func, renormalize=renormalize, noisy_gating=noisy, jitter_eps=jitter,
                    expert_bias=expert_bias, init_std=0.7, seed=1)
    with torch.no_grad():
        if expert_bias:
            router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E).flip(0))
        if noisy:
            router.noise_weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(4)) * 0.5)
    experts, inner, ref_kind = make_experts(kind, activation)
    sh = None if shared is None else SharedExperts(H, F, activation=activation, gated=(shared == "gated"), init_std=0.4, seed=3)
    layer = MoELayer(router, experts, sh, capacity_factor=cf, min_capacity=min_capacity, drop_policy=policy,
                     aux_loss_type=aux_type, aux_loss_coef=AUX_COEF, z_loss_coef=Z_COEF)
    return layer, inner, ref_kind


def _x(seed=0):
    return torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def run_and_compare(layer, inner, ref_kind, x, cfg, noise_draws=None):
    """Forward + backward of the layer and of the reference; compare everything."""
    router = layer.router
    T = B * S
    jitter_u = noise_eps = None
    if noise_draws:
        g = torch.Generator()
        g.set_state(router._noise_gen.get_state())
        if router.jitter_eps > 0:
            jitter_u = torch.rand(T, H, generator=g)
        if router.noisy_gating:
            noise_eps = torch.randn(T, E, generator=g)
    y, aux = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(17))
    ((y * gy).sum() + aux.loss).backward()

    leaves = Leaves()
    x64 = x.detach().double().reshape(T, H).requires_grad_(True)
    act = cfg.get("activation", "swiglu")
    y_ref, info = ref_moe(
        x64, router_dict(router, leaves), experts_dict(inner, ref_kind, leaves), router.top_k, act,
        shared=shared_dict(layer.shared_experts, leaves), score_func=router.score_func,
        renormalize=router.renormalize, capacity_factor=cfg.get("cf"), min_capacity=cfg.get("min_capacity", 0),
        drop_policy=cfg.get("policy", "position"), jitter_eps=router.jitter_eps, jitter_u=jitter_u, noise_eps=noise_eps)
    r = info["route"]
    aux_type = cfg.get("aux_type", "switch")
    if aux_type == "switch":
        aux_ref = ref_switch_loss(r["idx"], r["probs"], E)
    elif aux_type == "importance":
        aux_ref = ref_importance_loss(r["idx"], r["w"], E)
        if noise_eps is not None:
            aux_ref = aux_ref + ref_load_loss(r["clean"], r["logits"], r["noise_std"], router.top_k)
    else:
        aux_ref = torch.zeros((), dtype=torch.float64)
    z_ref = ref_z_loss(r["logits"])
    ((y_ref.reshape(B, S, H) * gy.double()).sum() + AUX_COEF * aux_ref + Z_COEF * z_ref).backward()

    # outputs and diagnostics
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.detach().double(), y_ref.detach().reshape(B, S, H), **TOL)
    assert y.abs().max() > 0.05  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(aux.aux_loss.double(), torch.as_tensor(aux_ref).detach(), **TOL)
    torch.testing.assert_close(aux.z_loss.double(), z_ref.detach(), **TOL)
    torch.testing.assert_close(aux.loss.detach().double(), (AUX_COEF * aux_ref + Z_COEF * z_ref).detach(), **TOL)
    assert aux.capacity == info["capacity"]
    assert aux.dropped_per_expert.tolist() == info["dropped"]
    assert aux.tokens_per_expert.tolist() == info["kept"]
    assert aux.dropped_frac == pytest.approx(sum(info["dropped"]) / (T * router.top_k))
    # gradients: input and every trainable parameter the reference used
    torch.testing.assert_close(x.grad.double().reshape(T, H), x64.grad, **TOL)
    for p, leaf in leaves.pairs():
        if leaf.grad is None:  # unused by the reference (the noise weight in eval mode)
            assert p.grad is None or not p.grad.any()
            continue
        assert p.grad is not None
        torch.testing.assert_close(p.grad.double(), leaf.grad, **TOL)
    n_trainable = sum(1 for p in layer.parameters() if p.requires_grad)
    assert len(leaves.pairs()) == n_trainable  # every parameter of the layer was compared
    return y, aux, info


# ------------------------------------------------------------------ the main matrix
ROUTING = [(K, cf, pol) for K in (1, 2, 4)
           for cf, pol in [(None, "position"), (0.5, "position"), (0.5, "probs"), (1.0, "position"),
                           (1.0, "probs"), (1.25, "position"), (1.25, "probs")]]
MATRIX = []
for kind in KINDS:
    for i, (K, cf, pol) in enumerate(ROUTING):
        MATRIX.append(dict(kind=kind, K=K, cf=cf, policy=pol, activation=("swiglu", "gelu")[i % 2],
                           shared=(None, "plain", "gated")[i % 3], renormalize=not (K == 1 and i % 2)))


@pytest.mark.parametrize("cfg", MATRIX, ids=lambda c: "{kind}-k{K}-cf{cf}-{policy}-{activation}-{shared}-rn{renormalize:d}".format(**c))
def test_layer_matches_reference(cfg):
    layer, inner, ref_kind = make_layer(**cfg)
    _, aux, info = run_and_compare(layer, inner, ref_kind, _x(cfg["K"]), cfg)
    if cfg["cf"] in (0.5, 1.0):
        assert sum(info["dropped"]) > 0  # the dropping path really ran
    if cfg["cf"] is None:
        assert sum(info["dropped"]) == 0 and aux.capacity is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [1, 2, 4])
def test_layer_sigmoid_with_expert_bias(kind, K):
    cfg = dict(kind=kind, K=K, score_func="sigmoid", expert_bias=True, cf=1.0, policy="probs",
               shared="gated" if K == 2 else None, activation="gelu" if K == 4 else "swiglu")
    layer, inner, ref_kind = make_layer(**cfg)
    run_and_compare(layer, inner, ref_kind, _x(10 + K), cfg)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K, aux_type", [(1, "importance"), (2, "importance"), (4, "switch")])
def test_layer_noisy_gating_same_noise(kind, K, aux_type):
    cfg = dict(kind=kind, K=K, noisy=True, jitter=0.1 if K == 2 else 0.0, cf=1.25, policy="position",
               aux_type=aux_type, shared="plain")
    layer, inner, ref_kind = make_layer(**cfg)
    layer.train()
    run_and_compare(layer, inner, ref_kind, _x(20 + K), cfg, noise_draws=True)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_noisy_gating_eval_is_deterministic(kind):
    cfg = dict(kind=kind, K=2, noisy=True, jitter=0.2, cf=1.0, aux_type="importance")
    layer, inner, ref_kind = make_layer(**cfg)
    layer.eval()
    y1, _ = layer(_x(30))
    run_and_compare(layer, inner, ref_kind, _x(30), cfg)  # no noise, no jitter in eval
    y2, _ = layer(_x(30))
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [1, 2])
def test_layer_jitter_same_uniforms(kind, K):
    cfg = dict(kind=kind, K=K, jitter=0.3, cf=0.5, policy="probs", shared="gated")
    layer, inner, ref_kind = make_layer(**cfg)
    layer.train()
    run_and_compare(layer, inner, ref_kind, _x(40 + K), cfg, noise_draws=True)


@pytest.mark.parametrize("aux_type", ["importance", "none"])
def test_layer_other_aux_types_and_min_capacity(aux_type):
    cfg = dict(kind="grouped", K=2, cf=0.25, min_capacity=3, policy="position", aux_type=aux_type)
    layer, inner, ref_kind = make_layer(**cfg)
    _, aux, info = run_and_compare(layer, inner, ref_kind, _x(50), cfg)
    assert aux.capacity == 3  # ceil(0.25 * 12 * 2 / 8) = 1 < min_capacity


def test_capacity_factor_zero_means_dropless():
    y_none, aux_none = make_layer(cf=None, K=4)[0](_x(1))
    y_zero, aux_zero = make_layer(cf=0, K=4)[0](_x(1))
    assert torch.equal(y_none, y_zero)
    assert aux_zero.capacity is None and int(aux_zero.dropped_per_expert.sum()) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_fully_dropped_token_gets_zero_or_the_frozen_ffn(kind):
    # capacity 1 per expert: with 12 tokens and 8 experts most tokens lose every slot
    layer, _, _ = make_layer(kind=kind, K=2, cf=0.01, policy="position", activation="gelu")
    x = _x(60)
    y, aux = layer(x)
    assert aux.capacity == 1
    sel_keep = torch.zeros(B * S, 2, dtype=torch.bool)
    r = layer.router(x.detach().reshape(-1, H))
    from moedist.moe.capacity import select_tokens
    sel_keep = select_tokens(r.idx_TK, r.weight_TK, E, 1, "position").keep_TK
    gone = ~sel_keep.any(1)
    assert gone.sum() >= 4
    y_TH = y.detach().reshape(-1, H)
    if kind.startswith("moelora"):  # MoE-LoRA: the frozen FFN still applies, only the adapters were dropped
        leaves = Leaves()
        ed = experts_dict(_inner(layer.experts), "moelora", leaves)
        x_TH = x.detach().double().reshape(-1, H)
        base = torch.stack([ref_base_ffn(x_TH[t], ed, "gelu") for t in range(B * S)]).detach()
        torch.testing.assert_close(y_TH[gone].double(), base[gone], **TOL)
        assert base[gone].abs().sum(1).min() > 0
    else:
        assert not y_TH[gone].any()  # exactly zero without shared experts
    assert y_TH[~gone].abs().sum(1).min() > 0


def _inner(experts):
    return experts.inner if isinstance(experts, NoFused) else experts


# ------------------------------------------------------------------ float64 gradcheck
def _gradcheck_layer(layer, seed=0):
    layer = layer.double()
    names, params = zip(*[(n, p) for n, p in layer.named_parameters() if p.requires_grad])
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        y, aux = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return y, aux.loss

    inputs = (x,) + tuple(p.detach().clone().requires_grad_(True) for p in params)
    y, aux = layer(x)
    assert y.dtype == torch.float64 and aux.loss.dtype == torch.float64
    assert aux.loss.requires_grad
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    return aux


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gradcheck_grouped_with_dropping(activation):
    layer, _, _ = make_layer(kind="grouped", K=2, cf=0.5, policy="position", activation=activation, shared="gated")
    aux = _gradcheck_layer(layer)
    assert int(aux.dropped_per_expert.sum()) > 0


@pytest.mark.parametrize("kind", ["moelora_fused", "moelora_generic", "lora_on_experts"])
def test_gradcheck_lora_experts_with_dropping(kind):
    layer, _, _ = make_layer(kind=kind, K=2, cf=0.5, policy="probs", score_func="sigmoid", expert_bias=True)
    aux = _gradcheck_layer(layer, seed=1)
    assert int(aux.dropped_per_expert.sum()) > 0


# ------------------------------------------------------------------ dense FFN equivalence at init
def _dense_weights(activation, seed=5):
    g = torch.Generator().manual_seed(seed)
    wg = torch.randn(H, F, generator=g) * 0.4 if activation == "swiglu" else None
    return wg, torch.randn(H, F, generator=g) * 0.4, torch.randn(F, H, generator=g) * 0.4


def _dense_fp32(x_TH, wg, wu, wd, activation):
    if activation == "swiglu":
        return (torch.nn.functional.silu(x_TH @ wg) * (x_TH @ wu)) @ wd
    return torch.nn.functional.gelu(x_TH @ wu) @ wd


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("path", ["fused", "generic", "lora_on_experts"])
def test_lora_moe_from_dense_ffn_equals_dense_at_init(activation, K, path):
    wg, wu, wd = _dense_weights(activation)
    if path == "lora_on_experts":
        experts = LoRAOnExperts(E, H, F, R, activation=activation, seed=9)
        for e in range(E):
            experts.load_expert(e, wg, wu, wd)
    else:
        experts = MoELoRAExperts(E, H, F, R, activation=activation, seed=9)
        experts.load_base(wg, wu, wd)
        if path == "generic":
            experts = NoFused(experts)
    layer = MoELayer(Router(H, E, K, init_std=0.7, seed=2), experts)
    x = _x(70).detach()
    y, aux = layer(x)
    x_TH = x.reshape(-1, H)
    dense = _dense_fp32(x_TH, wg, wu, wd, activation).reshape(B, S, H)
    y_ref = ref_dense_ffn(x_TH.double(), *(w.double() if w is not None else None for w in (wg, wu, wd)), activation)
    torch.testing.assert_close(y.double(), y_ref.reshape(B, S, H), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, dense, atol=1e-6, rtol=1e-6)
    if K == 1 and path == "fused":
        assert torch.equal(y, dense)  # weight exactly 1, B exactly 0: bit-identical
    assert int(aux.dropped_per_expert.sum()) == 0


# ------------------------------------------------------------------ no [E, C, H] buffers
@pytest.mark.parametrize("cf", [None, 0.5, 1.25, 4.0])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_dispatch_buffers_hold_exactly_the_kept_pairs(cf, K):
    layer, inner, _ = make_layer(kind="grouped", K=K, cf=cf)
    rec = Recorder(inner)
    layer.experts = rec
    x = _x(80)
    y, aux = layer(x)
    N = int(aux.tokens_per_expert.sum())
    assert N == B * S * K - int(aux.dropped_per_expert.sum())
    assert rec.seen == [((N, H), aux.tokens_per_expert.tolist())]
    # the dispatcher itself
    r = layer.router(x.detach().reshape(-1, H))
    # each expert keeps min(demand, C) pairs: exactly the routed rows, never a padded [E, C, H] buffer
    demand_E = torch.bincount(r.idx_TK.reshape(-1), minlength=E)
    kept_E = demand_E if cf is None else demand_E.clamp(max=aux.capacity)
    assert aux.tokens_per_expert.tolist() == kept_E.tolist()
    from moedist.moe.capacity import compute_capacity, select_tokens
    keep = select_tokens(r.idx_TK, r.weight_TK, E, compute_capacity(B * S, E, K, cf), "position").keep_TK
    x_NH, counts, state = layer.dispatcher.dispatch(x.detach().reshape(-1, H), r.idx_TK, keep)
    assert x_NH.shape == (int(keep.sum()), H) and sum(counts) == int(keep.sum())
    perm = permute_pairs(r.idx_TK, keep, E)
    assert perm.pair_N.numel() == perm.token_N.numel() == int(keep.sum())
    # rows are grouped by expert, in expert order
    experts_of_rows = r.idx_TK.reshape(-1)[perm.pair_N]
    assert torch.equal(experts_of_rows, experts_of_rows.sort(stable=True).values)
    assert torch.equal(x_NH, x.detach().reshape(-1, H)[perm.token_N])


# ------------------------------------------------------------------ bad arguments
def _fake_comm(size):
    comm = ExpertParallelComm.single()
    comm.size, comm.rank = size, 0
    return comm


def test_bad_sizes_raise_one_clear_value_error():
    with pytest.raises(ValueError, match="num_experts=6.*expert-parallel size 4"):
        TokenDispatcher(6, _fake_comm(4))
    with pytest.raises(ValueError, match="top_k"):
        Router(H, E, E + 1)
    with pytest.raises(ValueError, match="top_k"):
        Router(H, E, 0)
    with pytest.raises(ValueError, match="score_func"):
        Router(H, E, 2, score_func="tanh")
    with pytest.raises(ValueError, match="activation"):
        GroupedExperts(E, H, F, activation="swish")
    with pytest.raises(ValueError, match="activation"):
        SharedExperts(H, F, activation="gelu_tanh")
    router, experts = Router(H, E, 2), GroupedExperts(E, H, F)
    for cf in (-0.5, -1, float("nan")):
        with pytest.raises(ValueError, match="capacity_factor"):
            MoELayer(router, experts, capacity_factor=cf)
    with pytest.raises(ValueError, match="min_capacity"):
        MoELayer(router, experts, capacity_factor=1.0, min_capacity=-1)
    with pytest.raises(ValueError, match="drop_policy"):
        MoELayer(router, experts, drop_policy="random")
    with pytest.raises(ValueError, match="aux_loss_type"):
        MoELayer(router, experts, aux_loss_type="gshard")
    with pytest.raises(ValueError, match="num_experts"):
        MoELayer(router, experts, dispatcher=TokenDispatcher(4))
    with pytest.raises(ValueError, match="local experts"):
        MoELayer(router, GroupedExperts(E, H, F, num_local=4))
    # 0 is dropless by design, not an error
    assert MoELayer(router, experts, capacity_factor=0).capacity_factor is None


# ------------------------------------------------------------------ EP = 2 through real all-to-all
def _ep_worker(rank, world_size, cf, kinds):
    return {kind: _ep_run(rank, world_size, cf, kind) for kind in kinds}


def _ep_run(rank, world_size, cf, kind):
    import torch.distributed as dist

    comm = ExpertParallelComm(dist.group.WORLD)
    L = E // world_size
    router = Router(H, E, 2, init_std=0.7, seed=1)
    if kind == "grouped":
        experts = GroupedExperts(E, H, F, num_local=L, first_expert=rank * L, init_std=0.4, seed=2)
    else:
        experts = MoELoRAExperts(E, H, F, R, lora_alpha=2.0, num_local=L, first_expert=rank * L, init_std=0.4, seed=2)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for st in experts.lora.values():  # same B as the full module would get, sliced
                full = torch.randn((E,) + tuple(st.lora_B.shape[1:]), generator=g) * 0.4
                st.lora_B.copy_(full[rank * L:(rank + 1) * L])
    layer = MoELayer(router, experts, dispatcher=TokenDispatcher(E, comm), capacity_factor=cf,
                     aux_loss_coef=AUX_COEF, z_loss_coef=Z_COEF)
    x = _x(90 + rank)
    y, aux = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(17))
    ((y * gy).sum() + aux.loss).backward()
    return dict(y=y.detach(), x_grad=x.grad, dropped=aux.dropped_per_expert.tolist(),
                grads={n: p.grad for n, p in layer.named_parameters() if p.requires_grad})


def test_expert_parallel_two_ranks_matches_reference():
    """The EP path (counts exchange, uneven all-to-all, local sort, combine) in 2 gloo
    processes; each rank's outputs and gradients against the reference on its own tokens."""
    from tests._dist import run_workers

    kinds = ("grouped", "moelora")
    per_rank = run_workers(_ep_worker, 2, args=(0.5, kinds))
    for kind in kinds:
        _check_ep(kind, [res[kind] for res in per_rank])


def _check_ep(kind, results):
    layer, inner, ref_kind = make_layer(kind="grouped" if kind == "grouped" else "moelora_generic", K=2, cf=0.5,
                                        activation="swiglu")
    if kind == "moelora":
        for p in (inner.w_gate, inner.w_up, inner.w_down):
            p.requires_grad_(False)
    leaves = Leaves()
    rd, ed = router_dict(layer.router, leaves), experts_dict(inner, ref_kind, leaves)
    gy = torch.randn(B, S, H, generator=torch.Generator().manual_seed(17))
    L = E // 2
    for rank, res in enumerate(results):
        x64 = _x(90 + rank).detach().double().reshape(-1, H).requires_grad_(True)
        y_ref, info = ref_moe(x64, rd, ed, 2, "swiglu", capacity_factor=0.5)
        r = info["route"]
        loss = (y_ref.reshape(B, S, H) * gy.double()).sum() + AUX_COEF * ref_switch_loss(r["idx"], r["probs"], E) \
            + Z_COEF * ref_z_loss(r["logits"])
        loss.backward()
        torch.testing.assert_close(res["y"].double(), y_ref.detach().reshape(B, S, H), **TOL)
        torch.testing.assert_close(res["x_grad"].double().reshape(-1, H), x64.grad, **TOL)
        assert res["dropped"] == info["dropped"] and sum(info["dropped"]) > 0
    # expert grads: rank r holds experts [r L, (r+1) L) and got gradients from both ranks' tokens
    by_name = {n: p for n, p in inner.named_parameters()}
    for rank, res in enumerate(results):
        for name, g in res["grads"].items():
            if name.startswith("router."):
                continue  # router grads are per rank (replicated, averaged by DP elsewhere)
            leaf = leaves(by_name[name.removeprefix("experts.")])
            torch.testing.assert_close(g.double(), leaf.grad[rank * L:(rank + 1) * L], **TOL)
    # router grads: sum over ranks = reference over both batches
    torch.testing.assert_close(sum(res["grads"]["router.weight"] for res in results).double(),
                               leaves(layer.router.weight).grad, **TOL)


def test_combine_backward_has_no_pair_sized_product():
    """The combine's weight gradient <g[token[n]], y[n]> is taken a chunk of rows at a time
    (`slices.row_dot`): its backward allocates the gathered [N, H] gradient (scaled in place into
    dy), dw [N] and one [1024, H] product, not a second [N, H] (it was the layer's backward peak)."""
    from moedist.bench.memory import backward_peak_bytes
    from moedist.moe.dispatcher import weighted_scatter_add

    g = torch.Generator().manual_seed(3)
    N, Hm, T_ = 4096, 64, 2048
    y = torch.randn(N, Hm, generator=g, requires_grad=True)
    w = torch.rand(N, generator=g).requires_grad_()
    tok = torch.randint(0, T_, (N,), generator=g)
    out = weighted_scatter_add(y, w, tok, T_)
    grad = torch.randn(T_, Hm, generator=g)
    peak = backward_peak_bytes(out, grad)
    expected = 4 * (N * Hm + N + 1024 * Hm)
    assert expected - 1024 <= peak <= expected + 1024, (peak, expected)
    torch.testing.assert_close(w.grad, (grad[tok] * y.detach()).sum(1))
    torch.testing.assert_close(y.grad, grad[tok] * w.detach().unsqueeze(1))


def _graph_nodes(t: torch.Tensor) -> set:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("cf", [None, 1.0])
def test_grouped_experts_take_the_token_path_at_ep_size_1(cf):
    """At EP size 1 in fp32, GroupedExperts run the FFN fused with the gather and the combine
    (`GroupedGatedFFNTokens`, no [N, H] rows): the output is bitwise the generic dispatch / forward /
    combine path's and every gradient (tokens, router, experts) matches it to rounding. In bf16 the
    layer keeps the device-count path (no host sync) and never calls forward_tokens (widths of 16
    bytes and more, which that kernel needs)."""
    T_, Hm, Fm = 40, 16, 24
    x = torch.randn(T_, Hm, generator=torch.Generator().manual_seed(1))

    def run(wrap, dtype=torch.float32):
        experts = GroupedExperts(E, Hm, Fm, seed=3, dtype=dtype)
        layer = MoELayer(Router(Hm, E, 2, init_std=0.5, seed=2), wrap(experts), capacity_factor=cf)
        xi = x.to(dtype).requires_grad_()
        y, _ = layer(xi)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), _graph_nodes(y), [xi.grad, layer.router.weight.grad, experts.w_gate.grad,
                                             experts.w_up.grad, experts.w_down.grad]

    y, nodes, grads = run(lambda e: e)
    y_ref, nodes_ref, grads_ref = run(Recorder)  # forward only: the generic path
    assert "GroupedGatedFFNTokensBackward" in nodes and "GroupedGatedFFNTokensBackward" not in nodes_ref
    assert torch.equal(y, y_ref)
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    _, nodes_bf16, _ = run(lambda e: e, torch.bfloat16)
    assert "GroupedGatedFFNTokensBackward" not in nodes_bf16
