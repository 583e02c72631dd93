"""The shared LoRA expert of LoRA-MoE (`lora.shared_rank`, issue 14 study row `lora_moe_shared`).

Routed expert k's projection is W x + S x + D_k x, S = (alpha / r_s) A_S B_S the shared adapter, and
the frozen-FFN path (every token; dropped pairs) is W + S. Checked here:

1. one MoE layer against a hand-written fp64 forward (FFN math written out with torch ops from the
   module's weights; routing and capacity from the loop reference `tests/moe_reference.py`), with
   capacity dropping and dropless, on the fused EP-1 path, its non-kernel branch and the per-pair
   path; gradients of x and of S included;
2. shared_rank=0 adds no tensor and changes no initial value or output (the same model with S at its
   B = 0 start gives bitwise the same logits);
3. EP invariance (2 gloo processes, EP 1 and 2 against one process holding all experts,
   `tests/ep_helpers.py`): S is replicated and averaged over the world;
4. checkpoint saved at EP 2 (after training with Adam), loaded at EP 1: weights and Adam state equal
   an uninterrupted single-process run; S saved once, under a layout-independent name;
5. the Hugging Face export folds S into every expert exactly (transformers' logits);
6. config errors (one line naming lora.shared_rank);
7. lifelong tools: adapter/trainable params, moe.freeze_experts leaves S training, extract (adapter
   and --domain), grow, merge and lorahub's factor list keep S.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F_

from moedist.moe import MoELayer, MoELoRAExperts, Router
from tests.moe_reference import ref_capacity, ref_keep, ref_route
from tests.test_moe_layer import NoFused

ROOT = Path(__file__).resolve().parents[1]
E, H, FF, R, RS, ALPHA = 4, 6, 8, 2, 3, 4.0
TOL = dict(atol=1e-5, rtol=1e-5)


def _experts(activation="swiglu", shared_rank=RS, targets=("gate", "up", "down"), dropout=0.0, seed=2):
    m = MoELoRAExperts(E, H, FF, R, lora_alpha=ALPHA, lora_dropout=dropout, targets=targets, activation=activation,
                       init_std=0.4, seed=seed, shared_rank=shared_rank)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # B = 0 at initialisation would hide the adapters
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return m


def _layer(experts, cf, fused=True, K=2):
    router = Router(H, E, K, init_std=0.7, seed=1)
    return MoELayer(router, experts if fused else NoFused(experts), capacity_factor=cf, drop_policy="position")


def _x(T=12, seed=5):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def ref_shared_moe(x, m: MoELoRAExperts, router_w, K, cf, activation, targets):
    """y_t = sum over kept (t, k) of w FFN_{W+S+D_e}(x_t) + (1 - sum of kept w) FFN_{W+S}(x_t), fp64, by hand."""
    d = torch.float64
    W = {"gate": m.w_gate, "up": m.w_up, "down": m.w_down}
    W = {k: None if v is None else v.detach().to(d) for k, v in W.items()}
    A = {t: m.lora[t].lora_A.to(d) for t in targets if t in m.lora}
    B = {t: m.lora[t].lora_B.to(d) for t in targets if t in m.lora}
    SA = {t: m.lora_shared[t].lora_A.to(d) for t in targets if t in m.lora_shared}   # with autograd: grads of S
    SB = {t: m.lora_shared[t].lora_B.to(d) for t in targets if t in m.lora_shared}
    s, s_shared = ALPHA / R, ALPHA / RS

    def proj(name, v, e):  # v [I] -> [O]
        y = v @ W[name]
        if name in SA:
            y = y + s_shared * ((v @ SA[name]) @ SB[name])
        if e is not None and name in A:
            y = y + s * ((v @ A[name][e]) @ B[name][e])
        return y

    def ffn(v, e):
        if activation == "swiglu":
            g = proj("gate", v, e)
            h = g * torch.sigmoid(g) * proj("up", v, e)
        else:  # exact gelu
            u = proj("up", v, e)
            h = 0.5 * u * (1.0 + torch.erf(u / 2.0 ** 0.5))
        return proj("down", h, e)

    x64 = x.to(d)
    T = x.shape[0]
    r = ref_route(x64, {"weight": router_w.detach().to(d), "bias": None, "noise_weight": None}, K)  # w(x): x's grad
    keep, _ = ref_keep(r["idx"], r["w"], E, ref_capacity(T, E, K, cf), "position")
    rows = []
    for t in range(T):
        y, kept_w = 0.0, 0.0
        for k in range(K):
            if keep[t][k]:
                w = r["w"][t][k]
                y = y + w * ffn(x64[t], r["idx"][t][k])
                kept_w += w
        rows.append(y + (1.0 - kept_w) * ffn(x64[t], None))
    return torch.stack(rows), keep


# ---------------------------------------------------------------- 1. hand-written reference

@pytest.mark.parametrize("activation,fused", [("swiglu", True), ("gelu", True), ("swiglu", False), ("gelu", False)])
@pytest.mark.parametrize("cf", [0.5, None])
def test_layer_matches_hand_written_reference(activation, fused, cf):
    targets = ("gate", "up", "down")
    m = _experts(activation)
    assert m.shared_scaling == ALPHA / RS and sorted(m.lora_shared) == (["down", "gate", "up"] if activation == "swiglu"
                                                                         else ["down", "up"])
    layer = _layer(m, cf, fused)
    x = _x()
    y, aux = layer(x)
    want, keep = ref_shared_moe(x, m, layer.router.weight, 2, cf, activation, targets)
    if cf is not None:
        assert int(aux.dropped_per_expert.sum()) > 0 and not all(all(kk) for kk in keep)  # capacity really dropped
    torch.testing.assert_close(y.double(), want.detach(), **TOL)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    (y * gy).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    want2, _ = ref_shared_moe(x_ref, m, layer.router.weight, 2, cf, activation, targets)
    shared = [p for n, p in m.named_parameters() if n.startswith("lora_shared.")]
    grads = torch.autograd.grad((want2 * gy.double()).sum(), [x_ref] + shared)
    torch.testing.assert_close(x.grad.double(), grads[0].double(), **TOL)
    for p, g in zip(shared, grads[1:]):
        torch.testing.assert_close(p.grad.double(), g.double(), **TOL)
    # and S really contributes (the reference without it differs)
    with torch.no_grad():
        for p in shared:
            if p.shape[0] == RS:
                p.zero_()
    assert not torch.allclose(layer(x)[0], y, atol=1e-3)


def test_fused_kernel_path_is_taken():
    """The fp32 swiglu layer without dropout runs the per-expert fused kernel (ffn.moe_lora_hidden)."""
    m = _experts()
    assert m._fused_ok(torch.zeros(3, H))


def test_targets_subset_and_base_weights():
    """Only the targeted projections get S; base_weights() = W + s_S A_S B_S there, W elsewhere."""
    m = _experts(targets=("up",))
    assert sorted(m.lora_shared) == ["up"]
    ws = m.base_weights()
    sh = m.lora_shared["up"]
    torch.testing.assert_close(ws["up"], m.w_up + (ALPHA / RS) * sh.lora_A @ sh.lora_B)
    assert torch.equal(ws["gate"], m.w_gate) and torch.equal(ws["down"], m.w_down)
    x = _x()
    y, _ = _layer(m, None)(x)
    want, _ = ref_shared_moe(x, m, _layer(m, None).router.weight, 2, None, "swiglu", ("up",))
    torch.testing.assert_close(y.double(), want.detach(), **TOL)


def test_shared_factors_are_replicated_and_layout_independent():
    """Not expert-tagged (world-averaged, never sharded); the same values at every EP layout and after meta init."""
    from moedist.distributed import is_expert_param
    from moedist.models.parallelize import shard_experts_

    m = _experts()
    names = {n for n, p in m.named_parameters() if n.startswith("lora_shared.")}
    assert names == {f"lora_shared.{t}.lora_{f}" for t in ("gate", "up", "down") for f in "AB"}
    assert not any(is_expert_param(p) for n, p in m.named_parameters() if n in names)
    a = MoELoRAExperts(E, H, FF, R, lora_alpha=ALPHA, shared_rank=RS, seed=2)
    b = MoELoRAExperts(E, H, FF, R, lora_alpha=ALPHA, shared_rank=RS, seed=2, num_local=2, first_expert=2)
    with torch.device("meta"):
        c = MoELoRAExperts(E, H, FF, R, lora_alpha=ALPHA, shared_rank=RS, seed=2)
    c.to_empty(device="cpu")
    c.init_weights()
    shard_experts_(a, 1, 2)
    for n in names:
        pa, pb, pc = (dict(x.named_parameters())[n] for x in (a, b, c))
        assert torch.equal(pa, pb) and torch.equal(pa, pc), n
    A = a.lora_shared["up"].lora_A
    assert A.abs().max() <= (1.0 / H) ** 0.5 and A.abs().max() > 0 and not a.lora_shared["up"].lora_B.any()
    assert not torch.equal(A, a.lora["up"].lora_A[0])   # its own stream, not expert 0's


# ---------------------------------------------------------------- 2. shared_rank=0 adds nothing

def test_shared_rank_zero_model_has_no_new_tensors():
    from moedist.config import load_config
    from moedist.models.build import build_model

    ovr = ["model.hidden_size=32", "model.ffn_size=48", "model.num_heads=4", "model.num_kv_heads=2",
           "moe.num_experts=4", "lora.mode=moe_lora", "lora.rank=4"]
    off, on = build_model(load_config(None, ovr)), build_model(load_config(None, ovr + ["lora.shared_rank=2"]))
    assert not [n for n in off.state_dict() if "lora_shared" in n]
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra == {f"layers.{i}.mlp.experts.lora_shared.{t}.lora_{f}" for i in range(2)
                     for t in ("gate", "up", "down") for f in "AB"}
    for n, t in off.state_dict().items():   # S starts at B = 0: everything else (and the output) unchanged
        assert torch.equal(t, on.state_dict()[n]), n
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(off(ids).logits, on(ids).logits)


# ---------------------------------------------------------------- 3. EP invariance

@pytest.mark.timeout(300)
def test_ep_invariance_with_shared_lora_expert():
    from tests.ep_helpers import EPConfig, run_and_check

    cfgs = [EPConfig("moelora_sharedlora_k2_cf1.0", experts="moelora", K=2, cf=1.0, shared_rank=3, seed=501),
            EPConfig("moelora_sharedlora_k1_dropless", experts="moelora", K=1, cf=None, shared_rank=2, seed=502),
            EPConfig("moelora_sharedlora_relu_k2_cf0.5", experts="moelora", K=2, cf=0.5, shared_rank=2,
                     activation="relu", shared=True, seed=503)]
    run = run_and_check(2, cfgs, (1, 2))
    assert run["n"] == 12 and not run["errs"], "\n".join(m for _, m in run["errs"][:25])
    # S moved (it trains), and it is what the reference trained
    ref = run["refs"][cfgs[0].name]
    moved = [n for n in ref["init"] if "lora_shared" in n and not torch.equal(ref["init"][n], ref["steps"][-1]["weights"][n])]
    assert len(moved) == 6


# ---------------------------------------------------------------- 4. checkpoint EP 2 -> EP 1

CK_OVR = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "model.ffn_size=32",
          "moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=null", "moe.aux_loss_coef=0.01", "train.seed=3",
          "lora.mode=moe_lora", "lora.rank=2", "lora.shared_rank=3", "lora.alpha=4"]


def _ckpt_worker(rank, world, root):
    from moedist.checkpoint import get_torch_optimizer_state, save_checkpoint
    from moedist.config import load_config
    from moedist.distributed import ParallelDims
    from tests.test_checkpoint import _fresh, _train

    dims = ParallelDims(world, 2, rank).build()
    model, opt = _fresh(load_config(None, CK_OVR), dims)
    losses = _train(model, opt, dims, range(3))
    save_checkpoint(Path(root) / "ep2", model, step=3, dims=dims, optim_state=get_torch_optimizer_state(model, opt))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_shared" in n}


def _single_step(model, opt, step):
    """One process, both ranks' halves of the global batch as separate micro-batches (the aux loss is per rank)."""
    from tests.test_checkpoint import _batch

    loss = sum(model(ids, labels=ids).loss for ids in (_batch(step, 2, r) for r in range(2))) / 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.timeout(300)
