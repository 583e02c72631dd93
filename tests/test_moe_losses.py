"""Auxiliary losses against hand computations on tiny hand-made inputs, known
values, and the naive loop reference (values and gradients)."""
import math

import pytest
import torch

from moedist.moe.losses import (importance_loss, load_loss, router_entropy, router_z_loss,
                                switch_load_balancing_loss)
from moedist.moe.router import softmax_topk
from tests.moe_reference import (ref_importance_loss, ref_load_loss, ref_switch_loss, ref_z_loss)

TOL = dict(atol=1e-6, rtol=1e-6)


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ------------------------------------------------------------------ Switch
def test_switch_loss_hand_top1():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]], requires_grad=True)
    idx = torch.tensor([[0], [0], [1], [0]])
    # f = [3/4, 1/4]; P = [(0.7+0.6+0.2+0.9)/4, (0.3+0.4+0.8+0.1)/4] = [0.6, 0.4]
    # loss = E * (f0 P0 + f1 P1) = 2 * (0.45 + 0.1) = 1.1
    loss = switch_load_balancing_loss(probs, idx, 2)
    torch.testing.assert_close(loss, torch.tensor(1.1), **TOL)
    loss.backward()
    # d loss / d probs[t, e] = E * f_e / T (f has no gradient)
    torch.testing.assert_close(probs.grad, torch.tensor([[2 * 0.75 / 4, 2 * 0.25 / 4]] * 4), **TOL)


def test_switch_loss_hand_top2():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    idx = torch.tensor([[0, 1], [1, 2]])
    # counts = [1, 2, 1] over T*K = 4 -> f = [0.25, 0.5, 0.25]; P = [0.3, 0.45, 0.25]
    expect = 3 * (0.25 * 0.3 + 0.5 * 0.45 + 0.25 * 0.25)
    torch.testing.assert_close(switch_load_balancing_loss(probs, idx, 3), torch.tensor(expect), **TOL)


@pytest.mark.parametrize("E, K", [(4, 1), (4, 2), (8, 4)])
def test_switch_loss_known_values(E, K):
    T = 2 * E
    uniform = torch.full((T, E), 1.0 / E)
    idx = torch.stack([(torch.arange(K) + t) % E for t in range(T)])  # every expert gets T*K/E pairs
    torch.testing.assert_close(switch_load_balancing_loss(uniform, idx, E), torch.tensor(1.0), **TOL)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1.0
    idx0 = torch.zeros(T, 1, dtype=torch.long)
    torch.testing.assert_close(switch_load_balancing_loss(collapsed, idx0, E), torch.tensor(float(E)), **TOL)
    assert float(switch_load_balancing_loss(torch.zeros(0, E), torch.zeros(0, K, dtype=torch.long), E)) == 0.0


@pytest.mark.parametrize("K", [1, 2, 3])
def test_switch_loss_matches_reference(K):
    g = torch.Generator().manual_seed(K)
    logits = (torch.randn(9, 5, generator=g) * 2).requires_grad_(True)
    idx, _, probs = softmax_topk(logits, K)
    loss = switch_load_balancing_loss(probs, idx, 5)
    l64 = logits.detach().double().requires_grad_(True)
    p64 = torch.softmax(l64, -1)
    ref = ref_switch_loss(idx.tolist(), [[p64[t, e] for e in range(5)] for t in range(9)], 5)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-6, rtol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad.double(), l64.grad, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ Shazeer importance + load
def test_importance_loss_hand():
    gates = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.3, 0.7]], requires_grad=True)
    # importance = [1.5, 0.8, 0.7]; mean 1; population var = (0.25 + 0.04 + 0.09) / 3
    loss = importance_loss(gates)
    torch.testing.assert_close(loss, torch.tensor(0.38 / 3), **TOL)
    loss.backward()
    # d CV^2 / d imp_e = 2 (imp_e - mean) / (n mean^2) - 2 var / (n mean^3)  (n = 3, mean = 1)
    var = 0.38 / 3
    d = [2 * (v - 1.0) / 3 - 2 * var / 3 for v in (1.5, 0.8, 0.7)]
    torch.testing.assert_close(gates.grad, torch.tensor([d] * 3), **TOL)
    assert float(importance_loss(torch.full((4, 3), 0.25))) == pytest.approx(0.0, abs=1e-12)


