"""Expert modules vs the naive per-row reference: GroupedExperts, LoRAOnExperts,
MoELoRAExperts (generic forward and fused forward_tokens), SharedExperts and
grouped_mm. Outputs and gradients, fp32 vs fp64 loops, 1e-5."""
import pytest
import torch

from moedist.moe import GroupedExperts, LoRAOnExperts, MoELoRAExperts, SharedExperts
from moedist.moe.experts import EXPERT_ATTR
from moedist.moe.ffn import grouped_mm
from tests.moe_reference import (Leaves, experts_dict, ref_expert, ref_shared, shared_dict,
                                 ref_vecmat)

TOL = dict(atol=1e-5, rtol=1e-5)
E, H, F, R = 4, 6, 8, 3
COUNTS = [3, 0, 4, 2]  # expert 1 gets no rows


def _x(n, seed=0):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def _randomise_lora_B(module, seed=1, std=0.4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for st in module.lora.values():
            st.lora_B.copy_(torch.randn(st.lora_B.shape, generator=g) * std)


def _check(module, kind, x, counts, first_expert=0, seed=2):
    """module(x, counts) vs the per-row reference; gradients of x and every trainable param."""
    y = module(x, counts)
    leaves = Leaves()
    ex = experts_dict(module, kind, leaves)
    if kind != "moelora" or True:
        pass
    x64 = x.detach().double().requires_grad_(True)
    rows, r = [], 0
    for l, c in enumerate(counts):
        for _ in range(c):
            rows.append(ref_expert(l, x64[r], ex, module.activation))  # local index into the stacks
            r += 1
    y_ref = torch.stack(rows) if rows else torch.zeros(0, H, dtype=torch.float64)
    assert y.shape == (sum(counts), H)
    torch.testing.assert_close(y.double(), y_ref.detach(), **TOL)
    assert y.abs().max() > 0.05  # not trivially small
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * gy).sum().backward()
    (y_ref * gy.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL)
    n = 0
    for p, leaf in leaves.pairs():
        assert p.grad is not None
        torch.testing.assert_close(p.grad.double(), leaf.grad, **TOL)
        n += 1
    return n


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
def test_grouped_experts_match_reference(activation):
    m = GroupedExperts(E, H, F, activation=activation, init_std=0.4, seed=3)
    n = _check(m, "grouped", _x(sum(COUNTS)), COUNTS)
    assert n == (3 if activation in ("swiglu", "geglu") else 2)


@pytest.mark.parametrize("make", [
    lambda: GroupedExperts(E, H, F, init_std=0.4),
    lambda: GroupedExperts(E, H, F, activation="gelu"),
    lambda: LoRAOnExperts(E, H, F, R),
    lambda: MoELoRAExperts(E, H, F, R),
])
def test_experts_no_rows_give_zero_grads_not_none(make):
    """An EP rank that receives no tokens must still produce (zero) gradients for
    every trainable expert parameter, or gradient reduction would diverge across ranks."""
    m = make()
    x = torch.zeros(0, H, requires_grad=True)
    y = m(x, [0, 0, 0, 0])
    assert y.shape == (0, H)
    y.sum().backward()
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None, n
        assert not p.grad.any(), n


def test_expert_weights_do_not_depend_on_layout():
    full = GroupedExperts(E, H, F, seed=5)
    half = GroupedExperts(E, H, F, num_local=2, first_expert=2, seed=5)
    for name in ("w_gate", "w_up", "w_down"):
        assert torch.equal(getattr(full, name)[2:], getattr(half, name))
        assert getattr(getattr(half, name), EXPERT_ATTR, False)
    lf = MoELoRAExperts(E, H, F, R, seed=5)
    lh = MoELoRAExperts(E, H, F, R, num_local=2, first_expert=2, seed=5)
    for t in ("gate", "up", "down"):
        assert torch.equal(lf.lora[t].lora_A[2:], lh.lora[t].lora_A)
    # half layout computes exactly what the full one computes for experts 2, 3
    x = _x(5)
    torch.testing.assert_close(half(x, [2, 3]), full(x, [0, 0, 2, 3]))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("targets", [("gate", "up", "down"), ("up",), ("gate", "down")])
@pytest.mark.parametrize("freeze_base", [True, False])
def test_lora_on_experts_match_reference(activation, targets, freeze_base):
    m = LoRAOnExperts(E, H, F, R, lora_alpha=6.0, targets=targets, activation=activation,
                      freeze_base=freeze_base, init_std=0.4, seed=4)
    _randomise_lora_B(m)
    n = _check(m, "lora_on_experts", _x(sum(COUNTS), 1), COUNTS)
    n_lora = 2 * len([t for t in targets if t != "gate" or activation == "swiglu"])
    assert len(m.adapter_params()) == n_lora
    assert n == n_lora + (0 if freeze_base else (3 if activation == "swiglu" else 2))


