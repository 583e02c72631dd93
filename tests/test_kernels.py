"""The hand-written autograd kernels of moedist/moe/kernels/ against plain-autograd references.

Each kernel class is called directly (so no dispatch can route around it) and through its
public function in moe/ffn.py; the reference is written here with ordinary torch ops in
float64 (a Python loop over the groups). Forward outputs and the gradients of every
differentiable input are compared: fp32 to 1e-5 relative, bf16 to 2e-2, with zero-count
groups and empty inputs. `choose_path`'s decision table and `GradSlots` are tested too.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F_

from moedist.bench.memory import backward_peak_bytes
from moedist.moe.ffn import (GATED, GATED_GRAD, Path, choose_path, gather_lora_proj, grouped_ffn, grouped_ffn_tokens,
                             grouped_mm, moe_lora_hidden)
from moedist.moe.kernels.gated_ffn import GroupedGatedFFN, GroupedGatedFFNTokens
from moedist.moe.kernels.combine import weighted_scatter_add
from moedist.moe.kernels.grouped_mm import GroupedMM
from moedist.moe.kernels.lora_proj import GatherLoRAProj
from moedist.moe.kernels.moe_lora_hidden import MoELoRATensors, moe_lora_hidden_apply
from moedist.moe.kernels.slices import ExpertSlice, GradSlots, KeptGrads

COUNTS = [[3, 0, 5, 2], [0, 0, 4], [6], [0, 0, 0], [1, 1, 1, 1]]
DTYPES = [torch.float32, torch.bfloat16]
REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
H, F, R, T = 8, 12, 4, 7
ACT64 = {"swiglu": F_.silu, "geglu": F_.gelu}  # the reference's own activations


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _close(got: Optional[torch.Tensor], ref: Optional[torch.Tensor], dtype, what: str,
           plain: Optional[torch.Tensor] = None) -> None:
    """|got - ref| <= REL[dtype] |ref|; in bf16 also allowed: twice the error of plain autograd
    run in bf16 (`plain`), since both round the same products."""
    assert (got is None) == (ref is None), what
    if got is None:
        return
    assert got.shape == ref.shape and got.dtype == dtype, what
    err = (got.double() - ref).norm().item()
    bound = REL[dtype] * max(ref.norm().item(), 1.0)
    if plain is not None:
        bound = max(bound, 2.0 * (plain.double() - ref).norm().item())
    assert err <= bound, f"{what}: |err| {err:.3g} > {bound:.3g} (|ref| {ref.norm().item():.3g})"


def _check(run: Callable[..., object], ref: Callable[..., object], inputs: List[Optional[torch.Tensor]], dtype,
           diff: Sequence[bool]) -> None:
    """run(*inputs) in `dtype` vs ref(*inputs in float64): outputs, then the gradient of every
    input marked in `diff` for the loss sum_i <out_i, R_i> (R_i random). In bf16 the reference
    also runs in bf16 (plain autograd's own rounding error sets the bound, see `_close`)."""
    def go(fn, cast):
        ts = [cast(t).detach().clone().requires_grad_(d) if t is not None and t.is_floating_point() else t
              for t, d in zip(inputs, diff)]
        outs = fn(*ts)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = 0.0
        for i, o in enumerate(outs):
            if o is not None:  # an empty output still joins the loss: its backward must give zero gradients
                loss = loss + (o.double() * _rand(*o.shape, dtype=torch.float64, seed=100 + i)).sum()
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        return [None if o is None else o.detach() for o in outs], [t.grad if d else None for t, d in zip(ts, diff)]

    outs, grads = go(run, lambda t: t)
    refs, ref_grads = go(ref, lambda t: t.double())
    plain_outs, plain_grads = go(ref, lambda t: t) if dtype != torch.float32 else ([None] * 9, [None] * 20)
    for i, (o, r, p) in enumerate(zip(outs, refs, plain_outs)):
        _close(o, r, dtype, f"output {i}", p)
    for i, (g, r, p, d) in enumerate(zip(grads, ref_grads, plain_grads, diff)):
        if d:
            _close(g, r, dtype, f"grad of input {i}", p)


def _slices(counts):
    out, a = [], 0
    for l, c in enumerate(counts):
        out.append((l, a, a + c))
        a += c
    return out


# ---------------------------------------------------------------- references (plain torch ops, float64)

def ref_grouped_mm(x, w, counts):
    rows = [x[a:b] @ w[l] for l, a, b in _slices(counts)]
    return torch.cat(rows) + 0.0 * w.sum() if rows else x @ w.sum(0)


def ref_gated_ffn(x, wg, wu, wd, counts, activation):
    phi = ACT64[activation]
    rows = [(phi(x[a:b] @ wg[l]) * (x[a:b] @ wu[l])) @ wd[l] for l, a, b in _slices(counts)]
    return torch.cat(rows) + 0.0 * (wg.sum() + wu.sum() + wd.sum())


def ref_lora_proj(base, x, tok, A, B, counts, s):
    rows = [base[tok[a:b]] + s * (x[a:b] @ A[l]) @ B[l] for l, a, b in _slices(counts)]
    return torch.cat(rows) + 0.0 * (A.sum() + B.sum())


def ref_moe_lora_hidden(gate, up, x, tok, w, ag, bg, au, bu, ad, counts, s):
    hs, zs = [], []
    for l, a, b in _slices(counts):
        t, x_l = tok[a:b], x[a:b]
        g = gate[t] + (s * (x_l @ ag[l]) @ bg[l] if ag is not None else 0.0)
        u = up[t] + (s * (x_l @ au[l]) @ bu[l] if au is not None else 0.0)
        h = F_.silu(g) * u  # [n_l, F]
        hs.append(h * w[a:b, None])
        if ad is not None:
            zs.append(w[a:b, None] * s * (h @ ad[l]))
    h_TF = torch.zeros_like(gate).index_add(0, tok, torch.cat(hs))
    for p in (ag, bg, au, bu, ad):
        if p is not None:
            h_TF = h_TF + 0.0 * p.sum()
    return h_TF, (torch.cat(zs) if ad is not None else None)


# ---------------------------------------------------------------- kernels

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_mm_kernel(counts, dtype):
    L, N = len(counts), sum(counts)
    x, w = _rand(N, H, dtype=dtype, seed=1), _rand(L, H, F, dtype=dtype, seed=2)
    kernel = lambda x_, w_: GroupedMM.apply(x_, w_, tuple(counts))  # noqa: E731
    _check(kernel, lambda x_, w_: ref_grouped_mm(x_, w_, counts), [x, w], dtype, [True, True])
    _check(lambda x_, w_: grouped_mm(x_, w_, counts), lambda x_, w_: ref_grouped_mm(x_, w_, counts), [x, w], dtype,
           [True, True])


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_gated_ffn_kernel(counts, dtype, activation):
    L, N = len(counts), sum(counts)
    x = _rand(N, H, dtype=dtype, seed=3)
    wg, wu, wd = _rand(L, H, F, dtype=dtype, seed=4), _rand(L, H, F, dtype=dtype, seed=5), _rand(L, F, H, dtype=dtype, seed=6)

    def kernel(*ts):
        return GroupedGatedFFN.apply(*ts, tuple(counts), GATED[activation], GATED_GRAD[activation])

    ref = lambda *ts: ref_gated_ffn(*ts, counts, activation)  # noqa: E731
    _check(kernel, ref, [x, wg, wu, wd], dtype, [True] * 4)
    _check(lambda *ts: grouped_ffn(*ts, counts, activation), ref, [x, wg, wu, wd], dtype, [True] * 4)
    _check(kernel, ref, [x, wg, wu, wd], dtype, [False, True, False, True])  # only some inputs need a gradient


def ref_gated_ffn_tokens(x, tok, w, wg, wu, wd, counts, activation):
    """The layer's unfused path: gather the pairs' rows, FFN per expert, weighted scatter-add per token."""
    y = ref_gated_ffn(x[tok], wg, wu, wd, counts, activation)  # [N, H]
    return torch.zeros_like(x).index_add(0, tok, y * w[:, None]) + 0.0 * w.sum()


def _pairs(counts, seed):
    """Token ids of the pairs (sorted by expert, at most one pair per token and expert) and combine weights."""
    g = torch.Generator().manual_seed(seed)
    if not sum(counts):
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    tok = torch.cat([torch.randperm(T, generator=g)[:c] for c in counts])
    return tok, torch.rand(sum(counts), generator=g) + 0.1


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 4], [1, 1, 1, 1], [7, 7], [0, 0, 0]])
def test_grouped_gated_ffn_tokens_kernel(counts, dtype, activation):
    """Token mode (gather and combine fused into the FFN) against gather + FFN + weighted scatter-add
    in float64: the [T, H] output (float32 for bf16 input) and the gradients of x, of the combine
    weights and of the three stacked weights."""
    tok, w = _pairs(counts, seed=9)
    L = len(counts)
    x = _rand(T, H, dtype=dtype, seed=1)
    ws = [_rand(L, H, F, dtype=dtype, seed=2), _rand(L, H, F, dtype=dtype, seed=3), _rand(L, F, H, dtype=dtype, seed=4)]
    act = (GATED[activation], GATED_GRAD[activation])
    out_dtype = torch.float32  # accumulate_dtype of fp32 and bf16
    y = GroupedGatedFFNTokens.apply(x, tok, w, *ws, tuple(counts), *act)
    assert y.shape == (T, H) and y.dtype == out_dtype

    def run(x_, w_, wg, wu, wd):
        return GroupedGatedFFNTokens.apply(x_, tok, w_, wg, wu, wd, tuple(counts), *act).to(dtype)

    def run_fn(x_, w_, wg, wu, wd):  # the public function
        return grouped_ffn_tokens(x_, tok, w_, wg, wu, wd, counts, activation).to(dtype)

    def ref(x_, w_, wg, wu, wd):
        return ref_gated_ffn_tokens(x_, tok, w_.to(x_.dtype), wg, wu, wd, counts, activation)

    _check(run, ref, [x, w, *ws], dtype, [True, False, True, True, True])
    _check(run_fn, ref, [x, w, *ws], dtype, [True, False, True, True, True])
    if dtype == torch.float32:  # the combine weights' gradient (fp32, as the router's)
        _check(lambda w_: run(x, w_, *ws), lambda w_: ref(x.double(), w_, *(t.double() for t in ws)), [w], dtype,
               [True])