def test_load_loss_hand_k1():
    clean = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.2]])
    noisy = torch.tensor([[1.2, 0.5, -2.0], [0.1, 0.4, 0.9]])
    std = torch.tensor([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]])
    # token 0: noisy top-1 is expert 0. In the top-k -> threshold = best of the others (0.5);
    # outside -> threshold = k-th best overall (1.2).
    p0 = [_phi((1.0 - 0.5) / 1.0), _phi((0.0 - 1.2) / 2.0), _phi((-1.0 - 1.2) / 0.5)]
    # token 1: noisy top-1 is expert 2 (0.9); others' best is 0.4.
    p1 = [_phi((0.0 - 0.9) / 1.0), _phi((0.5 - 0.9) / 1.0), _phi((0.2 - 0.4) / 1.0)]
    load = [a + b for a, b in zip(p0, p1)]
    mean = sum(load) / 3
    cv2 = sum((v - mean) ** 2 for v in load) / 3 / mean ** 2
    torch.testing.assert_close(load_loss(clean, noisy, std, 1), torch.tensor(cv2), **TOL)


def test_load_loss_hand_k2():
    clean = torch.tensor([[0.3, -0.2, 0.1, 0.0]])
    noisy = torch.tensor([[0.9, -0.5, 0.4, 0.2]])
    std = torch.ones(1, 4)
    # k = 2: top-2 noisy = {0 (0.9), 2 (0.4)}; the 2nd best of the others:
    # e=0: others (0.4, 0.2, -0.5) -> 0.2; e=2: others (0.9, 0.2, -0.5) -> 0.2;
    # e=1: others (0.9, 0.4, 0.2) -> 0.4; e=3: others (0.9, 0.4, -0.5) -> 0.4
    load = [_phi(0.3 - 0.2), _phi(-0.2 - 0.4), _phi(0.1 - 0.2), _phi(0.0 - 0.4)]
    mean = sum(load) / 4
    cv2 = sum((v - mean) ** 2 for v in load) / 4 / mean ** 2
    torch.testing.assert_close(load_loss(clean, noisy, std, 2), torch.tensor(cv2), **TOL)
    assert float(load_loss(clean, noisy, std, 4)) == 0.0  # k = E: every expert always chosen


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_loss_matches_reference(k):
    g = torch.Generator().manual_seed(10 + k)
    T, E = 7, 5
    clean = torch.randn(T, E, generator=g).requires_grad_(True)
    std = (torch.rand(T, E, generator=g) + 0.5).requires_grad_(True)
    eps = torch.randn(T, E, generator=g)
    noisy = clean + eps * std
    loss = load_loss(clean, noisy, std, k)
    c64, s64 = clean.detach().double().requires_grad_(True), std.detach().double().requires_grad_(True)
    n64 = c64 + eps.double() * s64
    rows = lambda m: [[m[t, e] for e in range(E)] for t in range(T)]  # noqa: E731
    ref = ref_load_loss(rows(c64), rows(n64), rows(s64), k)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-6, rtol=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(clean.grad.double(), c64.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(std.grad.double(), s64.grad, atol=1e-6, rtol=1e-5)


def test_importance_loss_matches_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 6, generator=g)
    idx, w, _ = softmax_topk(logits, 2)
    w = w.requires_grad_(True)
    gates = torch.zeros(9, 6).scatter(1, idx, w)
    loss = importance_loss(gates)
    w64 = w.detach().double().requires_grad_(True)
    ref = ref_importance_loss(idx.tolist(), [[w64[t, k] for k in range(2)] for t in range(9)], 6)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-6, rtol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ ST-MoE z-loss
def test_z_loss_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]], requires_grad=True)
    z0 = math.log(2.0)
    z1 = math.log(math.exp(1.0) + math.exp(2.0))
    loss = router_z_loss(logits)
    torch.testing.assert_close(loss, torch.tensor((z0 ** 2 + z1 ** 2) / 2), **TOL)
    loss.backward()
    # d/dlogit = (2 z_t / T) * softmax(logits_t)
    sm1 = [math.exp(1.0) / (math.exp(1.0) + math.exp(2.0)), math.exp(2.0) / (math.exp(1.0) + math.exp(2.0))]
    expect = [[z0 * 0.5, z0 * 0.5], [z1 * sm1[0], z1 * sm1[1]]]
    torch.testing.assert_close(logits.grad, torch.tensor(expect), **TOL)
    assert float(router_z_loss(torch.zeros(0, 3))) == 0.0


def test_z_loss_matches_reference():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(6, 5, generator=g) * 3).requires_grad_(True)
    l64 = logits.detach().double().requires_grad_(True)
    loss = router_z_loss(logits)
    ref = ref_z_loss([[l64[t, e] for e in range(5)] for t in range(6)])
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad.double(), l64.grad, atol=1e-6, rtol=1e-5)


def test_router_entropy_known_values():
    assert router_entropy(torch.full((3, 4), 0.25)) == pytest.approx(math.log(4), rel=1e-6)
    one_hot = torch.zeros(3, 4)
    one_hot[:, 1] = 1.0
    assert router_entropy(one_hot) == pytest.approx(0.0, abs=1e-9)
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert router_entropy(p) == pytest.approx(math.log(2), rel=1e-6)
