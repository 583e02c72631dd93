"""SparseMLPWithLoRA (process_group=None) against specs/layers.md.

References: a naive per-token loop over independently built DenseMLPWithLoRA
experts, and the sum of the partial outputs of ranks 0..world_size-1.
"""
import math

import pytest
import torch
from torch import nn

from moedist.layers import DenseMLPWithLoRA, MLPActivationType, SparseMLPWithLoRA

H, FFH = 6, 24


def make(**kw):
    args = dict(hidden_size=H, ffh_size=FFH, num_experts=4, moe_topk=2, init_base_seed=5,
                lora_rank=2, lora_alpha=3.0, lora_init_base_seed=9)
    args.update(kw)
    return SparseMLPWithLoRA(**args)


def naive_reference(x, gate, experts, k):
    """Per-token loop: softmax(x @ gate) in fp32, top-k, renormalise, weighted expert sum."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.zeros(x2.shape, dtype=torch.float64)
    for t in range(x2.shape[0]):
        logits = [sum(float(x2[t, j]) * float(gate[j, e]) for j in range(x2.shape[1])) for e in range(gate.shape[1])]
        m = max(logits)
        p = [math.exp(v - m) for v in logits]
        p = [v / sum(p) for v in p]
        top = sorted(range(len(p)), key=lambda e: -p[e])[:k]
        z = sum(p[e] for e in top)
        for e in top:
            out[t] += (p[e] / z) * experts[e](x2[t:t + 1].double())[0]
    return out.reshape(x.shape)


def independent_experts(num_experts, expert_size, **kw):
    """Global experts built directly with the documented seed offsets, in float64."""
    return [DenseMLPWithLoRA(H, expert_size, kw.get("activation_type", MLPActivationType.SILU),
                             init_base_seed=5 + i, lora_rank=2, lora_alpha=3.0,
                             lora_init_base_seed=9 + i, lora_dropout_seed=42 + i,
                             dtype=torch.float64).eval() for i in range(num_experts)]


# ----------------------------------------------------------------- structure
def test_structure_gate_and_expert_seeds():
    m = make(world_size=2, rank=1, dtype=torch.bfloat16)
    assert m.gate.shape == (H, 4) and m.gate.dtype == torch.float32
    assert isinstance(m.experts, nn.ModuleList) and len(m.experts) == 2
    for j, expert in enumerate(m.experts):
        i = 2 + j  # global index
        ref = DenseMLPWithLoRA(H, FFH // 4, init_base_seed=5 + i, lora_rank=2, lora_alpha=3.0,
                               lora_init_base_seed=9 + i, lora_dropout_seed=42 + i)
        assert expert.ffh_size == FFH // 4 and expert.lora_dropout.seed == 42 + i
        for (n, p), q in zip(ref.named_parameters(), expert.parameters()):
            assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16)), (i, n)
    assert len(m.adapter_params()) == 4


def test_gate_init_from_seeded_normal():
    m = make(init_mean=0.5, init_std=2.0)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(m.gate, torch.empty(H, 4).normal_(0.5, 2.0, generator=g))
    big = SparseMLPWithLoRA(256, 64, num_experts=64, init_mean=-1.0, init_std=0.25)
    assert big.gate.mean().item() == pytest.approx(-1.0, abs=0.01)
    assert big.gate.std().item() == pytest.approx(0.25, rel=0.03)
    # The router is the same on every rank.
    assert torch.equal(make(world_size=4, rank=3).gate, make().gate)


def test_no_global_rng_use():
    state = torch.get_rng_state()
    m = make(lora_dropout_rate=0.3)
    m(torch.ones(2, 3, H))
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------- forward
@pytest.mark.parametrize("act, ne, k", [(MLPActivationType.SILU, 4, 2), (MLPActivationType.GELU, 4, 1),
                                        (MLPActivationType.BILINEAR, 3, 3), (MLPActivationType.RELU, 6, 2)])
def test_forward_matches_naive_loop(act, ne, k):
    torch.manual_seed(0)
    m = make(num_experts=ne, moe_topk=k, activation_type=act, dtype=torch.float64)
    x = torch.randn(2, 5, H)
    out = m(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    ref = naive_reference(x, m.gate.detach(), independent_experts(ne, FFH // ne, activation_type=act), k)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ws", [2, 4])
def test_partial_sums_over_ranks_equal_full_layer(ws):
    torch.manual_seed(1)
    x = torch.randn(3, 4, H)
    full = make(num_experts=8, moe_topk=3)
    parts = [make(num_experts=8, moe_topk=3, world_size=ws, rank=r) for r in range(ws)]
    outs = [p(x) for p in parts]
    torch.testing.assert_close(sum(outs), full(x), rtol=1e-5, atol=1e-6)
    assert all(o.abs().sum() > 0 for o in outs)
    # Gradients: each partial layer's experts get exactly the full layer's expert gradients.
    g = torch.randn_like(x)
    (full(x) * g).sum().backward()
    for r, p in enumerate(parts):
        (p(x) * g).sum().backward()
        for j, expert in enumerate(p.experts):
            ref_expert = full.experts[r * (8 // ws) + j]
            for q, q_ref in zip(expert.parameters(), ref_expert.parameters()):
                torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(p.gate.grad for p in parts), full.gate.grad, rtol=1e-5, atol=1e-6)


def test_tokens_routed_elsewhere_get_zeros():
    torch.manual_seed(2)
    x = torch.randn(10, H)
    m0 = make(num_experts=4, moe_topk=1, world_size=4, rank=0)
    out = m0(x)
    idx = torch.softmax(x @ m0.gate.detach(), -1).argmax(-1)
    assert torch.all(out[idx != 0] == 0)
    assert torch.all(out[idx == 0].abs().sum(-1) > 0)


def test_topk_all_experts_uses_plain_softmax_weights():
    torch.manual_seed(3)
    m = make(num_experts=3, moe_topk=3, lora_rank=0, dtype=torch.float64)
    x = torch.randn(7, H, dtype=torch.float64)
    p = torch.softmax((x.float() @ m.gate).double(), -1)
    ref = sum(p[:, i:i + 1] * m.experts[i](x) for i in range(3))
    torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)


def test_dtype_rules_bf16_experts_fp32_input_and_empty_input():
    torch.manual_seed(4)
    m16 = make(dtype=torch.bfloat16)
    m32 = make()
    x = torch.randn(2, 3, H)
    out = m16(x)
    assert out.dtype == torch.float32 and out.device == x.device
    torch.testing.assert_close(out, m32(x), rtol=0.05, atol=0.05)
    assert not torch.equal(out, m32(x))
    xb = x.to(torch.bfloat16)
    assert m32(xb).dtype == torch.bfloat16
    assert m32(torch.randn(0, 3, H)).shape == (0, 3, H)
    assert m32(torch.randn(0, H)).shape == (0, H)


def test_dropout_reproducible_between_identical_layers():
    x = torch.randn(4, 3, H)
    a, b = make(lora_dropout_rate=0.5), make(lora_dropout_rate=0.5)
    for _ in range(2):
        assert torch.equal(a(x), b(x))
    a.eval()
    torch.testing.assert_close(a(x), make()(x))


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, name", [
    (dict(ffh_size=25), "ffh_size"), (dict(num_experts=0), "num_experts"),
    (dict(num_experts=4, world_size=3), "world_size"), (dict(world_size=2, rank=2), "rank"),
    (dict(rank=-1), "rank"), (dict(moe_topk=5), "moe_topk"), (dict(moe_topk=0), "moe_topk"),
    (dict(init_std=-1.0), "init_std"), (dict(lora_rank=-2), "lora_rank"), (dict(hidden_size=0), "hidden_size"),
    (dict(world_size=0), "world_size"), (dict(lora_dropout_rate=-0.1), "lora_dropout_rate"),
    (dict(dtype=torch.int64), "dtype"), (dict(activation_type="swish"), "activation_type"),
])
def test_bad_arguments_raise_value_error_naming_them(kw, name):
    with pytest.raises(ValueError, match=name):
        make(**kw)


def test_wrong_input_width():
    with pytest.raises(ValueError, match="input"):
        make()(torch.randn(2, H + 1))