def test_lora_on_experts_init_equals_base_experts():
    base = GroupedExperts(E, H, F, init_std=0.4, seed=8)
    lora = LoRAOnExperts(E, H, F, R, init_std=0.4, seed=8)
    x = _x(sum(COUNTS), 2)
    assert torch.equal(lora(x, COUNTS), base(x, COUNTS))  # B = 0 -> exactly the frozen experts
    assert not lora.w_up.requires_grad and all(p.requires_grad for p in lora.adapter_params())


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("targets", [("gate", "up", "down"), ("down",), ("gate", "up")])
def test_moelora_generic_forward_matches_reference(activation, targets):
    m = MoELoRAExperts(E, H, F, R, lora_alpha=2.0, targets=targets, activation=activation, init_std=0.4, seed=6)
    _randomise_lora_B(m)
    for p in (m.w_gate, m.w_up, m.w_down):  # also check the frozen base's gradients
        if p is not None:
            p.requires_grad_(True)
    _check(m, "moelora", _x(sum(COUNTS), 3), COUNTS)


def _pairs(T, K, seed):
    """Random routed pairs sorted by expert: token ids [N], weights [N], counts [E]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    keep = torch.rand(T, K, generator=g) > 0.25  # some pairs dropped
    w = torch.rand(T, K, generator=g)
    flat = keep.reshape(-1).nonzero().squeeze(1)
    e_N = idx.reshape(-1)[flat]
    order = torch.argsort(e_N, stable=True)
    pair_N = flat[order]
    return pair_N // K, w.reshape(-1)[pair_N], torch.bincount(e_N, minlength=E).tolist(), idx.reshape(-1)[pair_N]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("targets", [("gate", "up", "down"), ("up", "down"), ("gate",)])
def test_moelora_forward_tokens_matches_reference(activation, targets):
    T, K = 7, 2
    m = MoELoRAExperts(E, H, F, R, lora_alpha=5.0, targets=targets, activation=activation, init_std=0.4, seed=7)
    _randomise_lora_B(m, seed=3)
    for p in (m.w_gate, m.w_up, m.w_down):
        if p is not None:
            p.requires_grad_(True)
    token_N, w_N, counts, e_N = _pairs(T, K, seed=1)
    x = _x(T, 4)
    w_N = w_N.clone().requires_grad_(True)
    y = m.forward_tokens(x, token_N, w_N, counts)  # [T, H]
    leaves = Leaves()
    ex = experts_dict(m, "moelora", leaves)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w_N.detach().double().requires_grad_(True)
    rows = []
    for t in range(T):
        acc = torch.zeros(H, dtype=torch.float64)
        for n in range(len(token_N)):
            if int(token_N[n]) == t:
                acc = acc + w64[n] * ref_expert(int(e_N[n]), x64[t], ex, activation)
        rows.append(acc)
    y_ref = torch.stack(rows)
    torch.testing.assert_close(y.double(), y_ref.detach(), **TOL)
    assert y.abs().max() > 0.05
    gy = torch.randn(T, H, generator=torch.Generator().manual_seed(9))
    (y * gy).sum().backward()
    (y_ref * gy.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL)
    torch.testing.assert_close(w_N.grad.double(), w64.grad, **TOL)
    for p, leaf in leaves.pairs():
        torch.testing.assert_close(p.grad.double(), leaf.grad, **TOL)
    # and the generic path on the gathered rows gives the same combine
    with torch.no_grad():
        y_gen = m(x.detach().index_select(0, token_N), counts)
        y_comb = torch.zeros(T, H).index_add(0, token_N, y_gen * w_N.detach().unsqueeze(1))
    torch.testing.assert_close(y.detach(), y_comb, **TOL)


def test_moelora_dropout_same_masks_on_both_paths():
    """In training with LoRA dropout, forward_tokens and forward draw the same masks
    from the module's own generator, so both paths agree for the same generator state."""
    T, K = 6, 2
    m = MoELoRAExperts(E, H, F, R, lora_dropout=0.3, init_std=0.4, seed=2).train()
    _randomise_lora_B(m, seed=5)
    token_N, w_N, counts, _ = _pairs(T, K, seed=3)
    x = _x(T, 5).detach()
    state = m._drop_gen.get_state()
    y_fused = m.forward_tokens(x, token_N, w_N, counts)
    m._drop_gen.set_state(state)
    y_gen = m(x.index_select(0, token_N), counts)
    y_comb = torch.zeros(T, H).index_add(0, token_N, y_gen * w_N.unsqueeze(1))
    torch.testing.assert_close(y_fused, y_comb, **TOL)
    m.eval()
    y_eval = m.forward_tokens(x, token_N, w_N, counts)
    assert not torch.allclose(y_eval, y_fused)  # dropout really acted in training