def test_checkpoint_saved_at_ep2_resumes_at_ep1(tmp_path):
    from safetensors import safe_open

    from moedist.checkpoint import load_checkpoint, read_manifest, set_torch_optimizer_state
    from moedist.config import load_config
    from moedist.models import build_model
    from tests._dist import run_workers

    (losses, s0), (_, s1) = run_workers(_ckpt_worker, 2, args=(str(tmp_path),))
    assert len(s0) == 12 and all(torch.equal(s0[n], s1[n]) for n in s0)   # replicated stays identical
    cfg = load_config(None, CK_OVR)
    ref = build_model(cfg)
    ref_opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    ref_losses = [_single_step(ref, ref_opt, s) for s in range(3)]
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(losses, ref_losses)), (losses, ref_losses)
    loaded = build_model(cfg)
    opt = torch.optim.Adam([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    ck = load_checkpoint(tmp_path / "ep2", loaded)
    set_torch_optimizer_state(loaded, opt, ck.optim_state)
    want = dict(ref.named_parameters())
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, want[n], **TOL, msg=n)
    assert not torch.equal(want["layers.0.mlp.experts.lora_shared.up.lora_B"], torch.zeros(3, 32))   # S trained
    _single_step(ref, ref_opt, 3), _single_step(loaded, opt, 3)   # Adam state came back too
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, want[n], **TOL, msg=n)
    m = read_manifest(tmp_path / "ep2")
    with safe_open(str(tmp_path / "ep2" / "model-dense.safetensors"), "pt") as f:
        dense = set(f.keys())
    experts = set()
    for name in ("model-experts-ep0.safetensors", "model-experts-ep1.safetensors"):
        with safe_open(str(tmp_path / "ep2" / name), "pt") as f:
            experts |= set(f.keys())
    assert "layers.1.mlp.experts.lora_shared.down.lora_A" in dense   # once, by name, not per expert / rank
    assert not [k for k in experts if "lora_shared" in k] and "layers.1.mlp.experts.3.lora.down.lora_A" in experts
    assert m["layout"]["ep_size"] == 2


