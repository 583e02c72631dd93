"""DenseMLPWithLoRA against specs/layers.md: names, shapes, init, seeds, dtype rules, dropout."""
import copy
import math

import pytest
import torch
from torch import nn

from moedist.layers import DenseMLPWithLoRA, MLPActivationType

ACT = MLPActivationType
ALL_ACTS = list(MLPActivationType)
XAVIER = {ACT.SIGMOID, ACT.BILINEAR}


def phi_ref(act, x):
    """Hand-written activations (GELU in the exact erf form)."""
    if act is ACT.RELU:
        return torch.where(x > 0, x, torch.zeros_like(x))
    if act is ACT.GELU:
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if act is ACT.SILU:
        return x / (1.0 + torch.exp(-x))
    if act is ACT.SIGMOID:
        return 1.0 / (1.0 + torch.exp(-x))
    return x


def mlp_ref(m, x, lora=True):
    """The spec formula written out, in the parameters' dtype, no dropout."""
    x = x.to(m.up_proj.dtype)
    out = (phi_ref(m.activation_type, x @ m.gate_proj) * (x @ m.up_proj)) @ m.down_proj
    if lora and m.lora_rank > 0:
        out = out + (m.lora_alpha / m.lora_rank) * (x @ m.lora_A @ m.lora_B)
    return out