def test_lora_A_init_is_kaiming_uniform_like_peft():
    d_in = 64
    m = MoELoRAExperts(2, d_in, 16, 8, seed=0)
    A = m.lora["up"].lora_A  # [L, H, r], fan_in = H
    bound = 1.0 / d_in ** 0.5  # kaiming_uniform(a=sqrt(5)) on nn.Linear(d_in, r).weight
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert not m.lora["up"].lora_B.any()
    assert m.lora["down"].lora_A.abs().max() <= 1.0 / 16 ** 0.5


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_match_reference(activation, gated):
    m = SharedExperts(H, 2 * F, activation=activation, gated=gated, init_std=0.4, seed=3)
    x = _x(5, 6)
    y = m(x)
    leaves = Leaves()
    sh = shared_dict(m, leaves)
    x64 = x.detach().double().requires_grad_(True)
    y_ref = torch.stack([ref_shared(x64[t], sh, activation) for t in range(5)])
    torch.testing.assert_close(y.double(), y_ref.detach(), **TOL)
    gy = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    (y * gy).sum().backward()
    (y_ref * gy.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL)
    for p, leaf in leaves.pairs():
        torch.testing.assert_close(p.grad.double(), leaf.grad, **TOL)
    assert (m.w_shared_gate is not None) == gated


@pytest.mark.parametrize("counts", [[2, 0, 3], [0, 0, 5], [5], [0, 0, 0], [1, 1, 1]])
def test_grouped_mm_matches_loop(counts):
    g = torch.Generator().manual_seed(sum(counts))
    L = len(counts)
    x = torch.randn(sum(counts), 4, generator=g).requires_grad_(True)
    w = torch.randn(L, 4, 3, generator=g).requires_grad_(True)
    y = grouped_mm(x, w, counts)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    rows, r = [], 0
    for l, c in enumerate(counts):
        for _ in range(c):
            rows.append(ref_vecmat(x64[r], w64[l]))
            r += 1
    y_ref = torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
    torch.testing.assert_close(y.double(), y_ref.detach(), **TOL)
    if rows:
        gy = torch.randn(y.shape, generator=g)
        (y * gy).sum().backward()
        (y_ref * gy.double()).sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, **TOL)
        torch.testing.assert_close(w.grad.double(), w64.grad, **TOL)
    with pytest.raises(ValueError, match="counts"):
        grouped_mm(x.detach(), w.detach(), counts + [1])


@pytest.mark.parametrize("make, name", [
    (lambda: GroupedExperts(E, H, F, activation="tanh"), "activation"),
    (lambda: LoRAOnExperts(E, H, F, R, activation="swish"), "activation"),
    (lambda: MoELoRAExperts(E, H, F, R, activation="Swiglu"), "activation"),
    (lambda: SharedExperts(H, F, activation="gelu_new"), "activation"),
    (lambda: SharedExperts(H, 0), "ffn_size"),
    (lambda: MoELoRAExperts(E, H, F, 0), "lora_rank"),
    (lambda: LoRAOnExperts(E, H, F, -1), "lora_rank"),
    (lambda: MoELoRAExperts(E, H, F, R, targets=("q",)), "targets"),
    (lambda: MoELoRAExperts(E, H, F, R, targets=()), "targets"),
    (lambda: MoELoRAExperts(E, H, F, R, lora_dropout=1.0), "lora_dropout"),
    (lambda: GroupedExperts(E, H, F, num_local=3, first_expert=2), "num_experts"),
    (lambda: GroupedExperts(0, H, F), "num_experts"),
    (lambda: MoELoRAExperts(E, H, F, R, num_local=5), "num_experts"),
])
def test_expert_bad_arguments(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_bf16_experts_with_unaligned_sizes_run():
    """torch._grouped_mm needs 16-byte aligned strides; odd F or LoRA rank must fall back, not crash."""
    from moedist.moe import GroupedExperts as GE, LoRAOnExperts as LE
    x = torch.randn(10, 16)
    for mod in (GE(4, 16, 6), LE(4, 16, 32, lora_rank=2)):
        ref = mod(x, [3, 3, 2, 2])
        out = mod.to(torch.bfloat16)(x.to(torch.bfloat16), [3, 3, 2, 2])
        assert out.shape == (10, 16)
        assert torch.allclose(out.float(), ref, atol=5e-2, rtol=5e-2)
