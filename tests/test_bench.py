"""`moedist bench`: JSON schema of `bench layer`, all-to-all byte counts against hand
formulas, moedist == DeepSpeed native MoE on the same weights (dropless), the CPU
memory tracker, the skewed routing, the sweep fit, `bench ep` in 2 processes and
`bench train`, the fair-harness pieces (same expert FFN for every impl, useful FLOPs against hand counts
and the matmuls that run, reshuffled order, repeats), the bf16 CPU smoke test and `bench train --peer
autoep`. Tiny shapes: a few minutes on a loaded 2-core machine."""
import json
import math
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from moedist.bench import peers  # noqa: E402
from moedist.bench.cli import main  # noqa: E402
from moedist.bench.layer import LayerBenchConfig, make_inputs, run_layer_sweep  # noqa: E402
from moedist.bench.memory import measure_step_memory  # noqa: E402
from moedist.bench.timing import linear_fit, percentile  # noqa: E402
from moedist.moe import GroupedExperts, MoELayer, Router  # noqa: E402
from tests._dist import run_workers  # noqa: E402

T, H, F, E = 64, 16, 24, 4
ROW_FIELDS = {"impl", "mode", "fwd_ms", "fwd_bwd_ms", "fwd_ms_p10", "fwd_ms_p90", "fwd_bwd_ms_p10", "fwd_bwd_ms_p90",
              "peak_mem_mb", "act_mem_mb", "a2a_bytes", "tokens_per_s", "rows_executed", "capacity", "ratios"}


def _routing_counts(cfg: LayerBenchConfig) -> torch.Tensor:
    """Pairs per expert from an independent router run on the bench's inputs."""
    x, _, w = make_inputs(cfg, torch.device("cpu"), torch.float32)
    logits = x @ w.t()
    idx = torch.softmax(logits, -1).topk(cfg.topk, dim=-1).indices
    return torch.bincount(idx.reshape(-1), minlength=cfg.experts)