# ---------------------------------------------------------------- 5. Hugging Face export

@pytest.mark.parametrize("extra,expected", [([], "mixtral"), (["model.moe_every=2"], "qwen2_moe")])
def test_hf_export_folds_the_shared_expert(extra, expected, tmp_path):
    from moedist.config import load_config
    from moedist.models import build_model, to_hf
    from tests.test_hf_export import NATIVE, hf_logits, load_hf, our_logits, perturb

    model = build_model(load_config(None, NATIVE + ["lora.mode=moe_lora", "lora.shared_rank=3"] + extra))
    perturb(model, std=0.05)    # adapters (S included: 'lora_' in its names) and routers
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
    ours = our_logits(model, ids)
    assert to_hf(model, tmp_path)["model_type"] == expected
    torch.testing.assert_close(hf_logits(load_hf(tmp_path), ids), ours, atol=1e-4, rtol=0)
    with torch.no_grad():   # S matters at this scale, so an export that ignored it would fail above
        for n, p in model.named_parameters():
            if "lora_shared" in n and n.endswith("lora_B"):
                p.zero_()
    assert (our_logits(model, ids) - ours).abs().max() > 1e-3


# ---------------------------------------------------------------- 6. config errors

@pytest.mark.parametrize("overrides,message", [
    (["lora.shared_rank=2"], "lora.shared_rank=2: a shared LoRA expert needs lora.mode=moe_lora (got lora.mode='none')"),
    (["lora.shared_rank=2", "lora.mode=expert_lora"], "lora.shared_rank=2: a shared LoRA expert needs lora.mode=moe_lora"),
    (["lora.shared_rank=-1", "lora.mode=moe_lora"], "lora.shared_rank=-1: must be >= 0"),
])
def test_config_errors_name_the_key(overrides, message, tmp_path):
    from moedist.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    p = subprocess.run([sys.executable, "-m", "moedist", "train", *overrides, f"train.output_dir={tmp_path}/out"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"moedist: error: {err.value}"], p.stderr
    assert not (tmp_path / "out").exists()


def test_good_config_and_init_from_carries_it():
    from moedist.config import load_config
    from moedist.train.init_from import LORA_ARCH

    cfg = load_config(None, ["lora.mode=moe_lora", "lora.shared_rank=8"])
    assert cfg.lora.shared_rank == 8 and load_config(None, []).lora.shared_rank == 0
    assert "shared_rank" in LORA_ARCH   # a run initialised from a shared-LoRA checkpoint rebuilds S


# ---------------------------------------------------------------- 7. lifelong tools

def _lifelong_cfg(root: Path) -> dict:
    from tests._lifelong import base_cfg, write_domains

    cfg = base_cfg(write_domains(root / "text"), str(root / "cache"), freeze_experts=[1, 5])
    cfg["lora"] = {"mode": "moe_lora", "rank": 2, "shared_rank": 3}
    cfg["train"]["micro_batch_size"], cfg["train"]["grad_accum"] = 4, 2
    return cfg


def _shared(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_shared" in n}


def test_lifelong_tools_keep_the_shared_expert(tmp_path, capsys):
    from moedist.checkpoint.cli import main_extract, main_merge
    from moedist.checkpoint.grow import main_grow
    from moedist.checkpoint.io import read_manifest, save_checkpoint
    from moedist.config import config_from_dict
    from moedist.merge.cli import main as main_methods, read_state, trained_keys
    from moedist.models.build import adapter_params, build_model, trainable_params
    from moedist import cli
    from moedist.config import save_config
    from moedist.train.freeze import frozen_slices
    from tests.test_extract_domain import _load

    cfg_dict = _lifelong_cfg(tmp_path)
    cfg = config_from_dict(cfg_dict)
    model = build_model(cfg)
    s_ids = {id(p) for n, p in model.named_parameters() if "lora_shared" in n}
    assert len(s_ids) == 12 and s_ids <= {id(p) for p in adapter_params(model)} <= {id(p) for p in trainable_params(model)}
    assert not [s.name for s in frozen_slices(model, [1, 5]) if "lora_shared" in s.name]
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    # train 2 steps with experts 1 and 5 frozen: S trains, the frozen experts' adapters do not
    cfg_dict["train"]["output_dir"] = str(tmp_path / "run")
    save_config(config_from_dict(cfg_dict), tmp_path / "run.yaml")
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 0
    full, _ = _load(tmp_path / "run" / "final")
    after = dict(full.named_parameters())
    assert all(not torch.equal(after[n], init[n]) for n in init if "lora_shared" in n and n.endswith("lora_B"))
    for n in init:
        if ".lora.up.lora_B" in n:
            assert torch.equal(after[n][[1, 5]], init[n][[1, 5]]) and not torch.equal(after[n], init[n]), n
    S = _shared(full)
    # extract --domain and grow keep S bitwise
    assert main_extract([str(tmp_path / "run"), "--domain", "code", str(tmp_path / "code")]) == 0
    assert main_grow([str(tmp_path / "run"), "--add-experts", "2", "--group", "prose", str(tmp_path / "grown")]) == 0
    for out in ("code", "grown"):
        got = _shared(_load(tmp_path / out)[0])
        assert got.keys() == S.keys() and all(torch.equal(got[n], S[n]) for n in S), out
    # adapter-only extract holds S; merged back into the base it gives the full model back
    assert main_extract([str(tmp_path / "run"), str(tmp_path / "adapter")]) == 0
    assert "layers.0.mlp.experts.lora_shared.up.lora_A" in read_manifest(tmp_path / "adapter")["index"]
    save_checkpoint(tmp_path / "base", build_model(cfg), step=0, config=copy.deepcopy(cfg_dict))
    assert main_merge([str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), str(tmp_path / "merged")]) == 0
    merged = dict(_load(tmp_path / "merged")[0].named_parameters())
    assert all(torch.equal(merged[n], p) for n, p in after.items())
    # merge methods treat S like any trained tensor; lorahub combines its factors with the LoRA ones
    assert main_methods(["--method", "average", str(tmp_path / "run"), str(tmp_path / "merged"),
                         str(tmp_path / "avg"), "--no-eval"]) == 0
    avg = read_state("x", str(tmp_path / "avg"))[2]
    assert torch.allclose(avg["layers.0.mlp.experts.lora_shared.up.lora_B"], S["layers.0.mlp.experts.lora_shared.up.lora_B"])
    keys = trained_keys(full)
    assert {n for n in S} <= set(keys)   # lorahub's factor list: keys ending in lora_A / lora_B
