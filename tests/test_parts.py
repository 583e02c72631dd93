"""Declared parts (issue 15 item 1): experts and dispatchers say what they are (`moedist.moe.parts`),
`parallelize()` checks them once, and no code in moe/, train/ or checkpoint/ picks a path by
`hasattr` / `getattr`-with-default probing (an AST rule with a short, reasoned allow-list)."""
import ast
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from moedist.bench.cases import _BenchExperts, _PerPairExperts, _UnfusedMoELoRAExperts
from moedist.checkpoint.keys import expert_modules, param_slots
from moedist.models.parallelize import parallelize
from moedist.moe import GroupedExperts, LoRAOnExperts, MoELayer, MoELoRAExperts, Router, TokenDispatcher
from moedist.moe.parts import (DeviceCountExperts, Dispatcher, Experts, FrozenBaseExperts, FusedLocalExperts,
                               check_part, has_capability)

PKG = Path(__file__).resolve().parents[1] / "moedist"
E, H, F, K, R = 4, 6, 8, 2, 2

# Capabilities each concrete class declares, written out by hand (the reference).
CAPS = (FusedLocalExperts, FrozenBaseExperts, DeviceCountExperts)
EXPECTED = {
    "GroupedExperts": {DeviceCountExperts, FusedLocalExperts},
    "LoRAOnExperts": {DeviceCountExperts, FusedLocalExperts},
    "MoELoRAExperts": {FusedLocalExperts, FrozenBaseExperts},
    "_UnfusedMoELoRAExperts": {FusedLocalExperts, FrozenBaseExperts},
    "_BenchExperts": {FusedLocalExperts},
    "_PerPairExperts": set(),
}