def test_layer_json_schema_and_a2a_bytes(tmp_path):
    out = tmp_path / "layer.json"
    plot = tmp_path / "layer.png"
    rc = main(["layer", "--tokens", str(T), "--hidden", str(H), "--ffn", str(F), "--experts", str(E), "--iters", "1",
               "--warmup", "1", "--capacity-factor", "1.0", "--json", str(out), "--plot", str(plot),
               "--profile", "moedist/capacity"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert {"config", "results", "routing", "environment", "checks", "targets"} <= set(res)
    assert res["config"]["tokens"] == T and res["config"]["experts"] == E
    rows = {(r["impl"], r["mode"]): r for r in res["results"]}
    assert set(rows) == {("moedist", "capacity"), ("moedist", "dropless"), ("deepspeed", "capacity"),
                         ("deepspeed", "dropless"), ("fairscale", "capacity"), ("dense", "-"),
                         ("floor", "capacity"), ("floor", "dropless")}
    for r in res["results"]:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["fwd_bwd_ms_p10"] <= r["fwd_bwd_ms"] <= r["fwd_bwd_ms_p90"]
        assert r["peak_mem_mb"] > 0 and r["act_mem_mb"] > 0
        at_peak = res["memory_at_peak"][f"{r['impl']}/{r['mode']}/{r['ffn']}"]  # what made up the peak
        assert sum(at_peak["live_mb"].values()) == pytest.approx(r["peak_mem_mb"]) and at_peak["op"].startswith("aten.")
    assert plot.stat().st_size > 1000
    assert {r["ffn"] for r in res["results"]} == {"plain", "recompute"}  # default: both FFNs, every impl
    assert len(res["results"]) == 2 * 8
    for r in res["results"]:
        assert r["fwd_bwd_ms_min"] <= r["fwd_bwd_ms_q25"] <= r["fwd_bwd_ms"] <= r["fwd_bwd_ms_q75"] <= r["fwd_bwd_ms_max"]
        assert len(r["fwd_bwd_ms_repeat_medians"]) == r["repeats"] == 3 and r["samples"] == 3 * 1
        assert r["useful_tflops"] == pytest.approx(r["model_tflops"])
    for ffn in ("plain", "recompute"):
        prof = res["profiles"][f"moedist/capacity/{ffn}"]
        assert prof[-1]["op"] == "(other ops)" and abs(sum(p["share"] for p in prof) - 1.0) < 1e-6
        assert any(p["op"] == "aten::mm" for p in prof)
        # ratios compare rows of the same FFN only
        md = next(r for r in res["results"] if (r["impl"], r["mode"], r["ffn"]) == ("moedist", "capacity", ffn))
        ds = next(r for r in res["results"] if (r["impl"], r["mode"], r["ffn"]) == ("deepspeed", "capacity", ffn))
        assert md["ratios"]["fwd_bwd_vs_deepspeed"] == pytest.approx(md["fwd_bwd_ms"] / ds["fwd_bwd_ms"])

    cfg = LayerBenchConfig(tokens=T, hidden=H, ffn=F, experts=E, capacity_factor=1.0)
    counts = _routing_counts(cfg)
    C = max(4, math.ceil(1.0 * T * 2 / E))
    kept_cap = int(torch.clamp(counts, max=C).sum())
    # moedist sends kept pairs only; DeepSpeed and fairscale send their whole [E, C, H] buffer
    assert rows[("moedist", "capacity")]["a2a_bytes"] == kept_cap * H * 4
    assert rows[("moedist", "dropless")]["a2a_bytes"] == T * 2 * H * 4
    assert rows[("deepspeed", "capacity")]["capacity"] == C
    assert rows[("deepspeed", "capacity")]["a2a_bytes"] == E * C * H * 4
    assert rows[("deepspeed", "dropless")]["a2a_bytes"] == E * int(counts.max()) * H * 4
    assert rows[("fairscale", "capacity")]["a2a_bytes"] == E * (2 * T // E) * H * 4
    assert rows[("moedist", "dropless")]["rows_executed"] == T * 2
    # same weights and routing: dropless outputs agree
    assert res["checks"]["dropless"]["max_rel_diff"] < 1e-5


@pytest.mark.parametrize("top_k", [1, 2])
def test_moedist_equals_deepspeed_dropless(top_k):
    """Same router and expert weights, no drops: outputs and every gradient equal."""
    created = peers.ensure_process_group(torch.device("cpu"))
    try:
        torch.manual_seed(0)
        x = torch.randn(T, H)
        g = torch.randn(T, H)
        router = Router(H, E, top_k, renormalize=top_k > 1, seed=3)
        experts = GroupedExperts(E, H, F, init_std=0.3, seed=4)
        ours = MoELayer(router, experts, capacity_factor=None)
        ds = peers.DeepSpeedMoE(router.weight.detach(), experts, top_k, None, drop_tokens=False, min_capacity=0)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, _ = ours(x1)
        y2 = ds(x2)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(router.weight.grad, ds.moe.deepspeed_moe.gate.wg.weight.grad, atol=1e-5, rtol=1e-5)
        for e, blk in enumerate(ds.moe.deepspeed_moe.experts.deepspeed_experts):
            torch.testing.assert_close(experts.w_down.grad[e], blk.w_down.grad, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(experts.w_gate.grad[e], blk.w_gate.grad, atol=1e-5, rtol=1e-5)
        assert ds.capacity == int(torch.bincount(router(x).idx_TK.reshape(-1), minlength=E).max())
    finally:
        peers.teardown_process_group(created)


def test_memory_tracker_counts_saved_activations():
    x = torch.randn(128, 32, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    m = measure_step_memory(lambda: torch.relu(x @ w), lambda y: y.backward(torch.ones_like(y)), torch.device("cpu"))
    # after forward only relu's output [128, 64] is alive (x @ w is freed, relu saves its result)
    assert m["act_mem_mb"] * 2**20 == 128 * 64 * 4
    # peak: relu out + ones + relu grad (3 x [128, 64]) + grad w [32, 64] + grad x [128, 32]
    assert m["peak_mem_mb"] * 2**20 == 3 * 128 * 64 * 4 + 32 * 64 * 4 + 128 * 32 * 4
    # ... reached in the second gradient matmul; what was live then, by the op that allocated it
    assert m["peak_at"] == "aten.mm.default"
    live = {op: mb * 2**20 for op, mb in m["peak_live_mb"].items()}
    assert live == {"aten.relu.default": 128 * 64 * 4, "aten.ones_like.default": 128 * 64 * 4,
                    "aten.threshold_backward.default": 128 * 64 * 4, "aten.mm.default": 32 * 64 * 4 + 128 * 32 * 4}
    kept = measure_step_memory(lambda: torch.relu(x @ w), lambda y: y.backward(torch.ones_like(y)),
                               torch.device("cpu"), resident_bytes=2**20)
    assert kept["peak_live_mb"]["(kept between steps)"] == 1.0
    assert sum(kept["peak_live_mb"].values()) == pytest.approx(kept["peak_mem_mb"]) == m["peak_mem_mb"] + 1.0


def test_skewed_routing_reaches_target():
    cfg = LayerBenchConfig(tokens=2048, hidden=32, ffn=32, experts=16, topk=2, skew=6.0)
    counts = _routing_counts(cfg).float()
    assert 5.0 <= float(counts.max() / counts.mean()) <= 7.0
    flat = _routing_counts(LayerBenchConfig(tokens=2048, hidden=32, ffn=32, experts=16)).float()
    assert float(flat.max() / flat.mean()) < 2.0


def test_sweep_rows_and_linear_fit():
    cfg = LayerBenchConfig(hidden=H, ffn=F, experts=E, iters=1, warmup=0, impls=("moedist", "dense"),
                           modes=("capacity",), memory=False, ffn_impls=("recompute",), repeats=1)
    res = run_layer_sweep(cfg, tokens=(64, 128, 256), experts=(2, 4))
    assert {r["sweep"] for r in res["results"]} == {"tokens", "experts"}
    assert sorted(r["tokens"] for r in res["results"] if r["sweep"] == "tokens" and r["impl"] == "dense") == [64, 128, 256]
    assert set(res["fits"]) == {"moedist/capacity", "dense/-"}
    assert linear_fit([1, 2, 3], [2, 4, 6])["r2"] == pytest.approx(1.0)
    assert percentile([1, 2, 3, 4], 50) == 2.5


def test_cli_rejects_bad_flags(capsys):
    assert main(["layer", "--experts", "8", "--skew", "9"]) == 2
    assert "--skew" in capsys.readouterr().err
    assert main(["layer", "--impls", "moedist,megablocks"]) == 2
    assert "--impls" in capsys.readouterr().err
    assert main(["layer", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
    for bad in (["--ffn", "fast"], ["--ffn-impl", "fast"]):
        with pytest.raises(SystemExit) as e:
            main(["layer"] + bad)
        assert e.value.code == 2 and "fast" in capsys.readouterr().err


def test_ffn_flag_takes_a_size_or_an_implementation():
    from moedist.bench.cli import build_parser

    a = build_parser().parse_args(["layer", "--ffn", "512", "--ffn", "plain"])
    assert a.ffn == 512 and a.ffn_impl == ["plain"]
    a = build_parser().parse_args(["layer", "--ffn", "recompute"])
    assert a.ffn == 1024 and a.ffn_impl == ["recompute"]
    assert build_parser().parse_args(["layer"]).ffn_impl == ["plain", "recompute"]  # default: both
    assert build_parser().parse_args(["layer", "--ffn-impl", "both"]).ffn_impl == ["plain", "recompute"]


def _ep_worker(rank, world):
    from moedist.bench.ep import run_ep_bench

    cfg = LayerBenchConfig(tokens=64, hidden=H, ffn=F, experts=4, iters=1, warmup=0, impls=("moedist", "deepspeed"),
                           modes=("capacity", "dropless"), threads=1)
    return run_ep_bench(cfg)


def test_bench_ep_two_processes():
    res = run_workers(_ep_worker, world_size=2)[0]
    rows = {(r["impl"], r["mode"]): r for r in res["results"]}
    # dropless: every pair travels once; the dispatch payload is T*K rows per rank
    assert rows[("moedist", "dropless")]["a2a_bytes"] == 2 * 64 * 2 * H * 4
    assert 0 < rows[("moedist", "dropless")]["a2a_bytes_remote"] < rows[("moedist", "dropless")]["a2a_bytes"]
    for r in res["results"]:
        assert len(r["per_rank"]) == 2 and r["a2a_ms"] > 0 and r["rows_recv_imbalance"] >= 1.0
        assert r["ffn"] == "recompute"  # both impls keep gate/up and recompute h
    C = rows[("deepspeed", "capacity")]["per_rank"][0]["capacity"]
    assert rows[("deepspeed", "capacity")]["a2a_bytes"] == 2 * 4 * C * H * 4


def test_bench_train_tiny(tmp_path):
    out = tmp_path / "train.json"
    cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
    rc = main(["train", "--config", cfg, "--steps", "2", "--warmup", "0", "--zero-stage", "1", "--set",
               f"train.output_dir={tmp_path}", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    impls = [r["impl"] for r in res["results"]]
    assert impls == ["moedist", "deepspeed"]
    for r in res["results"]:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss_last"])
    # same weights, same first batch: the first losses agree closely (DeepSpeed's aux loss differs a little)
    a, b = (r["loss_first"] for r in res["results"])
    assert abs(a - b) < 0.05


def test_cached_allocator_and_report(tmp_path):
    """--cpu-allocator cached applies in a fresh process; `bench report` renders a JSON as markdown."""
    import subprocess
    import sys

    code = "from moedist.bench.memory import use_cached_cpu_allocator as f; import sys; sys.exit(0 if f() else 1)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    res = {"config": {}, "environment": {"date": "2026-11-23", "device": "cpu"}, "targets": [],
           "results": [{"impl": "dense", "mode": "-", "fwd_ms": 1.0, "fwd_bwd_ms": 3.0, "fwd_bwd_ms_p10": 2.0,
                        "fwd_bwd_ms_p90": 4.0, "a2a_bytes": 0, "tokens_per_s": 10.0, "ratios": {}}],
           "memory_at_peak": {"dense/-/plain": {"op": "aten.mm.default",
                                                "live_mb": {"aten.mm.default": 2.5, "aten.mul.Tensor": 0.5}}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    from moedist.bench.report import render

    md = render(str(path))
    assert "| dense | - | 1.0 | 3.0 (2–4) |" in md
    assert "memory at the peak of dense/-/plain (3.0 MB, reached in `aten.mm.default`):" in md
    assert "| `aten.mm.default` | 2.5 |" in md and "| `aten.mul.Tensor` | 0.5 |" in md


def test_every_bench_subcommand_help_shows_defaults(capsys):
    from moedist.bench.cli import build_parser

    for what in ("layer", "ep", "train", "data"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([what, "--help"])
        assert "(default:" in capsys.readouterr().out, what


@pytest.mark.parametrize("flag", [[], ["--targets"]])
def test_layer_prints_target_lines_only_with_targets_flag(flag, tmp_path, capsys):
    """The project's targets hold for the reference sizes: tiny sizes print none unless asked."""
    out = tmp_path / "layer.json"
    rc = main(["layer", "--tokens", str(T), "--hidden", str(H), "--ffn", str(F), "--experts", str(E), "--iters", "1",
               "--warmup", "1", "--impls", "moedist,dense", "--modes", "capacity", "--no-memory",
               "--json", str(out)] + flag)
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    targets = [ln for ln in lines if ln.startswith("target ")]
    recorded = json.loads(out.read_text())["targets"]
    if flag:
        assert targets and all(ln.startswith(("target OK", "target MISS")) for ln in targets), lines
        assert len(recorded) == len(targets)
    else:
        assert not targets, targets
        assert recorded == []
    assert any(ln.startswith("moedist") for ln in lines)  # the table itself is printed either way


# --------------------------------------------------------------------------- issue 18.1: fair benchmarks

class _MatmulFlops:
    """Counts the FLOPs of every matmul that actually runs (mm, addmm, addmm_, bmm), forward and backward."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                t = [a for a in args if isinstance(a, torch.Tensor)]
                if name == "mm":
                    outer.flops += 2 * t[0].shape[0] * t[0].shape[1] * t[1].shape[1]
                elif name in ("addmm", "addmm_"):
                    outer.flops += 2 * t[1].shape[0] * t[1].shape[1] * t[2].shape[1]
                elif name == "bmm":
                    outer.flops += 2 * t[0].shape[0] * t[0].shape[1] * t[0].shape[2] * t[1].shape[2]
                return func(*args, **(kwargs or {}))

        self.flops, self.mode = 0, _Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_useful_flops_hand_count():
    """T=4, K=2, H=3, F=5, r=2, SwiGLU, worked out by hand (2mkn per matmul)."""
    from moedist.bench.flops import useful_flops

    # frozen FFN on 4 rows: 3 projections x 2*4*3*5 = 360 forward, + 360 input gradients (no weight gradients)
    # LoRA on 4 rows: per projection 2*4*3*2 + 2*4*2*5 = 128, x3 projections = 384 forward, x3 with backward = 1152
    assert useful_flops("dense-lora", "-", 4, 2, 3, 5, True, 2) == 720 + 1152
    # fused LoRA-MoE: frozen FFN once per TOKEN (720 as above), LoRA per PAIR (8 rows: 2304)
    assert useful_flops("moedist-lora", "fused", 4, 2, 3, 5, True, 2) == 720 + 2304
    # naive: frozen FFN per pair (8 rows: 1440) + LoRA per pair
    assert useful_flops("moedist-lora", "naive", 4, 2, 3, 5, True, 2) == 1440 + 2304
    # trainable experts on the 8 pairs: 3 x 2*8*3*5 = 720 forward, x3 with input + weight gradients
    for impl in ("moedist", "deepspeed", "floor", "fairscale"):
        assert useful_flops(impl, "capacity", 4, 2, 3, 5, True) == 2160
    assert useful_flops("dense", "-", 4, 2, 3, 5, True) == 2160  # one FFN of size K*F on 4 rows
    assert useful_flops("dense", "-", 4, 2, 3, 5, False, backward=False) == 2 * 2 * 4 * 3 * 10  # plain act: 2 projections


@pytest.mark.parametrize("ffn", ["plain", "recompute"])
def test_useful_flops_equal_the_matmuls_that_run(ffn):
    """The formula against the matmuls each LoRA row and the MoE layer really run (router FLOPs removed)."""
    from moedist.bench.cases import _BenchExperts, _UnfusedMoELoRAExperts
    from moedist.bench.flops import useful_flops
    from moedist.moe import MoELoRAExperts

    t, k, h, f, e, r = 32, 2, 16, 24, 4, 2
    x = torch.randn(t, h, requires_grad=True)
    g = torch.randn(t, h)
    router_flops = 3 * 2 * t * h * e  # logits forward, input and weight gradients
    base = peers.DenseFFN(h, f, "swiglu", seed=1)
    ref = peers.DenseLoRA(base.w_gate, base.w_up, base.w_down, r, "swiglu", seed=2, ffn_impl=ffn)
    with _MatmulFlops() as c:
        ref(x).backward(g)
    assert c.flops == useful_flops("dense-lora", "-", t, k, h, f, True, r)
    cls = MoELoRAExperts if ffn == "recompute" else _UnfusedMoELoRAExperts
    lora = cls(e, h, f, r, activation="swiglu", seed=3)
    lora.load_base(base.w_gate, base.w_up, base.w_down)
    with _MatmulFlops() as c:
        y, _ = MoELayer(Router(h, e, k, renormalize=True), lora)(x)
        y.backward(g)
    assert c.flops - router_flops == useful_flops("moedist-lora", "fused", t, k, h, f, True, r)
    experts = _BenchExperts(GroupedExperts(e, h, f, seed=4), ffn)
    with _MatmulFlops() as c:
        y, _ = MoELayer(Router(h, e, k, renormalize=True), experts)(x)  # dropless: every pair computed
        y.backward(g)
    assert c.flops - router_flops == useful_flops("moedist", "dropless", t, k, h, f, True)


def test_plain_and_recompute_ffn_agree():
    """The two expert FFNs are the same math: outputs and every gradient equal (LoRA down, frozen weight)."""
    from moedist.bench.ffns import ffn_forward

    torch.manual_seed(0)
    ws = [torch.randn(8, 12, requires_grad=True), torch.randn(8, 12, requires_grad=True),
          torch.randn(12, 8, requires_grad=True)]
    lora = (torch.randn(12, 3, requires_grad=True), torch.randn(3, 8, requires_grad=True))
    x = torch.randn(2, 5, 8)  # DeepSpeed hands its experts 3-D chunks
    g = torch.randn(2, 5, 8)
    outs = []
    for impl in ("plain", "recompute"):
        xi = x.clone().requires_grad_(True)
        y = ffn_forward(xi, *ws, "swiglu", impl, lora_down=lora, scaling=0.5)
        grads = torch.autograd.grad(y, [xi, *ws, *lora], g)
        outs.append((y, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)
    w_frozen = ws[2].detach()  # frozen down weight: no gradient asked, none computed
    xi = torch.randn(5, 8, requires_grad=True)
    y = ffn_forward(xi, ws[0], ws[1], w_frozen, "gelu", "recompute")
    y2 = ffn_forward(xi, ws[0], ws[1], w_frozen, "gelu", "plain")
    torch.testing.assert_close(torch.autograd.grad(y, xi, torch.ones_like(y))[0],
                               torch.autograd.grad(y2, xi, torch.ones_like(y2))[0])


def test_round_robin_order_is_reshuffled_every_round():
    from moedist.bench.timing import round_orders, run_interleaved

    names = [f"impl{i}" for i in range(6)]
    orders = round_orders(names, 8, seed=1)
    assert all(sorted(o) == names for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # not one fixed order
    assert orders == round_orders(names, 8, seed=1)  # seeded
    assert round_orders(names, 2, seed=None) == [names, names]
    seen = []
    run_interleaved({n: (lambda n=n: seen.append(n)) for n in names}, iters=3, warmup=0,
                    device=torch.device("cpu"), order_seed=1)
    assert seen == [n for o in round_orders(names, 3, seed=1) for n in o]


def test_layer_bf16_smoke(tmp_path, capsys):
    """`moedist bench layer --dtype bfloat16` runs on CPU end to end (issue 18.3): every impl that can
    run does, fairscale (fp32 dispatch mask einsum'd with bf16 input) is listed as skipped with the reason."""
    import time

    out = tmp_path / "bf16.json"
    t0 = time.time()
    rc = main(["layer", "--dtype", "bfloat16", "--tokens", "32", "--hidden", "16", "--ffn", "16", "--experts", "4",
               "--iters", "1", "--warmup", "0", "--repeats", "1", "--ffn-impl", "recompute", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["config"]["dtype"] == "bfloat16"
    rows = {(r["impl"], r["mode"]): r for r in res["results"]}
    assert {("moedist", "capacity"), ("moedist", "dropless"), ("deepspeed", "capacity"), ("deepspeed", "dropless"),
            ("dense", "-"), ("floor", "capacity"), ("floor", "dropless")} <= set(rows)
    for r in res["results"]:
        assert r["ffn"] == "recompute" and r["fwd_bwd_ms"] > 0 and r["useful_flops"] > 0
        assert r["peak_mem_mb"] is not None
    ran_or_skipped = {r["impl"] for r in res["results"]} | {k.split("/")[0] for k in res["skipped"]}
    assert "fairscale" in ran_or_skipped
    for name, why in res["skipped"].items():
        assert isinstance(why, str) and why, name
    assert "skipped" in capsys.readouterr().out or not res["skipped"]
    assert time.time() - t0 < 30  # the suite's smoke test: tiny sizes


def test_autoep_config_and_support(monkeypatch):
    """The AutoEP DeepSpeed config carries moedist's layout and optimizer; a DeepSpeed without AutoEP
    gives one reason naming its version and the missing module."""
    import importlib

    from moedist.bench import autoep

    cfg = autoep.autoep_ds_config(4, 2, 2, "qwen3_moe", 3e-4, (0.9, 0.95), 0.1, 1.0)
    assert cfg["expert_parallel"] == {"enabled": True, "autoep_size": 2, "preset_model": "qwen3_moe"}
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["optimizer"]["params"]["lr"] == 3e-4 and cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert cfg["gradient_clipping"] == 1.0
    assert torch.equal(autoep.batch_ids(3, 1, 2, 8, 50, 0), autoep.batch_ids(3, 1, 2, 8, 50, 0))
    assert not torch.equal(autoep.batch_ids(3, 0, 2, 8, 50, 0), autoep.batch_ids(3, 1, 2, 8, 50, 0))
    assert autoep.autoep_support() is None  # deepspeed 0.19.x ships AutoEP
    real = importlib.import_module

    def no_autoep(name, *a, **k):
        if name.startswith("deepspeed.module_inject.auto_ep"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_autoep)
    why = autoep.autoep_support()
    import deepspeed

    assert why.startswith(f"deepspeed {deepspeed.__version__} has no AutoEP") and "auto_ep" in why


def test_bench_train_autoep_tiny(tmp_path):
    """`bench train --peer autoep` end to end on a tiny Qwen3-MoE (1 process, ZeRO-2): both sides train."""
    from moedist.models.toy_hf import make_toy_hf_model

    hf = make_toy_hf_model(str(tmp_path / "hf"), hidden_size=32, num_layers=1, num_experts=4, vocab_size=300)
    out = tmp_path / "autoep.json"
    rc = main(["train", "--peer", "autoep", "--hf", hf, "--steps", "2", "--warmup", "0", "--zero-stage", "2",
               "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "data.seq_len=16", "--set",
               "train.micro_batch_size=2", "--profile", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["impl"] for r in res["results"]] == ["moedist", "autoep"] and not res["skipped"]
    for side in ("moedist", "autoep"):  # --profile: each side's op-by-op self time, summing to its total
        rows = res["profiles"][side]
        assert rows[-1]["op"] == "(other ops)" and any(r["op"] == "aten::mm" for r in rows)
        assert math.isclose(sum(r["share"] for r in rows), 1.0, rel_tol=1e-6)
    for r in res["results"]:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 and math.isfinite(r["loss_last"])
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
    a, b = (r["loss_first"] for r in res["results"])  # same weights, same first batch
    assert abs(a - b) < 0.1
    assert res["config"]["autoep_preset"] == "qwen3_moe" and res["environment"]["cpu_allocator"] == "default"
    from moedist.bench.report import render

    md = render(str(out))
    assert "| autoep |" in md and "profile of one training step of moedist" in md and "| `aten::mm` |" in md
    assert main(["train", "--peer", "autoep", "--hf", str(tmp_path / "nope")]) == 2
    assert main(["train", "--profile"]) == 2  # only with --peer autoep


def test_every_bench_subcommand_defaults_to_the_default_allocator():
    from moedist.bench.cli import build_parser

    for what in ("layer", "ep", "train"):
        assert build_parser().parse_args([what]).cpu_allocator == "default", what


def test_moedist_cases_reuse_expert_grads_and_count_them():
    """The bench's moedist rows train as the PyTorch runner does, with either FFN: expert gradients
    zeroed inside the timed step and reused (the same storage every step; plain: per-expert slices
    through `ExpertSlice`, recompute: the fused kernel's grad_params), with the values of a fresh
    autograd gradient (the same layer with in-place gradients off), and the peak memory counts
    them as resident bytes."""
    from moedist.bench.cases import build_cases
    from moedist.bench.layer import make_inputs
    from moedist.bench.memory import measure_step_memory

    cfg = LayerBenchConfig(tokens=64, hidden=H, ffn=F, experts=4, iters=1, warmup=0, impls=("moedist",),
                           modes=("dropless",))
    dev = torch.device("cpu")
    x, grad, router_w = make_inputs(cfg, dev, torch.float32)
    x.requires_grad_(True)
    grads = {}
    for ffn in ("plain", "recompute"):
        (case,), _ = build_cases(cfg, dev, torch.float32, x, grad, router_w, ffn)
        experts = case.notes["layer"].experts.inner
        ws = (experts.w_gate, experts.w_up, experts.w_down)
        ptrs = []
        for _ in range(3):
            case.clear()
            case.backward(case.forward())
            ptrs.append(experts.w_up.grad.data_ptr())
        assert experts.grad_in_place and len(set(ptrs)) == 1
        grads[ffn] = [w.grad.clone() for w in ws]
        resident = case.resident_bytes()
        assert resident == 3 * 4 * H * F * 4
        case.clear()
        mem = measure_step_memory(case.forward, case.backward, dev, resident)
        assert mem["peak_mem_mb"] * 2**20 >= resident
        # reference: the same layer with autograd allocating the gradients (one step, from None)
        experts.kept_grads = None
        for w in ws:
            w.grad = None
        case.clear()
        case.backward(case.forward())
        for got, w in zip(grads[ffn], ws):
            torch.testing.assert_close(got, w.grad, rtol=1e-5, atol=1e-6)
            assert got.abs().sum() > 0
    for a, b in zip(grads["plain"], grads["recompute"]):
        torch.testing.assert_close(a, b)


def test_moedist_cases_with_fresh_expert_grads_allocate_them_each_step():
    """--expert-grads fresh (what auto picks on CUDA): the moedist rows leave the expert gradients to
    autograd, freed by clear() and allocated again by every backward, so nothing is resident between
    steps (resident_bytes 0, the peak measures them inside the step); the gradients equal the kept rows'."""
    from moedist.bench.cases import build_cases
    from moedist.bench.layer import make_inputs

    dev = torch.device("cpu")
    got = {}
    for grads in ("kept", "fresh"):
        cfg = LayerBenchConfig(tokens=64, hidden=H, ffn=F, experts=4, iters=1, warmup=0, impls=("moedist",),
                               modes=("dropless",), expert_grads=grads)
        x, grad, router_w = make_inputs(cfg, dev, torch.float32)
        x.requires_grad_(True)
        for ffn in ("plain", "recompute"):
            (case,), _ = build_cases(cfg, dev, torch.float32, x, grad, router_w, ffn)
            experts = case.notes["layer"].experts.inner
            assert case.notes["expert_grads"] == grads and experts.grad_in_place == (grads == "kept")
            for step in range(2):
                case.clear()
                if step:  # a kept gradient survives clear(), a fresh one is gone
                    assert (experts.w_up.grad is None) == (grads == "fresh")
                case.backward(case.forward())
            assert (case.resident_bytes() == 0) == (grads == "fresh")
            got[grads, ffn] = [w.grad.clone() for w in (experts.w_gate, experts.w_up, experts.w_down)]
    for ffn in ("plain", "recompute"):
        for a, b in zip(got["kept", ffn], got["fresh", ffn]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert a.abs().sum() > 0


def test_layer_config_rejects_unknown_expert_grads():
    with pytest.raises(ValueError, match=r"--expert-grads='always': allowed auto, kept, fresh"):
        LayerBenchConfig(expert_grads="always").validate()
