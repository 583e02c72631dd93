"""Router vs the naive reference: softmax / sigmoid(+bias) top-k, renormalisation,
noisy gating (same noise), jitter; outputs and gradients (fp32 vs fp64 loops, 1e-5)."""
import pytest
import torch

from moedist.moe import Router
from moedist.moe.router import softmax_topk, update_bias
from tests.moe_reference import Leaves, ref_route, router_dict

TOL = dict(atol=1e-5, rtol=1e-5)
T, H, E = 10, 6, 8


def _x(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g).to(dtype).requires_grad_(True)


def _router(K, **kw):
    r = Router(H, E, K, init_std=0.7, seed=11, **kw)
    if r.noise_weight is not None:
        with torch.no_grad():  # zero at init; make the noise scale depend on x
            r.noise_weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(5)) * 0.5)
    return r


def _draws(router, x, jitter: bool, noise: bool):
    """Replay the router's own generator: jitter uniforms first, then the gating noise."""
    g = torch.Generator()
    g.set_state(router._noise_gen.get_state())
    u = torch.rand(x.shape, generator=g) if jitter else None
    eps = torch.randn(T, E, generator=g) if noise else None
    return u, eps


def _compare(router, x, out, ref, leaves, x64, K):
    assert out.idx_TK.tolist() == ref["idx"]
    ref_w = torch.stack([torch.stack(row) for row in ref["w"]])  # [T, K]
    ref_p = torch.stack([torch.stack(row) for row in ref["probs"]])  # [T, E]
    ref_l = torch.stack([torch.stack(row) for row in ref["logits"]])  # [T, E]
    torch.testing.assert_close(out.weight_TK.double(), ref_w.detach(), **TOL)
    torch.testing.assert_close(out.probs_TE.double(), ref_p.detach(), **TOL)
    torch.testing.assert_close(out.logits_TE.double(), ref_l.detach(), **TOL)
    assert out.weight_TK.dtype == torch.float32 and out.probs_TE.dtype == torch.float32
    # gradients through the combine weights and the probabilities
    g = torch.Generator().manual_seed(99)
    cw, cp = torch.randn(T, K, generator=g), torch.randn(T, E, generator=g)
    (out.weight_TK * cw).sum().add((out.probs_TE * cp).sum()).backward()
    ((ref_w * cw.double()).sum() + (ref_p * cp.double()).sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL)
    for p, leaf in leaves.pairs():
        if leaf.grad is None:  # unused by the reference (noise weight in eval)
            assert p.grad is None or not p.grad.any()
            continue
        assert p.grad is not None
        torch.testing.assert_close(p.grad.double(), leaf.grad, **TOL)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_matches_reference(K, score_func, renormalize):
    router = _router(K, score_func=score_func, renormalize=renormalize)
    x = _x(K)
    out = router(x)
    leaves = Leaves()
    x64 = x.detach().double().requires_grad_(True)
    ref = ref_route(x64, router_dict(router, leaves), K, score_func, renormalize)
    _compare(router, x, out, ref, leaves, x64, K)
    if renormalize:
        torch.testing.assert_close(out.weight_TK.sum(-1), torch.ones(T))
    assert out.noise is None


@pytest.mark.parametrize("K", [1, 2, 4])
def test_sigmoid_expert_bias_changes_choice_not_weights(K):
    router = _router(K, score_func="sigmoid", expert_bias=True)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-0.4, 0.4, E))
    x = _x(3)
    out = router(x)
    leaves = Leaves()
    x64 = x.detach().double().requires_grad_(True)
    ref = ref_route(x64, router_dict(router, leaves), K, "sigmoid", True)
    # the bias must actually change some choice for this test to mean anything
    s = torch.sigmoid(out.logits_TE.detach())
    assert not torch.equal(s.topk(K, -1).indices.sort(-1).values, out.idx_TK.sort(-1).values)
    _compare(router, x, out, ref, leaves, x64, K)
    # combine weights come from the unbiased scores
    torch.testing.assert_close(out.weight_TK.detach(), (s.gather(1, out.idx_TK) / s.gather(1, out.idx_TK).sum(-1, keepdim=True)))


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_noisy_gating_same_noise(K, jitter):
    router = _router(K, noisy_gating=True, jitter_eps=jitter).train()
    x = _x(4)
    u, eps = _draws(router, x, jitter > 0, True)
    out = router(x)
    assert out.noise is not None
    leaves = Leaves()
    x64 = x.detach().double().requires_grad_(True)
    ref = ref_route(x64, router_dict(router, leaves), K, "softmax", True, jitter_eps=jitter, jitter_u=u, noise_eps=eps)
    clean, noisy, std = out.noise
    ref_clean = torch.stack([torch.stack(r) for r in ref["clean"]])
    ref_std = torch.stack([torch.stack(r) for r in ref["noise_std"]])
    torch.testing.assert_close(clean.detach().double(), ref_clean.detach(), **TOL)
    torch.testing.assert_close(std.detach().double(), ref_std.detach(), **TOL)
    assert not torch.allclose(noisy, clean)
    _compare(router, x, out, ref, leaves, x64, K)
    assert router.noise_weight.grad is not None and router.noise_weight.grad.abs().sum() > 0