def _experts():
    g = GroupedExperts(E, H, F)
    m = MoELoRAExperts(E, H, F, R)
    return {"GroupedExperts": g, "LoRAOnExperts": LoRAOnExperts(E, H, F, R), "MoELoRAExperts": m,
            "_UnfusedMoELoRAExperts": _UnfusedMoELoRAExperts(E, H, F, R),
            "_BenchExperts": _BenchExperts(g, "plain"), "_PerPairExperts": _PerPairExperts(m)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_concrete_experts_declare_the_protocol(name):
    m = _experts()[name]
    assert Experts in type(m).__mro__  # declared, not only structurally alike
    assert isinstance(m, Experts)
    check_part(m, Experts, name)
    assert (m.num_experts, m.num_local, m.first_expert) == (E, E, 0)
    assert {c for c in CAPS if isinstance(m, c)} == EXPECTED[name]
    assert {c for c in CAPS if c in type(m).__mro__} == EXPECTED[name]


def test_token_dispatcher_declares_the_protocol_and_owns_its_stats():
    d = TokenDispatcher(E)
    assert Dispatcher in type(d).__mro__ and isinstance(d, Dispatcher)
    check_part(d, Dispatcher, "dispatcher")
    with pytest.raises(AttributeError):
        d.last_stats = {}  # read-only: only the dispatcher writes it
    idx = torch.tensor([[0, 3], [3, 1], [2, 3]])  # [T=3, K=2]
    keep = torch.tensor([[True, True], [False, True], [True, True]])
    perm = d.permute_local(idx, keep)
    assert perm.counts_host == [1, 1, 1, 2]  # hand count of the kept pairs per expert
    assert perm.token_N.tolist() == [0, 1, 2, 0, 2]  # by expert, then flat pair order
    assert dict(d.last_stats) == dict(a2a_rows=0, a2a_bytes=0, a2a_bytes_remote=0)
    two = TokenDispatcher(E, comm=_Comm(2, 0))
    with pytest.raises(ValueError, match="EP size 1"):
        two.permute_local(idx, keep)


class _Comm:
    def __init__(self, size, rank):
        self.size, self.rank = size, rank


def test_fused_path_leaves_stats_to_the_dispatcher():
    layer = MoELayer(Router(H, E, K, seed=1), MoELoRAExperts(E, H, F, R, seed=2))
    assert layer.dispatcher.last_stats == {}
    layer(torch.randn(2, 3, H))
    assert dict(layer.dispatcher.last_stats) == dict(a2a_rows=0, a2a_bytes=0, a2a_bytes_remote=0)


def test_capabilities_are_asked_of_the_class_declared_or_not():
    class Wrapper(nn.Module):  # declares nothing; has base_forward (as the test wrappers of test_moe_layer)
        def forward(self, x_NH, counts_L):
            return x_NH

        def base_forward(self, x_TH):
            return x_TH

    w = Wrapper()
    assert has_capability(w, FrozenBaseExperts) and not has_capability(w, FusedLocalExperts)
    for name, m in _experts().items():
        assert {c for c in CAPS if has_capability(m, c)} == EXPECTED[name]


def test_the_layer_checks_the_layout_again_after_a_part_is_replaced():
    layer = MoELayer(Router(H, E, K, seed=1), GroupedExperts(E, H, F))
    x = torch.randn(2, 3, H)
    layer(x)
    layer.dispatcher = TokenDispatcher(E, comm=_Comm(2, 1))  # rank 1 of 2 holds experts [2, 4); these hold [0, 4)
    with pytest.raises(ValueError, match="experts hold 4 local experts, the dispatcher expects 2"):
        layer(x)
    ex = GroupedExperts(E, H, F, num_local=2, first_expert=0)
    layer.experts = ex
    with pytest.raises(ValueError, match="experts start at global id 0, the dispatcher's rank holds experts from 2"):
        layer(x)
    with pytest.raises(ValueError, match="the dispatcher expects 4"):
        MoELayer(Router(H, E, K, seed=1), ex)


def test_a_declared_capability_must_be_implemented():
    class Half(nn.Module, Experts, FusedLocalExperts):  # declares the fused path, forgets it
        num_experts, num_local, first_expert = E, E, 0

        def forward(self, x_NH, counts_L):
            return x_NH

    with pytest.raises(TypeError, match="forward_tokens"):
        Half()


class _NoLayout(nn.Module):
    """Computes like experts but does not say which experts it holds (no first_expert)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.num_experts, self.num_local = inner, inner.num_experts, inner.num_local

    def forward(self, x_NH, counts_L):
        return self.inner(x_NH, counts_L)


def _model(experts) -> nn.Module:
    return nn.ModuleDict({"block": nn.ModuleDict({"mlp": MoELayer(Router(H, E, K, seed=1), experts)})})


def test_parallelize_rejects_experts_missing_a_member():
    model = _model(_NoLayout(GroupedExperts(E, H, F)))
    with pytest.raises(TypeError) as err:
        parallelize(model, _Comm(1, 0))
    msg = str(err.value)
    assert msg == "block.mlp.experts: _NoLayout is not a moedist.moe.parts.Experts: missing first_expert"


def test_parallelize_rejects_a_dispatcher_missing_a_member_and_a_bad_layout_type():
    class OldDispatcher:  # the layout and dispatch/combine, but no permute_local and no last_stats
        num_experts, num_local_experts, first_expert, ep_size = E, E, 0, 1

        def dispatch(self, *a):
            raise AssertionError

        def combine(self, *a):
            raise AssertionError

    model = _model(GroupedExperts(E, H, F))
    model["block"]["mlp"].dispatcher = OldDispatcher()
    with pytest.raises(TypeError, match=r"^block\.mlp\.dispatcher: OldDispatcher is not a moedist\.moe\.parts\."
                                        r"Dispatcher: missing last_stats, permute_local$"):
        parallelize(model, _Comm(1, 0))
    ex = GroupedExperts(E, H, F)
    model = _model(ex)
    ex.first_expert = 0.0
    with pytest.raises(TypeError, match=r"^block\.mlp\.experts: GroupedExperts\.first_expert=0\.0: must be an int$"):
        parallelize(model, _Comm(1, 0))


def test_parallelize_accepts_declared_parts_and_shards():
    ex = GroupedExperts(E, H, F)
    model = parallelize(_model(ex), _Comm(2, 1))
    assert (ex.num_local, ex.first_expert) == (2, 2)
    d = model["block"]["mlp"].dispatcher
    assert isinstance(d, TokenDispatcher) and (d.ep_size, d.first_expert) == (2, 2)


def test_checkpoint_keys_find_the_declared_experts():
    model = nn.ModuleDict({"a": _model(MoELoRAExperts(E, H, F, R)), "b": _model(GroupedExperts(E, H, F)),
                           "c": _model(_NoLayout(GroupedExperts(E, H, F)))})
    # the wrapper without a layout is not an expert module; the GroupedExperts inside it is
    assert sorted(expert_modules(model)) == ["a.block.mlp.experts", "b.block.mlp.experts", "c.block.mlp.experts.inner"]
    slots = param_slots(nn.ModuleDict({"a": model["a"], "b": model["b"]}))
    assert sorted(slots) == ["a.block.mlp.experts.lora.down.lora_A", "a.block.mlp.experts.lora.down.lora_B",
                             "a.block.mlp.experts.lora.gate.lora_A", "a.block.mlp.experts.lora.gate.lora_B",
                             "a.block.mlp.experts.lora.up.lora_A", "a.block.mlp.experts.lora.up.lora_B",
                             "b.block.mlp.experts.w_down", "b.block.mlp.experts.w_gate", "b.block.mlp.experts.w_up"]


def test_deepspeed_sees_a_marker_child_and_the_layer_keeps_its_class():
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import has_moe_layers

    from moedist.train import deepspeed_setup as dss

    model = _model(GroupedExperts(E, H, F))
    keys = sorted(model.state_dict())
    assert has_moe_layers(model) == (False, 0)
    dss.prepare_model(model, 1, 1)
    layer = model["block"]["mlp"]
    assert type(layer) is MoELayer
    marker = getattr(layer, dss.MARKER_NAME)
    assert isinstance(marker, MoE) and has_moe_layers(model) == (True, E)
    assert (marker.ep_size, marker.num_local_experts, marker.expert_group_name) == (1, E, "ep_size_1")
    assert sorted(model.state_dict()) == keys and not list(marker.parameters())
    assert all(p.allreduce is False and p.group_name == "ep_size_1" for p in layer.experts.parameters())
    assert not hasattr(layer.router.weight, "allreduce")
    assert type(pickle.loads(pickle.dumps(marker))) is type(marker)
    with pytest.raises(RuntimeError, match="never runs"):
        marker(torch.zeros(1, H))
    y, _ = layer(torch.randn(2, 3, H))  # the layer's own forward still runs
    assert y.shape == (2, 3, H)


# ------------------------------------------------------------------ the no-probing rule

PROBED_FOLDERS = ("moe", "train", "checkpoint")
# The probes left, by the attribute they read: none is on an experts module or a dispatcher.
ALLOWED = {
    "_grouped_mm": "torch feature probe: the private grouped-GEMM op exists only in newer torch builds",
    "ds_id": "DeepSpeed ZeRO-3 marks the parameters it partitioned with ds_id",
    "ds_shape": "DeepSpeed ZeRO-3: a partitioned parameter's full shape",
    "ds_tensor": "DeepSpeed ZeRO-3: a partitioned parameter's local partition",
    "optimizer": "DeepSpeed wraps the torch optimizer (ZeRO/bf16 wrappers have .optimizer, a plain one not)",
    "param_groups": "DeepSpeed optimizer wrappers: only some expose param_groups",
    "fp32_partitioned_groups_flat": "DeepSpeed ZeRO-3 optimizer internals (absent at other stages)",
    "_lazy_init_hp_params_optimizer_state": "DeepSpeed ZeRO-1/2 / bf16 optimizer internals (absent elsewhere)",
    "config": "argparse namespace: only some subcommands define the option",
    "overrides": "argparse namespace: only some subcommands define the option",
    "overwrite": "argparse namespace: only some subcommands define the option",
    "name": "signal module: which signals exist depends on the platform (name from a fixed list)",
}


def _probes(path: Path):
    """(line, call, attribute) of every hasattr(...) and getattr(..., default) in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) + len(node.keywords) >= 3):
            a = node.args[1] if len(node.args) > 1 else None
            attr = a.value if isinstance(a, ast.Constant) else ast.unparse(a) if a is not None else "?"
            out.append((node.lineno, node.func.id, attr))
    return out


def _offenders(pkg: Path) -> list:
    return [f"{p.relative_to(pkg.parent)}:{line} {fn}(..., {attr!r})"
            for folder in PROBED_FOLDERS for p in sorted((pkg / folder).rglob("*.py"))
            for line, fn, attr in _probes(p) if attr not in ALLOWED]


def test_no_hasattr_or_getattr_default_dispatch_left():
    assert _offenders(PKG) == []


def test_the_probe_rule_sees_a_probe(tmp_path):
    bad = tmp_path / "moedist" / "moe"
    bad.mkdir(parents=True)
    (bad / "x.py").write_text("def f(ex, p):\n    if hasattr(ex, 'forward_tokens'):\n        return 1\n"
                              "    return getattr(ex, 'num_local', 4) + getattr(p, 'ds_id', 0) + getattr(ex, 'w')\n")
    assert _offenders(tmp_path / "moedist") == ["moedist/moe/x.py:2 hasattr(..., 'forward_tokens')",
                                                "moedist/moe/x.py:4 getattr(..., 'num_local')"]