def test_grouped_gated_ffn_tokens_gradcheck_and_forward_bitwise():
    """float64 gradcheck of every differentiable input; and the forward is bitwise the unfused
    layer path (the same mm per expert, the same products, added per token in the same order)."""
    counts = (3, 0, 5, 2)
    tok, w = _pairs(counts, seed=4)
    x = _rand(T, H, dtype=torch.float64, seed=1).requires_grad_()
    ws = [_rand(4, H, F, dtype=torch.float64, seed=s).mul_(0.5).requires_grad_() for s in (2, 3)] + [
        _rand(4, F, H, dtype=torch.float64, seed=4).mul_(0.5).requires_grad_()]
    act = (GATED["swiglu"], GATED_GRAD["swiglu"])
    w64 = w.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: GroupedGatedFFNTokens.apply(a[0], tok, a[1], *a[2:], counts, *act),
                                    (x, w64, *ws))
    x32, ws32 = x.detach().float(), [t.detach().float() for t in ws]
    fused = GroupedGatedFFNTokens.apply(x32, tok, w, *ws32, counts, *act)
    unfused = weighted_scatter_add(GroupedGatedFFN.apply(x32.index_select(0, tok), *ws32, counts, *act), w, tok, T)
    assert torch.equal(fused, unfused)


def test_grouped_gated_ffn_tokens_kept_grads_overwrite_then_add_bitwise():
    """With KeptGrads the token kernel writes into the kept `.grad` as the row kernel does: stale values
    overwritten (empty expert's slot zeroed), the next backward adds; equal to autograd's gradients."""
    counts = (3, 0, 5, 2)
    L = len(counts)
    tok, w = _pairs(counts, seed=2)
    ws = [_rand(L, H, F, dtype=torch.float32, seed=3), _rand(L, H, F, dtype=torch.float32, seed=4),
          _rand(L, F, H, dtype=torch.float32, seed=5)]
    inp, ref = [torch.nn.Parameter(t.clone()) for t in ws], [torch.nn.Parameter(t.clone()) for t in ws]
    kept = KeptGrads(inp)
    act = (GATED["swiglu"], GATED_GRAD["swiglu"])
    xs = [_rand(T, H, dtype=torch.float32, seed=s) for s in (6, 7, 8)]
    GroupedGatedFFNTokens.apply(xs[0], tok, w, *inp, counts, *act, kept).square().sum().backward()
    for p in inp:
        p.grad[1].fill_(7.0)
    kept.mark_stale()
    ptrs = [p.grad.data_ptr() for p in inp]
    GroupedGatedFFNTokens.apply(xs[1], tok, w, *inp, counts, *act, kept).square().sum().backward()
    GroupedGatedFFNTokens.apply(xs[1], tok, w, *ref, counts, *act).square().sum().backward()
    assert [p.grad.data_ptr() for p in inp] == ptrs and not kept.stale
    for p, q in zip(inp, ref):
        assert torch.equal(p.grad, q.grad) and not p.grad[1].any()
    GroupedGatedFFNTokens.apply(xs[2], tok, w, *inp, counts, *act, kept).square().sum().backward()
    GroupedGatedFFNTokens.apply(xs[2], tok, w, *ref, counts, *act).square().sum().backward()
    for p, q in zip(inp, ref):
        assert torch.equal(p.grad, q.grad)


