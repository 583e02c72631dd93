"""The one LoRA primitive (moedist.moe.lora, issue 15 item 4): dense (L = 1) and stacked forms against
hand-written formulas, adapter_params, seeded dropout, and the names every LoRA mode keeps."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from moedist.distributed.grad_sync import is_expert_param
from moedist.moe.lora import (AdapterModule, LoRA, SeededDropout, is_lora_factor_key, kaiming_uniform_a5,
                              lora_dropout, model_adapter_params)

ROOT = Path(__file__).resolve().parents[1]


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _fill(lora: LoRA, seed: int) -> LoRA:
    with torch.no_grad():   # B is zero at the start: give it values so the update is not trivially 0
        lora.lora_A.copy_(_rand(*lora.lora_A.shape, seed=seed))
        lora.lora_B.copy_(_rand(*lora.lora_B.shape, seed=seed + 1))
    return lora


# ------------------------------------------------------------------ dense (L = 1)

def test_dense_linear_is_xWt_plus_scaled_BA_of_dropped_x_by_hand():
    from moedist.models.lora import LoRALinear

    I, O, r, p, seed = 5, 3, 2, 0.4, 11
    base = nn.Linear(I, O, bias=True, dtype=torch.float64)
    lin = LoRALinear(base, r, alpha=6.0, dropout=p, seed=seed)
    _fill(lin, 1)
    assert tuple(lin.lora_A.shape) == (r, I) and tuple(lin.lora_B.shape) == (O, r)   # nn.Linear / PEFT orientation
    x = _rand(7, I, seed=2)
    lin.train()
    y = lin(x)
    # by hand: the mask is U >= p with U from a CPU generator seeded seed + 4099, kept values / (1 - p)
    u = torch.rand(7, I, generator=torch.Generator().manual_seed(seed + 4099))
    xd = x * (u >= p).double() / (1 - p)
    W, b, A, B = base.weight.detach(), base.bias.detach(), lin.lora_A.detach(), lin.lora_B.detach()
    want = x @ W.T + b + (6.0 / r) * (xd @ A.T @ B.T)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    lin.eval()
    torch.testing.assert_close(lin(x), x @ W.T + b + 3.0 * (x @ A.T @ B.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.merged_weight(), W + 3.0 * (B @ A), rtol=1e-12, atol=1e-12)


def test_dense_math_layout_delta_and_merged_by_hand():
    lora = _fill(LoRA(6, 4, 3, dtype=torch.float64), 3)
    assert tuple(lora.lora_A.shape) == (6, 3) and tuple(lora.lora_B.shape) == (3, 4)
    x = _rand(5, 6, seed=4)
    A, B = lora.lora_A.detach(), lora.lora_B.detach()
    torch.testing.assert_close(lora.delta(x), sum(torch.outer(x[:, i], A[i]) for i in range(6)) @ B)
    torch.testing.assert_close(lora.merged(), A @ B)
    x32 = x.float()   # the update runs in the factors' dtype whatever x's is
    assert lora.delta(x32).dtype == torch.float64


def test_lora_B_starts_at_zero_and_A_is_kaiming_uniform_a5():
    lora = LoRA(16, 8, 4)
    assert torch.count_nonzero(lora.lora_B) == 0
    g = torch.Generator().manual_seed(5)
    A = kaiming_uniform_a5((16, 4), 16, g)
    assert A.abs().max() <= 1 / math.sqrt(16) and A.abs().max() > 0.8 / math.sqrt(16)
    lora.reset_(A)
    assert torch.equal(lora.lora_A, A) and torch.count_nonzero(lora.lora_B) == 0


# ------------------------------------------------------------------ stacked (L experts)

@pytest.mark.parametrize("counts", [[3, 0, 4], [0, 0, 5], [2, 2, 2]])
def test_stacked_delta_with_counts_equals_a_per_expert_loop(counts):
    L, I, O, r = 3, 5, 4, 2
    lora = _fill(LoRA(I, O, r, num_stacked=L, expert=True, dtype=torch.float64), 7)
    assert tuple(lora.lora_A.shape) == (L, I, r) and tuple(lora.lora_B.shape) == (L, r, O)
    N = sum(counts)
    x = _rand(N, I, seed=8)
    got = lora.delta(x, counts)
    rows, start = [], 0
    for l, n in enumerate(counts):   # by hand: expert l's rows times its own A[l] B[l]
        for row in range(start, start + n):
            rows.append(torch.stack([sum(x[row, i] * lora.lora_A[l, i, k] for i in range(I)) for k in range(r)])
                        @ lora.lora_B[l])
        start += n
    torch.testing.assert_close(got, torch.stack(rows).detach())
    for l in range(L):
        torch.testing.assert_close(lora.merged(l), lora.lora_A[l] @ lora.lora_B[l])
    got.sum().backward()   # an expert with no rows gets an exact zero gradient
    for l, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(lora.lora_A.grad[l]) == 0 and torch.count_nonzero(lora.lora_B.grad[l]) == 0


def test_stacked_factors_are_expert_tagged_and_dense_ones_are_not():
    st, dense = LoRA(4, 4, 2, num_stacked=2, expert=True), LoRA(4, 4, 2)
    assert is_expert_param(st.lora_A) and is_expert_param(st.lora_B)
    assert not is_expert_param(dense.lora_A) and not is_expert_param(dense.lora_B)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(rank=0), "lora_rank=0"),
    (dict(rank=2, num_stacked=2, layout="linear"), "layout='linear'"),
    (dict(rank=2, layout="peft"), "layout='peft'"),
    (dict(rank=2, expert=True), "expert=True"),
])
def test_bad_arguments_name_themselves(kwargs, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        LoRA(4, 4, **kwargs)


def test_stacked_delta_needs_counts():
    with pytest.raises(ValueError, match="counts_L"):
        LoRA(4, 4, 2, num_stacked=2).delta(torch.zeros(3, 4))


# ------------------------------------------------------------------ adapter_params

def test_adapter_params_of_the_primitive_and_the_owners():
    from moedist.models.llama import DenseFFN
    from moedist.models.lora import LoRAFFN
    from moedist.moe import LoRAOnExperts, MoELoRAExperts

    lora = LoRA(4, 3, 2)
    assert isinstance(lora, AdapterModule) and lora.adapter_params() == [lora.lora_A, lora.lora_B]
    ffn = LoRAFFN(DenseFFN(8, 12, "swiglu", 0.02, 1), 2, targets=("gate", "down"))
    assert [n for n, p in ffn.named_parameters() if any(p is q for q in ffn.adapter_params())] == \
        ["lora_A_gate", "lora_B_gate", "lora_A_down", "lora_B_down"]
    moe = MoELoRAExperts(4, 8, 12, 2, shared_rank=3)
    names = [n for n, p in moe.named_parameters() if any(p is q for q in moe.adapter_params())]
    assert names == [f"{grp}.{t}.lora_{f}" for grp in ("lora", "lora_shared") for t in ("gate", "up", "down") for f in "AB"]
    on = LoRAOnExperts(4, 8, 12, 2, targets=("up",))
    assert [n for n, p in on.named_parameters() if any(p is q for q in on.adapter_params())] == ["lora.up.lora_A", "lora.up.lora_B"]
    assert is_lora_factor_key("layers.1.mlp.experts.7.lora.up.lora_A") and not is_lora_factor_key("layers.0.mlp.lora_A_up")


MODES = {
    "none": [],
    "moe_lora": ["layers.1.mlp.experts.lora.gate.lora_A"],
    "moe_lora_shared": ["layers.1.mlp.experts.lora.gate.lora_A", "layers.1.mlp.experts.lora_shared.down.lora_B"],
    "expert_lora": ["layers.1.mlp.experts.lora.down.lora_B"],
    "full": ["layers.0.self_attn.q_proj.lora_A", "layers.0.mlp.lora_A_gate", "layers.1.mlp.experts.lora.up.lora_A"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_model_adapters_are_the_lora_names_of_every_mode(mode):
    """The model's adapters (declared by its AdapterModules) are exactly the parameters named lora_A/lora_B
    (the rule before the primitive), their names and shapes as the checkpoints on disk hold them."""
    from moedist.config import load_config
    from moedist.models.build import adapter_params, build_model

    ovr = ["model.hidden_size=16", "model.ffn_size=24", "model.num_heads=2", "model.num_kv_heads=2", "model.num_layers=2",
           "model.moe_every=2", "moe.num_experts=4", "lora.rank=2"]
    ovr += {"moe_lora_shared": ["lora.mode=moe_lora", "lora.shared_rank=3"]}.get(mode, [f"lora.mode={mode}"])
    model = build_model(load_config(None, ovr))
    named = dict(model.named_parameters())
    declared = [n for n, p in named.items() if any(p is q for q in adapter_params(model))]
    assert declared == [n for n in named if "lora_A" in n or "lora_B" in n]
    assert [id(p) for p in model_adapter_params(model)] == [id(p) for p in adapter_params(model)]
    assert set(MODES[mode]) <= set(declared)
    trainable = [n for n, p in named.items() if p.requires_grad]
    if mode == "none":
        assert trainable == list(named)
    else:   # adapters train; besides them only what the lora section asks for (routers by default)
        assert set(declared) <= set(trainable) and all(".router." in n for n in set(trainable) - set(declared))
    shapes = {n: tuple(p.shape) for n, p in named.items()}
    want = {"layers.0.self_attn.q_proj.lora_A": (2, 16), "layers.0.mlp.lora_A_gate": (16, 2),
            "layers.1.mlp.experts.lora.gate.lora_A": (4, 16, 2), "layers.1.mlp.experts.lora.up.lora_A": (4, 16, 2),
            "layers.1.mlp.experts.lora.down.lora_B": (4, 2, 16), "layers.1.mlp.experts.lora_shared.down.lora_B": (3, 16)}
    for n in MODES[mode]:
        assert shapes[n] == want[n], n


# ------------------------------------------------------------------ dropout

def test_lora_dropout_is_seeded_and_leaves_the_global_rng_alone():
    x = torch.ones(64, 8)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = lora_dropout(x, 0.25, True, torch.Generator().manual_seed(3))
    b = lora_dropout(x, 0.25, True, torch.Generator().manual_seed(3))
    c = lora_dropout(x, 0.25, True, torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    u = torch.rand(64, 8, generator=torch.Generator().manual_seed(3))   # by hand
    assert torch.equal(a, (u >= 0.25).float() / 0.75)
    xr = _rand(64, 8, seed=1, dtype=torch.float32)   # bitwise: kept values divided by (1 - p), as every LoRA mode did
    kept = (torch.rand(64, 8, generator=torch.Generator().manual_seed(3)) >= 0.1).float()
    assert torch.equal(lora_dropout(xr, 0.1, True, torch.Generator().manual_seed(3)), xr * kept / 0.9)
    assert lora_dropout(x, 0.25, False, torch.Generator()) is x and lora_dropout(x, 0.0, True, torch.Generator()) is x


def test_seeded_dropout_module_masks_by_hand_and_per_call():
    x = torch.ones(32, 4)
    d1, d2 = SeededDropout(0.5, 9), SeededDropout(0.5, 9)
    first, second = d1(x), d1(x)
    assert torch.equal(first, d2(x)) and torch.equal(second, d2(x)) and not torch.equal(first, second)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(first, x * (torch.rand(32, 4, generator=g) >= 0.5).float() * 2.0)
    xr = _rand(32, 4, seed=2, dtype=torch.float32)   # bitwise: times 1 / (1 - p), as moedist.layers always did
    kept = (torch.rand(32, 4, generator=torch.Generator().manual_seed(5)) >= 0.1).float()
    assert torch.equal(SeededDropout(0.1, 5)(xr), xr * kept * (1.0 / 0.9))
    d1.eval()
    assert d1(x) is x
    assert torch.equal(SeededDropout(1.0, 0)(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="lora_dropout_rate"):
        SeededDropout(1.5, 0)


# ------------------------------------------------------------------ layering

def _imports(path: Path):
    """(module, at top level?) for every `from moedist... import` / `import moedist...` in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moedist"):
            out.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("moedist")]
    return out


def test_layers_import_moe_at_module_level_and_moe_never_imports_layers():
    layers = list((ROOT / "moedist" / "layers").glob("*.py"))
    found = [(p.name, m, top) for p in layers for m, top in _imports(p)]
    assert not [f for f in found if not f[2]], "lazy imports in moedist/layers"
    assert {m for _, m, _ in found if m.startswith("moedist.moe")} >= {"moedist.moe.lora", "moedist.moe.router",
                                                                       "moedist.moe.dispatcher"}
    for p in (ROOT / "moedist" / "moe").rglob("*.py"):
        assert not [m for m, _ in _imports(p) if m.startswith("moedist.layers")], p.name
    src = "\n".join(p.read_text() for p in layers)
    assert "specs/" not in src   # the contract is stated in the docstrings, not cited from outside the repository