def global_rng_draw(init_fn, shape_io, seed, **kw):
    """Expected weight via the global RNG: manual_seed + torch.nn.init on the [out, in] view."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        w = torch.empty(shape_io)
        init_fn(w.T, **kw)
    return w


# ------------------------------------------------------------------ structure
def test_parameter_names_shapes_and_no_lora_when_rank_zero():
    m = DenseMLPWithLoRA(6, 10)
    assert dict((n, tuple(p.shape)) for n, p in m.named_parameters()) == {
        "up_proj": (6, 10), "gate_proj": (6, 10), "down_proj": (10, 6)}
    assert m.adapter_params() == []
    m = DenseMLPWithLoRA(6, 10, lora_rank=3)
    shapes = dict((n, tuple(p.shape)) for n, p in m.named_parameters())
    assert shapes["lora_A"] == (6, 3) and shapes["lora_B"] == (3, 6) and len(shapes) == 5
    assert m.adapter_params() == [m.lora_A, m.lora_B]
    assert all(isinstance(p, nn.Parameter) for p in m.parameters())


@pytest.mark.parametrize("act", ALL_ACTS)
def test_init_matches_seeded_draws_on_transposed_view(act):
    h, f, r = 5, 7, 3
    m = DenseMLPWithLoRA(h, f, act, init_base_seed=11, lora_rank=r, lora_init_base_seed=100)
    if act in XAVIER:
        base, kw_b, lora, kw_l = nn.init.xavier_normal_, {}, nn.init.xavier_uniform_, {}
    else:
        base, kw_b = nn.init.kaiming_normal_, dict(mode="fan_in", nonlinearity="relu")
        lora, kw_l = nn.init.kaiming_uniform_, dict(mode="fan_in", nonlinearity="relu")
    assert torch.equal(m.up_proj, global_rng_draw(base, (h, f), 12, **kw_b))
    assert torch.equal(m.gate_proj, global_rng_draw(base, (h, f), 13, **kw_b))
    assert torch.equal(m.down_proj, global_rng_draw(base, (f, h), 14, **kw_b))
    assert torch.equal(m.lora_A, global_rng_draw(lora, (h, r), 101, **kw_l))
    assert torch.equal(m.lora_B, global_rng_draw(lora, (r, h), 102, **kw_l))


def test_seed_offsets_shift_between_projections():
    a = DenseMLPWithLoRA(4, 8, init_base_seed=42)
    b = DenseMLPWithLoRA(4, 8, init_base_seed=43)
    assert torch.equal(a.gate_proj, b.up_proj)  # both seed 44
    assert not torch.equal(a.up_proj, a.gate_proj)


@pytest.mark.parametrize("act", [ACT.SILU, ACT.RELU, ACT.GELU])
def test_kaiming_normal_std_uses_input_dim(act):
    h, f = 32, 2048
    m = DenseMLPWithLoRA(h, f, act)
    for name, fan_in in (("up_proj", h), ("gate_proj", h), ("down_proj", f)):
        w = getattr(m, name).detach()
        assert abs(w.mean().item()) < 0.05 * math.sqrt(2.0 / fan_in)
        assert w.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.03), name


@pytest.mark.parametrize("act", [ACT.SIGMOID, ACT.BILINEAR])
def test_xavier_normal_std(act):
    h, f = 32, 2048
    m = DenseMLPWithLoRA(h, f, act)
    for name in ("up_proj", "gate_proj", "down_proj"):
        assert getattr(m, name).std().item() == pytest.approx(math.sqrt(2.0 / (h + f)), rel=0.03)


@pytest.mark.parametrize("act", ALL_ACTS)
def test_lora_uniform_bounds(act):
    h, r = 4096, 16
    m = DenseMLPWithLoRA(h, 4, act, lora_rank=r)
    for w, fan_in, fan_out in ((m.lora_A, h, r), (m.lora_B, r, h)):
        bound = math.sqrt(6.0 / (fan_in + fan_out)) if act in XAVIER else math.sqrt(6.0 / fan_in)
        w = w.detach()
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.03)


def test_reset_parameters_restores_and_init_is_dtype_independent():
    m = DenseMLPWithLoRA(5, 6, lora_rank=2)
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    m.reset_parameters()
    assert all(torch.equal(p, ref[n]) for n, p in m.named_parameters())
    for dtype in (torch.bfloat16, torch.float64, torch.float16):
        mb = DenseMLPWithLoRA(5, 6, lora_rank=2, dtype=dtype)
        for n, p in mb.named_parameters():
            assert p.dtype == dtype and torch.equal(p, ref[n].to(dtype)), (dtype, n)


def test_no_global_rng_use_construction_and_forward():
    x = torch.randn(2, 3, 4)
    for kw in (dict(), dict(lora_rank=2), dict(lora_rank=2, lora_dropout_rate=0.5)):
        state = torch.get_rng_state()
        m = DenseMLPWithLoRA(4, 8, **kw)
        m(x)
        assert torch.equal(state, torch.get_rng_state()), kw


# ------------------------------------------------------------------- forward
@pytest.mark.parametrize("act", ALL_ACTS)
def test_forward_matches_formula(act):
    m = DenseMLPWithLoRA(6, 12, act, lora_rank=3, lora_alpha=1.5, dtype=torch.float64)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, 5, 6) and out.dtype == torch.float64
    torch.testing.assert_close(out, mlp_ref(m, x), rtol=1e-12, atol=1e-12)
    lora_only = out - mlp_ref(m, x, lora=False)
    torch.testing.assert_close(lora_only, 0.5 * (x @ m.lora_A @ m.lora_B), rtol=1e-10, atol=1e-12)


def test_gelu_is_exact_erf_not_tanh():
    m = DenseMLPWithLoRA(4, 8, ACT.GELU, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64) * 3
    tanh_gelu = torch.nn.functional.gelu(x @ m.gate_proj, approximate="tanh")
    approx = (tanh_gelu * (x @ m.up_proj)) @ m.down_proj
    torch.testing.assert_close(m(x), mlp_ref(m, x))
    assert not torch.allclose(m(x), approx, rtol=0, atol=1e-9)


def test_lora_alpha_none_means_scale_one():
    m = DenseMLPWithLoRA(4, 8, lora_rank=2, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x) - mlp_ref(m, x, lora=False), x @ m.lora_A @ m.lora_B)


def test_compute_in_param_dtype_output_in_input_dtype():
    torch.manual_seed(0)
    m = DenseMLPWithLoRA(8, 16, lora_rank=2, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 8)
    out = m(x)
    assert out.dtype == torch.float32
    xb = x.to(torch.bfloat16)  # computed in bf16, then cast
    expected = (torch.nn.functional.silu(xb @ m.gate_proj) * (xb @ m.up_proj)) @ m.down_proj + xb @ m.lora_A @ m.lora_B
    torch.testing.assert_close(out, expected.float(), rtol=1.6e-2, atol=1e-2)
    fp32_ref = mlp_ref(DenseMLPWithLoRA(8, 16, lora_rank=2), x)
    assert (out - fp32_ref).abs().max() > 0  # really ran in bf16
    x16 = torch.randn(2, 3, 8, dtype=torch.float16)
    m32 = DenseMLPWithLoRA(8, 16, lora_rank=2)
    out16 = m32(x16)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16, mlp_ref(m32, x16.float()).half())


def test_backward_reaches_every_parameter():
    m = DenseMLPWithLoRA(4, 8, lora_rank=2, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert torch.autograd.gradcheck(lambda t: m(t), (torch.randn(2, 4, dtype=torch.float64, requires_grad=True),))


# ------------------------------------------------------------------- dropout
def test_dropout_reproducible_changes_per_call_and_off_in_eval():
    kw = dict(lora_rank=4, lora_dropout_rate=0.5, lora_dropout_seed=7, dtype=torch.float64)
    a, b = DenseMLPWithLoRA(6, 8, **kw), DenseMLPWithLoRA(6, 8, **kw)
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    outs_a = []
    for i in range(3):
        torch.manual_seed(i)  # the global RNG must not matter
        oa, ob = a(x), b(x)
        assert torch.equal(oa, ob)
        outs_a.append(oa)
    assert not torch.equal(outs_a[0], outs_a[1])
    # The branch is either dropped (0) or scaled by 1 / (1 - p) element-wise.
    full = 1.0 * (x @ a.lora_A @ a.lora_B)
    branch = outs_a[0] - mlp_ref(a, x, lora=False)
    dropped = branch.abs() < 1e-9
    torch.testing.assert_close(branch[~dropped], 2.0 * full[~dropped])
    assert 0.3 < dropped.double().mean().item() < 0.7
    c = DenseMLPWithLoRA(6, 8, **{**kw, "lora_dropout_seed": 8})
    assert not torch.equal(c(x), outs_a[0])
    a.eval()
    torch.testing.assert_close(a(x), mlp_ref(a, x))
    torch.testing.assert_close(a(x), a(x))


def test_deepcopy_continues_the_same_mask_sequence():
    m = DenseMLPWithLoRA(4, 8, lora_rank=2, lora_dropout_rate=0.3)
    x = torch.randn(6, 4)
    m(x)
    m2 = copy.deepcopy(m)
    assert torch.equal(m(x), m2(x))


# --------------------------------------------------------------- proj target
def test_proj_target_shapes_and_formula():
    h, f, r = 4, 6, 2
    m = DenseMLPWithLoRA(h, f, lora_rank=r, lora_alpha=4.0, lora_target="proj", dtype=torch.float64)
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert names == {"up_proj": (h, f), "gate_proj": (h, f), "down_proj": (f, h),
                     "up_lora_A": (h, r), "up_lora_B": (r, f), "gate_lora_A": (h, r), "gate_lora_B": (r, f),
                     "down_lora_A": (f, r), "down_lora_B": (r, h)}
    assert len(m.adapter_params()) == 6
    x = torch.randn(3, h, dtype=torch.float64)
    s = 2.0
    g = x @ m.gate_proj + s * x @ m.gate_lora_A @ m.gate_lora_B
    u = x @ m.up_proj + s * x @ m.up_lora_A @ m.up_lora_B
    z = torch.nn.functional.silu(g) * u
    torch.testing.assert_close(m(x), z @ m.down_proj + s * z @ m.down_lora_A @ m.down_lora_B)


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, name", [
    (dict(hidden_size=0), "hidden_size"), (dict(ffh_size=-2), "ffh_size"), (dict(ffh_size=2.5), "ffh_size"),
    (dict(lora_rank=-1), "lora_rank"), (dict(lora_dropout_rate=1.5), "lora_dropout_rate"),
    (dict(activation_type="tanh"), "activation_type"), (dict(dtype=torch.int32), "dtype"),
    (dict(lora_target="attn"), "lora_target"), (dict(lora_alpha="2"), "lora_alpha"),
])
def test_bad_arguments_raise_value_error_naming_them(kw, name):
    args = dict(hidden_size=4, ffh_size=8)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        DenseMLPWithLoRA(**args)


def test_wrong_input_width_and_string_activation():
    m = DenseMLPWithLoRA(4, 8, activation_type="gelu")
    assert m.activation_type is ACT.GELU
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(2, 5))


# ----------------------------------------------------------------------- gpu
@pytest.mark.gpu
def test_cuda_params_cpu_input_same_init():
    cpu = DenseMLPWithLoRA(8, 16, lora_rank=2)
    gpu = DenseMLPWithLoRA(8, 16, lora_rank=2, device="cuda", dtype=torch.bfloat16)
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert q.is_cuda and torch.equal(q.cpu(), p.to(torch.bfloat16)), n
    x = torch.randn(2, 3, 8)
    out = gpu(x)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    torch.testing.assert_close(out, cpu(x), rtol=0.05, atol=0.05)