def test_grouped_gated_ffn_tokens_holds_no_pair_rows():
    """The reason token mode exists: no [N, H] tensor in either direction. Forward saves only g and u
    (x is the caller's input, referenced); backward allocates the gradients (dx [T, H], dw [N] and
    the three stacked weights) and one expert's temporaries, all freed before the next expert's.
    Its highest point is dw's row dot: three [n_l, F] (phi(g), h, dh), one chunk of the dot's
    product ([min(n_l, 256), F]), two [n_l, H] (its x rows and dy rows) and the [n_l] dot.
    An [N, H] tensor (26 KB here) would not fit in the 1 KB slack."""
    g = torch.Generator().manual_seed(5)
    counts, Tm, Hm, Fm = (64, 48, 64, 32), 160, 32, 256
    N, L = sum(counts), len(counts)
    tok = torch.cat([torch.randperm(Tm, generator=g)[:c] for c in counts])
    w = (torch.rand(N, generator=g) + 0.1).requires_grad_()
    x = torch.randn(Tm, Hm, generator=g, requires_grad=True)
    ws = [torch.randn(*s, generator=g).mul_(0.1).requires_grad_() for s in ((L, Hm, Fm), (L, Hm, Fm), (L, Fm, Hm))]
    act = (GATED["swiglu"], GATED_GRAD["swiglu"])
    inputs = {t.untyped_storage().data_ptr() for t in (x, w, tok, *ws)}
    saved = _saved_bytes(lambda: GroupedGatedFFNTokens.apply(x, tok, w, *ws, counts, *act))
    assert sum(b for k, b in saved.items() if k not in inputs) == 2 * N * Fm * 4  # g and u
    y = GroupedGatedFFNTokens.apply(x, tok, w, *ws, counts, *act)
    peak = backward_peak_bytes(y, torch.randn(Tm, Hm, generator=g))
    grads = 4 * (Tm * Hm + N + 3 * L * Hm * Fm)
    n_l = max(counts)
    temp = 4 * n_l * (4 * Fm + 2 * Hm + 1)
    assert grads + temp - 1024 <= peak <= grads + temp + 1024, (peak, grads, temp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", COUNTS)
def test_gather_lora_proj_kernel(counts, dtype):
    L, N = len(counts), sum(counts)
    base, x = _rand(T, F, dtype=dtype, seed=7), _rand(N, H, dtype=dtype, seed=8)
    tok = torch.randint(0, T, (N,), generator=torch.Generator().manual_seed(9))
    A, B = _rand(L, H, R, dtype=dtype, seed=10), _rand(L, R, F, dtype=dtype, seed=11)
    ref = lambda b, x_, a, bb: ref_lora_proj(b, x_, tok, a, bb, counts, 0.5)  # noqa: E731
    kernel = lambda b, x_, a, bb: GatherLoRAProj.apply(b, x_, tok, a, bb, tuple(counts), 0.5)  # noqa: E731
    _check(kernel, ref, [base, x, A, B], dtype, [True] * 4)
    _check(lambda b, x_, a, bb: gather_lora_proj(b, x_, tok, a, bb, counts, 0.5), ref, [base, x, A, B], dtype, [True] * 4)
    _check(kernel, ref, [base, x, A, B], dtype, [False, False, True, True])  # frozen base, adapters train


@pytest.mark.parametrize("targets", [("gate", "up", "down"), ("up",), ("gate", "down")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", COUNTS)
def test_moe_lora_hidden_kernel(counts, dtype, targets):
    L, N = len(counts), sum(counts)
    gate, up, x = _rand(T, F, dtype=dtype, seed=12), _rand(T, F, dtype=dtype, seed=13), _rand(N, H, dtype=dtype, seed=14)
    tok = torch.randint(0, T, (N,), generator=torch.Generator().manual_seed(15))
    w = torch.rand(N, generator=torch.Generator().manual_seed(16)).to(dtype)
    full = dict(gate_A=_rand(L, H, R, dtype=dtype, seed=17), gate_B=_rand(L, R, F, dtype=dtype, seed=18),
                up_A=_rand(L, H, R, dtype=dtype, seed=19), up_B=_rand(L, R, F, dtype=dtype, seed=20),
                down_A=_rand(L, F, R, dtype=dtype, seed=21))
    lora = [full[k] if k.split("_")[0] in targets else None for k in MoELoRATensors._fields]

    def kernel(g, u, x_, w_, *ps):
        return moe_lora_hidden_apply(g, u, x_, tok, w_, MoELoRATensors(*ps), tuple(counts), 0.5, GATED["swiglu"],
                                     GATED_GRAD["swiglu"])

    def public(g, u, x_, w_, ag, bg, au, bu, ad):
        pairs = {"gate": (ag, bg), "up": (au, bu), "down": (ad, None)}
        return moe_lora_hidden(g, u, x_, tok, w_, {k: pairs[k] for k in targets}, counts, 0.5, "swiglu")

    ref = lambda g, u, x_, w_, *ps: ref_moe_lora_hidden(g, u, x_, tok, w_, *ps, counts, 0.5)  # noqa: E731
    inputs = [gate, up, x, w] + lora
    _check(kernel, ref, inputs, dtype, [t is not None for t in inputs])
    _check(public, ref, inputs, dtype, [t is not None for t in inputs])
    frozen = [False, False, False, False] + [t is not None for t in lora]  # training the adapters only
    _check(kernel, ref, inputs, dtype, frozen)


def test_zero_count_experts_get_zero_weight_gradients():
    """Slot l of a group without rows is zero (the kernels allocate with new_empty and must clear it)."""
    counts = (0, 3, 0)
    x = torch.randn(3, H)
    w = torch.full((3, H, F), float("nan")).requires_grad_(True)  # NaN in unused slots must not leak
    with torch.no_grad():
        w[1] = torch.randn(H, F)
    GroupedMM.apply(x, w, counts).sum().backward()
    assert torch.equal(w.grad[0], torch.zeros(H, F)) and torch.equal(w.grad[2], torch.zeros(H, F))
    wg, wu, wd = (torch.randn(3, H, F, requires_grad=True), torch.randn(3, H, F, requires_grad=True),
                  torch.randn(3, F, H, requires_grad=True))
    GroupedGatedFFN.apply(x, wg, wu, wd, counts, GATED["swiglu"], GATED_GRAD["swiglu"]).sum().backward()
    for p in (wg, wu, wd):
        assert torch.equal(p.grad[0], torch.zeros_like(p.grad[0])) and torch.equal(p.grad[2], torch.zeros_like(p.grad[2]))


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs (parameters excluded by the caller)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def test_gated_ffn_kernel_keeps_two_hidden_tensors():
    """The reason the kernel exists: it saves x, gate and up (2 [N, F]) where plain autograd keeps more."""
    counts, N = (5, 0, 7, 4), 16
    x = torch.randn(N, H)
    ws = [torch.randn(4, H, F, requires_grad=True), torch.randn(4, H, F, requires_grad=True),
          torch.randn(4, F, H, requires_grad=True)]
    params = {p.untyped_storage().data_ptr() for p in ws}
    act = lambda seen: sum(b for k, b in seen.items() if k not in params)  # noqa: E731
    fused = act(_saved_bytes(lambda: GroupedGatedFFN.apply(x.requires_grad_(True), *ws, counts, GATED["swiglu"],
                                                           GATED_GRAD["swiglu"])))
    plain = act(_saved_bytes(lambda: ref_gated_ffn(x, *ws, counts, "swiglu")))
    assert fused == (N * H + 2 * N * F) * 4
    assert plain >= (N * H + 4 * N * F) * 4


# ---------------------------------------------------------------- dispatch and GradSlots

def test_choose_path_table():
    bf16 = torch.bfloat16
    x, w = torch.randn(4, 16), torch.randn(3, 16, 32)
    assert choose_path("mm", x, (w,), [1, 1, 2]) is Path.FUSED  # row 7
    assert choose_path("mm", x.to(bf16), (w.to(bf16),), [1, 1, 2]) is Path.GROUPED_MM  # row 2 (bf16 on CPU)
    assert choose_path("mm", x.to(bf16)[:, :7], (w.to(bf16)[:, :7],), [1, 1, 2]) is not Path.GROUPED_MM  # 14 bytes
    assert choose_path("mm", x, (w,), torch.tensor([1, 1, 2])) is Path.GROUPED_MM  # row 1
    assert choose_path("mm", x[:0], (w,), [0, 0, 0]) is Path.AUTOGRAD  # row 3
    assert choose_path("ffn", x, (w, w.to(torch.float64)), [1, 1, 2], "swiglu") is Path.AUTOGRAD  # row 4
    assert choose_path("mm", x, (w[:1],), [4]) is Path.AUTOGRAD  # row 5
    assert choose_path("lora_proj", x, (w[:1],), [4]) is Path.FUSED  # row 5: LoRA kernels run one group too
    assert choose_path("ffn", x, (w,), [1, 1, 2], "gelu") is Path.AUTOGRAD  # row 6
    assert choose_path("lora_proj", x, (w,), [1, 1, 2], None) is Path.FUSED
    assert choose_path("ffn", x, (w,), [1, 1, 2], "swiglu") is Path.FUSED
    assert choose_path("lora_hidden", x, (w,), None, "geglu") is Path.FUSED
    with pytest.raises(ValueError, match="op="):
        choose_path("attention", x, (w,), [1, 1, 2])
    with pytest.raises(ValueError, match="host counts"):
        choose_path("lora_proj", x, (w,), torch.tensor([1, 1, 2]))


def test_grad_slots_map_names_to_positions():
    g = GradSlots(("x", "w", "counts"), (True, False, False))
    assert g.wants("x") and not g.wants("w")
    t = torch.ones(2)
    g["x"] = t
    assert g.as_tuple() == (t, None, None)
    with pytest.raises(KeyError, match="no input named 'y'"):
        g["y"] = t
    with pytest.raises(ValueError, match="2 names for 3 inputs"):
        GradSlots(("a", "b"), (True, True, True))


def test_grouped_mm_rejects_mixed_dtypes_and_bad_counts():
    x, w = torch.randn(4, H), torch.randn(2, H, F, dtype=torch.float64)
    with pytest.raises(ValueError, match="x is torch.float32 but w is torch.float64"):
        grouped_mm(x, w, [2, 2])
    with pytest.raises(ValueError, match=r"grouped_ffn: counts \[2, 1\] do not match 2 groups and 4 rows"):
        grouped_ffn(x, None, w.float(), w.float().transpose(1, 2), [2, 1], "gelu")


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any op returns while active (numel)."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_gated_ffn_weight_grads_in_place_equal_autograd_bitwise_and_allocate_nothing():
    """grad_params: the weight gradients are added into the Parameters' existing .grad (bitwise what
    autograd's `grad += new` gives, over two accumulations), the kernel returns None for them, and no
    [L, H, F] tensor is allocated in backward; a Parameter without a .grad gets a new one as before."""
    counts = (3, 0, 5, 2)
    L, N = len(counts), sum(counts)
    xs = [_rand(N, H, dtype=torch.float32, seed=s) for s in (1, 2)]
    ws = [_rand(L, H, F, dtype=torch.float32, seed=3), _rand(L, H, F, dtype=torch.float32, seed=4),
          _rand(L, F, H, dtype=torch.float32, seed=5)]
    ref = [torch.nn.Parameter(w.clone()) for w in ws]
    inp = [torch.nn.Parameter(w.clone()) for w in ws]
    kept = KeptGrads(inp)
    act = (GATED["swiglu"], GATED_GRAD["swiglu"])
    for i, x in enumerate(xs):
        GroupedGatedFFN.apply(x, *ref, counts, *act).square().sum().backward()
        if i == 0:  # first backward: no .grad yet -> new tensors (as autograd), then kept
            GroupedGatedFFN.apply(x, *inp, counts, *act, kept).square().sum().backward()
            ptrs = [p.grad.data_ptr() for p in inp]
            continue
        y = GroupedGatedFFN.apply(x, *inp, counts, *act, kept).square().sum()
        with _LargestOutput() as big:
            y.backward()
        assert 0 < big.numel < L * H * F, big.numel  # no [L, H, F] gradient allocated in backward
        assert [p.grad.data_ptr() for p in inp] == ptrs
    for p, q in zip(inp, ref):
        assert torch.equal(p.grad, q.grad)
    # through grouped_ffn, with x's gradient unchanged
    x = xs[0].clone().requires_grad_(True)
    x2 = xs[0].clone().requires_grad_(True)
    for p, q in zip(inp, ref):
        p.grad.zero_()
        q.grad = None
    grouped_ffn(x, *inp, counts, "swiglu", kept).sum().backward()
    grouped_ffn(x2, *ref, counts, "swiglu").sum().backward()
    assert torch.equal(x.grad, x2.grad)
    for p, q in zip(inp, ref):
        assert torch.equal(p.grad, q.grad)


def test_expert_slice_grads_in_place_equal_autograd_indexing_bitwise():
    """ExpertSlice: per-expert slices of a stacked weight whose gradients go into the kept .grad:
    bitwise what autograd's indexing gives over two accumulating backwards (experts 0 and 2 used,
    1 unused: its slot stays zero), the first backward allocates .grad, later ones reuse it."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4, 5))
    ref = torch.nn.Parameter(w.detach().clone())
    x = torch.randn(6, 4)
    ptrs = []
    for step in range(2):
        (x @ ExpertSlice.apply(w, 0, w)).pow(2).sum().add((x @ ExpertSlice.apply(w, 2, w)).sin().sum()).backward()
        (x @ ref[0]).pow(2).sum().add((x @ ref[2]).sin().sum()).backward()
        assert torch.equal(w.grad, ref.grad), step
        ptrs.append(w.grad.data_ptr())
    assert len(set(ptrs)) == 1 and torch.equal(w.grad[1], torch.zeros(4, 5)) and w.grad[0].abs().sum() > 0


def test_gated_ffn_stale_kept_grads_are_overwritten_bitwise():
    """KeptGrads.mark_stale() (the runner's zero_grad): the next backward writes the weight gradients
    over last step's values (bitwise a fresh autograd gradient, empty experts' slots exact zeros) with
    no [L, H, F] allocation; a second backward in the step adds (gradient accumulation, bitwise
    autograd's grad += new); the unfused path (no rows) zeroes stale gradients before autograd adds."""
    counts = (3, 0, 5, 2)
    L, N = len(counts), sum(counts)
    xs = [_rand(N, H, dtype=torch.float32, seed=s) for s in (1, 2, 6)]
    ws = [_rand(L, H, F, dtype=torch.float32, seed=3), _rand(L, H, F, dtype=torch.float32, seed=4),
          _rand(L, F, H, dtype=torch.float32, seed=5)]
    inp = [torch.nn.Parameter(w.clone()) for w in ws]
    kept = KeptGrads(inp)
    act = (GATED["swiglu"], GATED_GRAD["swiglu"])
    GroupedGatedFFN.apply(xs[0], *inp, counts, *act, kept).square().sum().backward()  # allocates .grad
    for p in inp:
        p.grad[1].fill_(7.0)  # last step's values, also in the empty expert's slot
    kept.mark_stale()
    ptrs = [p.grad.data_ptr() for p in inp]
    with _LargestOutput() as big:
        GroupedGatedFFN.apply(xs[1], *inp, counts, *act, kept).square().sum().backward()
    assert 0 < big.numel < L * H * F, big.numel
    assert not kept.stale and [p.grad.data_ptr() for p in inp] == ptrs
    ref = [torch.nn.Parameter(w.clone()) for w in ws]
    GroupedGatedFFN.apply(xs[1], *ref, counts, *act).square().sum().backward()
    for p, q in zip(inp, ref):
        assert torch.equal(p.grad, q.grad) and not p.grad[1].any()
    GroupedGatedFFN.apply(xs[2], *inp, counts, *act, kept).square().sum().backward()  # accumulates
    GroupedGatedFFN.apply(xs[2], *ref, counts, *act).square().sum().backward()
    for p, q in zip(inp, ref):
        assert torch.equal(p.grad, q.grad)
    kept.mark_stale()
    x0 = xs[0][:0].clone().requires_grad_(True)  # no rows: the unfused path
    grouped_ffn(x0, *inp, (0,) * L, "swiglu", kept).sum().backward()
    assert not kept.stale and all(not p.grad.any() for p in inp)


def test_expert_slice_fresh_slots_overwrite_then_add():
    """ExpertSlice with `fresh`: the slots in it are overwritten (stale values gone, bitwise a fresh
    autograd gradient) and leave the set, so a second use in the step adds."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(3, 4, 5))
    w.grad = torch.full_like(w, 9.0)  # last step's values
    ref = torch.nn.Parameter(w.detach().clone())
    x = torch.randn(6, 4)
    fresh = {0, 2}
    (x @ ExpertSlice.apply(w, 0, w, fresh)).pow(2).sum().add((x @ ExpertSlice.apply(w, 2, w, fresh)).sin().sum()).backward()
    (x @ ref[0]).pow(2).sum().add((x @ ref[2]).sin().sum()).backward()
    assert fresh == set() and torch.equal(w.grad[0], ref.grad[0]) and torch.equal(w.grad[2], ref.grad[2])
    assert torch.equal(w.grad[1], torch.full((4, 5), 9.0))  # not fresh, not used: the caller zeroes it
    (x @ ExpertSlice.apply(w, 0, w, fresh)).sum().backward()
    (x @ ref[0]).sum().backward()
    assert torch.equal(w.grad[0], ref.grad[0])


# ------------------------------------------------------------------ backward memory
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_ffn_backward_holds_two_expert_temporaries(activation):
    """Backward allocates the gradients (dx, dWg, dWu, dWd) and, beside them, at most two [n_l, F]
    temporaries of one expert: h, dh and dg share one, phi(g) and du the other, and an expert's
    are freed before the next expert's. (It held up to four, two experts' at once, before.)"""
    g = torch.Generator().manual_seed(5)
    counts, Hm, Fm = (64, 48, 64, 32), 32, 256
    N, L = sum(counts), len(counts)
    x = torch.randn(N, Hm, generator=g, requires_grad=True)
    ws = [torch.randn(*s, generator=g).mul_(0.1).requires_grad_() for s in ((L, Hm, Fm), (L, Hm, Fm), (L, Fm, Hm))]
    y = GroupedGatedFFN.apply(x, *ws, counts, GATED[activation], GATED_GRAD[activation])
    peak = backward_peak_bytes(y, torch.randn(N, Hm, generator=g))
    grads = 4 * (N * Hm + 3 * L * Hm * Fm)  # dx and the three stacked weight gradients
    temp = 4 * max(counts) * Fm  # one [n_l, F] block of the largest expert
    assert grads + 2 * temp - 1024 <= peak <= grads + 2 * temp + 1024, (peak, grads, temp)