def test_noisy_gating_off_in_eval():
    router = _router(2, noisy_gating=True, jitter_eps=0.3).eval()
    x = _x(5)
    state = router._noise_gen.get_state()
    out = router(x)
    assert out.noise is None
    assert torch.equal(router._noise_gen.get_state(), state)  # no draws in eval
    leaves = Leaves()
    x64 = x.detach().double().requires_grad_(True)
    ref = ref_route(x64, router_dict(router, leaves), 2, "softmax", True)
    _compare(router, x, out, ref, leaves, x64, 2)


@pytest.mark.parametrize("K", [1, 2])
def test_jitter_same_uniforms(K):
    router = _router(K, jitter_eps=0.25).train()
    x = _x(6)
    u, _ = _draws(router, x, True, False)
    out = router(x)
    leaves = Leaves()
    x64 = x.detach().double().requires_grad_(True)
    ref = ref_route(x64, router_dict(router, leaves), K, "softmax", True, jitter_eps=0.25, jitter_u=u)
    _compare(router, x, out, ref, leaves, x64, K)
    # jitter really changed the logits
    with torch.no_grad():
        assert not torch.allclose(out.logits_TE, x.detach() @ router.weight.t())


def test_router_upcasts_half_input_and_keeps_float64():
    router = _router(2)
    x = _x(7)
    out_bf = router(x.detach().bfloat16())
    assert out_bf.weight_TK.dtype == torch.float32 and out_bf.logits_TE.dtype == torch.float32
    r64 = _router(2).double()
    out64 = r64(x.detach().double())
    assert out64.weight_TK.dtype == torch.float64 and out64.probs_TE.dtype == torch.float64
    ref = ref_route(x.detach().double(), {"weight": r64.weight.detach()}, 2)
    torch.testing.assert_close(out64.weight_TK, torch.stack([torch.stack(r) for r in ref["w"]]), atol=1e-12, rtol=1e-12)


def test_softmax_topk_hand_values():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    idx, w, p = softmax_topk(logits, 2, renormalize=True)
    assert idx.tolist() == [[3, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]))
    torch.testing.assert_close(p, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    _, w2, _ = softmax_topk(logits, 2, renormalize=False)
    torch.testing.assert_close(w2, torch.tensor([[0.4, 0.3]]))


def test_update_expert_bias_rule():
    router = _router(2, score_func="sigmoid", expert_bias=True)
    load = torch.tensor([5, 1, 3, 3, 0, 4, 2, 6])  # mean 3
    router.update_expert_bias(load, rate=0.1)
    expect = [0.1 * (1 if l < 3 else -1 if l > 3 else 0) for l in load.tolist()]
    torch.testing.assert_close(router.expert_bias, torch.tensor(expect))
    torch.testing.assert_close(update_bias(torch.zeros(2), torch.tensor([1, 3]), 0.5), torch.tensor([0.5, -0.5]))
    with pytest.raises(ValueError, match="expert_bias"):
        _router(2).update_expert_bias(load)


@pytest.mark.parametrize("kw, name", [
    (dict(top_k=0), "top_k"), (dict(top_k=-1), "top_k"), (dict(top_k=E + 1), "top_k"),
    (dict(score_func="relu"), "score_func"), (dict(jitter_eps=1.5), "jitter_eps"),
    (dict(jitter_eps=-0.1), "jitter_eps"), (dict(num_experts=0), "num_experts"),
])
def test_router_bad_arguments(kw, name):
    args = dict(hidden_size=H, num_experts=E, top_k=2)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        Router(**args)


def test_top1_with_renormalize_warns_router_gets_no_task_gradient():
    import warnings as _w
    from moedist.moe import Router as _R
    with pytest.warns(UserWarning, match="renormalize"):
        _R(8, 4, 1, renormalize=True)
    with _w.catch_warnings():
        _w.simplefilter("error")
        _R(8, 4, 1, renormalize=False)
        _R(8, 4, 2, renormalize=True)
