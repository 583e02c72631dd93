"""`moedist bench layer`: one MoE layer against its peers on identical shapes and inputs.

Every implementation gets the same input x [T, H] (requires grad, as inside a
model), the same output gradient, the same router weight and the same expert
weights (copied from one moedist `GroupedExperts`). Each is timed for a
training forward (graph built, then dropped) and for forward + backward, round
robin in an order drawn afresh each round, `repeats` times over (see
timing.py), and measured for memory once (see memory.py). Every impl of a run
gets the same expert FFN (`ffn_impls`: plain and/or recompute, see ffns.py);
rows carry `ffn`, and ratios and targets compare rows of the same `ffn` only.
A peer that cannot run a setting (dtype, top-k, shape) is listed in `skipped`
with the reason, never a crash.

Rows of the result (impl, mode):
    moedist   capacity | dropless   our MoELayer (Router + GroupedExperts + TokenDispatcher)
    deepspeed capacity | dropless   deepspeed.moe.layer.MoE, drop_tokens=True | False
    fairscale capacity              fairscale MOELayer + Top2Gate (its own C = 2T/E)
    dense     -                     one FFN of size K*F
    floor     capacity | dropless   per-expert matmuls on pre-sorted tokens, moedist's counts
    moedist-lora fused | naive      MoELayer + MoELoRAExperts (forward_tokens | per-pair FFN)
    dense-lora -                    the frozen FFN + one LoRA of rank r
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from moedist.bench import peers
from moedist.bench.cases import Case, build_cases, one_line  # noqa: F401 (Case is part of this module's API)
from moedist.bench.ffns import FFN_IMPLS
from moedist.bench.flops import useful_flops
from moedist.bench.memory import measure_step_memory
from moedist.bench.timing import gpu_peak_tflops, linear_fit, profile_ops, run_interleaved, summarize, synchronize
from moedist.choices import EXPERT_GRADS
from moedist.moe import Router
from moedist.moe.capacity import compute_capacity, select_tokens
from moedist.moe.ffn import GATED

IMPLS = ("moedist", "deepspeed", "fairscale", "dense", "floor", "lora")
DEFAULT_IMPLS = ("moedist", "deepspeed", "fairscale", "dense", "floor")
MODES = ("capacity", "dropless")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LayerBenchConfig:
    """Shapes and run settings of one `bench layer` run."""

    tokens: int = 4096
    """T, tokens per step (batch * sequence)."""
    hidden: int = 512
    """H, model width."""
    ffn: int = 1024
    """F, FFN size of one expert (the dense peer has K*F; the LoRA-MoE frozen FFN has F)."""
    experts: int = 8
    """E, number of experts."""
    topk: int = 2
    """K, experts per token."""
    capacity_factor: float = 1.25
    """capacity = ceil(cf * T * K / E) in capacity mode (moedist and deepspeed)."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16 (expert weights and activations; routers stay fp32)."""
    iters: int = 10
    """timed iterations per impl (median and p10/p90 over these)."""
    warmup: int = 2
    """untimed rounds before timing."""
    impls: Sequence[str] = DEFAULT_IMPLS
    """which implementations: moedist, deepspeed, fairscale, dense, floor, lora."""
    modes: Sequence[str] = MODES
    """capacity and/or dropless (for moedist, deepspeed, floor)."""
    skew: float = 0.0
    """target max/mean expert load (0: the natural routing of a random router); at most E/K."""
    lora_rank: int = 8
    """r of the LoRA-MoE experts and of the dense-lora reference."""
    activation: str = "swiglu"
    min_capacity: int = 4
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda."""
    threads: int = 0
    """torch.set_num_threads (0: leave as is)."""
    memory: bool = True
    """measure memory (one extra step per impl)."""
    profile: Sequence[str] = ()
    """impl/mode names (e.g. moedist/capacity) to profile op by op for 2 extra steps each."""
    ffn_impls: Sequence[str] = FFN_IMPLS
    """expert-FFN implementations, each given to every impl: plain and/or recompute (ffns.py)."""
    repeats: int = 3
    """independent timing rounds of `iters` iterations each (impl order reshuffled every iteration)."""
    expert_grads: str = "auto"
    """moedist rows' expert weight gradients between steps, as `train.expert_grads`: kept (allocated
    once, overwritten in place; resident, so counted in peak memory) | fresh (allocated in backward,
    freed by clear) | auto (kept on CPU, fresh on CUDA: what the PyTorch runner does)."""
    stats: bool = True
    """moedist layers compute their diagnostics (router entropy, dropped fraction); False = --no-stats
    (`MoELayer(stats=False)`). Neither reads the device: see `moedist.moe.layer` on host syncs."""

    def validate(self) -> None:
        for name in ("tokens", "hidden", "ffn", "experts", "topk", "iters", "lora_rank", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"--warmup={self.warmup}: must be >= 0")
        if self.topk > self.experts:
            raise ValueError(f"--topk={self.topk}: must be <= --experts ({self.experts})")
        if self.capacity_factor <= 0:
            raise ValueError(f"--capacity-factor={self.capacity_factor}: must be > 0 (dropless is a mode)")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r}: allowed {', '.join(DTYPES)}")
        bad = [i for i in self.impls if i not in IMPLS]
        if bad or not self.impls:
            raise ValueError(f"--impls={','.join(self.impls)}: allowed a non-empty subset of {', '.join(IMPLS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"--modes={','.join(self.modes)}: allowed a non-empty subset of {', '.join(MODES)}")
        if self.skew and not 1.0 <= self.skew <= self.experts / self.topk:
            raise ValueError(f"--skew={self.skew}: must be 0 or between 1 and E/K = {self.experts / self.topk:g} "
                             "(an expert takes each token at most once)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device={self.device!r}: allowed auto, cpu, cuda")
        if self.expert_grads not in EXPERT_GRADS:
            raise ValueError(f"--expert-grads={self.expert_grads!r}: allowed {', '.join(EXPERT_GRADS)}")
        bad = [f for f in self.ffn_impls if f not in FFN_IMPLS]
        if bad or not self.ffn_impls:
            raise ValueError(f"--ffn-impl={','.join(self.ffn_impls)}: allowed plain, recompute or both")


# --------------------------------------------------------------------------- inputs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda: no CUDA device is available")
    return torch.device(name)


def make_inputs(cfg: LayerBenchConfig, device: torch.device, dtype: torch.dtype, rank: int = 0):
    """x [T, H], output gradient [T, H] and the router weight [E, H] (skewed when asked).

    Skew: a fraction p of the tokens get a component s*u along a unit vector u
    (the rest have their u component removed) and expert 0's router row gets
    g*u, so those tokens all pick expert 0 first. Expert 0 then carries
    p*T + (1-p)*T*K/E pairs against a mean of T*K/E: p = (S-1) / (E/K - 1).
    `rank` (expert-parallel runs) draws other tokens with the same router and u.
    """
    g = torch.Generator().manual_seed(cfg.seed + 17 + 7919 * rank)
    T, H, E, K = cfg.tokens, cfg.hidden, cfg.experts, cfg.topk
    x = torch.randn(T, H, generator=g)
    grad = torch.randn(T, H, generator=g)
    router = Router(H, E, K, renormalize=K > 1, seed=cfg.seed + 1)
    w = router.weight.detach().clone()
    if cfg.skew:
        u = torch.randn(H, generator=torch.Generator().manual_seed(cfg.seed + 23))
        u = u / u.norm()
        p = (cfg.skew - 1.0) / (E / K - 1.0) if E > K else 1.0
        hot = torch.randperm(T, generator=g)[: round(p * T)]
        x = x - (x @ u).unsqueeze(1) * u  # no u component ...
        x[hot] += 4.0 * u  # ... except on the hot tokens
        w[0] += 2.0 * u
    return x.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype), w


def routing_stats(router_w: torch.Tensor, x: torch.Tensor, cfg: LayerBenchConfig) -> dict:
    """Expert loads of moedist's routing of x (the routing every impl but fairscale gets)."""
    E, K = cfg.experts, cfg.topk
    r = Router(cfg.hidden, E, K, renormalize=K > 1).to(x.device)
    with torch.no_grad():
        r.weight.copy_(router_w)
        out = r(x)
    load = torch.bincount(out.idx_TK.reshape(-1), minlength=E).float()
    cap = compute_capacity(cfg.tokens, E, K, cfg.capacity_factor, cfg.min_capacity)
    sel = select_tokens(out.idx_TK, out.weight_TK, E, cap)
    return dict(load_max_over_mean=float(load.max() / load.mean()), load_min=int(load.min()), load_max=int(load.max()),
                load_mean=float(load.mean()), capacity=cap,
                dropped_frac_at_capacity=float(sel.dropped_E.sum()) / (cfg.tokens * K))


# --------------------------------------------------------------------------- checks


def consistency_checks(cases: List[Case]) -> dict:
    """Max |y_moedist - y_deepspeed| / max |y| per mode (same weights, same routing).

    Dropless they must agree to rounding; with capacity the two renormalise a
    token's weights differently once one of its pairs is dropped (DeepSpeed over
    the kept pairs, moedist over the top-k), so only dropped tokens differ.
    """
    by = {c.name: c for c in cases}
    out = {}
    with torch.no_grad():
        for mode in MODES:
            for ffn in FFN_IMPLS:
                a, b = by.get(f"moedist/{mode}/{ffn}"), by.get(f"deepspeed/{mode}/{ffn}")
                if a is None or b is None:
                    continue
                ya, yb = a.forward().float(), b.forward().float()
                diff = (ya - yb).abs()
                scale = ya.abs().max().clamp_min(1e-30)
                one = dict(max_rel_diff=float(diff.max() / scale),
                           tokens_differing_frac=float((diff.amax(1) > 1e-4 * float(scale)).float().mean()))
                out[f"{mode}/{ffn}"] = one
                prev = out.get(mode)  # `mode`: the worst over the FFN implementations
                out[mode] = one if prev is None else {k: max(prev[k], one[k]) for k in one}
    return out


# --------------------------------------------------------------------------- run


def environment(device: torch.device) -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(device),
               date=datetime.date.today().isoformat())
    env["env"] = {k: os.environ[k] for k in ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_",
                                             "MALLOC_TRIM_THRESHOLD_", "DS_ACCELERATOR") if k in os.environ}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        env["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    for mod in ("deepspeed", "fairscale"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional peer
            env[mod] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _needs_dist(impls: Sequence[str]) -> bool:
    return any(i in ("deepspeed", "fairscale") for i in impls)


def run_layer_bench(cfg: LayerBenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run one `bench layer` configuration; returns the JSON-ready dict."""
    cfg.validate()
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    created = peers.ensure_process_group(device) if _needs_dist(cfg.impls) else False
    try:
        return _run(cfg, device, dtype, log)
    finally:
        if created:
            peers.teardown_process_group(created)


def _run(cfg: LayerBenchConfig, device: torch.device, dtype: torch.dtype, log) -> dict:
    x, grad, router_w = make_inputs(cfg, device, dtype)
    x.requires_grad_(True)
    routing = routing_stats(router_w, x.detach(), cfg)
    log(f"routing: max/mean expert load {routing['load_max_over_mean']:.2f}, capacity {routing['capacity']}, "
        f"dropped at cf {cfg.capacity_factor}: {routing['dropped_frac_at_capacity']:.3%}")
    cases, skipped = [], {}
    for ffn in cfg.ffn_impls:
        got, why = build_cases(cfg, device, dtype, x, grad, router_w, ffn)
        cases += got
        skipped.update(why)
    for c in list(cases):  # one untimed step each: first-call costs out of the way, and a peer that fails is skipped
        c.clear()
        try:
            c.backward(c.forward())
        except Exception as e:  # noqa: BLE001 - e.g. fairscale's einsum of an fp32 mask with bf16 input
            if c.impl in ("moedist", "moedist-lora"):
                raise
            skipped[c.name] = f"failed in its first step: {one_line(e)}"
            log(f"skipped {c.name}: {skipped[c.name]}")
            cases.remove(c)
            c.clear()
    checks = consistency_checks(cases)
    mem = {}
    if cfg.memory:
        for c in cases:
            c.clear()
            mem[c.name] = measure_step_memory(c.forward, c.backward, device, c.resident_bytes())
            log(f"memory {c.name}: peak {mem[c.name]['peak_mem_mb']:.1f} MB, after forward {mem[c.name]['act_mem_mb']:.1f} MB"
                + _live_at_peak(mem[c.name]))
    stats = {}
    for c in cases:  # a2a bytes, capacity and rows from a plain forward
        with torch.no_grad():
            c.forward()
        stats[c.name] = dict(a2a_bytes=int(c.a2a_bytes()), rows_executed=int(c.rows_executed()), capacity=c.capacity())
    fwd, fwd_bwd = _timed_repeats(cases, cfg, device, log)
    synchronize(device)
    profiles = {_profile_key(c, cfg): profile_case(c, device) for c in cases if _profile_key(c, cfg)}
    results = []
    gated = cfg.activation in GATED
    peak = gpu_peak_tflops(device, dtype)
    for c in cases:
        f, fb = summarize(fwd[c.name]["wall"]), summarize(fwd_bwd[c.name]["wall"])
        fc, fbc = summarize(fwd[c.name]["cpu"]), summarize(fwd_bwd[c.name]["cpu"])
        flops = useful_flops(c.impl, c.mode, cfg.tokens, cfg.topk, cfg.hidden, cfg.ffn, gated, cfg.lora_rank)
        reps = [summarize(s)["median"] for s in fwd_bwd[c.name]["per_repeat"]]
        row = dict(impl=c.impl, mode=c.mode, ffn=c.ffn, tokens=cfg.tokens, experts=cfg.experts,
                   fwd_ms=f["median"], fwd_ms_p10=f["p10"], fwd_ms_p90=f["p90"],
                   fwd_bwd_ms=fb["median"], fwd_bwd_ms_p10=fb["p10"], fwd_bwd_ms_p90=fb["p90"],
                   fwd_cpu_ms=fc["median"] if fc["n"] else None, fwd_bwd_cpu_ms=fbc["median"] if fbc["n"] else None,
                   fwd_bwd_cpu_ms_p10=fbc["p10"] if fbc["n"] else None, fwd_bwd_cpu_ms_p90=fbc["p90"] if fbc["n"] else None,
                   peak_mem_mb=mem.get(c.name, {}).get("peak_mem_mb"), act_mem_mb=mem.get(c.name, {}).get("act_mem_mb"),
                   a2a_bytes=stats[c.name]["a2a_bytes"], rows_executed=stats[c.name]["rows_executed"],
                   capacity=stats[c.name]["capacity"], tokens_per_s=cfg.tokens / (fb["median"] / 1e3),
                   fwd_bwd_ms_q25=fb["q25"], fwd_bwd_ms_q75=fb["q75"], fwd_bwd_ms_min=fb["min"],
                   fwd_bwd_ms_max=fb["max"], fwd_ms_q25=f["q25"], fwd_ms_q75=f["q75"],
                   fwd_bwd_ms_repeat_medians=reps, repeats=cfg.repeats, samples=fb["n"],
                   useful_flops=flops, useful_tflops=flops / (fb["median"] / 1e3) / 1e12,
                   model_tflops=flops / (fb["median"] / 1e3) / 1e12)
        if peak:
            row["pct_of_peak"] = 100.0 * row["useful_tflops"] / peak
        row.update({k: v for k, v in c.notes.items() if isinstance(v, (int, float, str))})
        results.append(row)
    add_ratios(results)
    config = dataclasses.asdict(cfg)
    config["impls"], config["modes"] = list(cfg.impls), list(cfg.modes)
    return dict(config=config, environment=environment(device), routing=routing, checks=checks, skipped=skipped,
                timing=dict(fwd="training forward (autograd graph built, then dropped)",
                            fwd_bwd="forward + backward of a fixed output gradient; x requires grad",
                            order=f"round robin, order reshuffled every iteration (seeded), {cfg.repeats} repeats x "
                                  f"{cfg.iters} iterations; medians over all samples, q25-q75 = IQR, min-max, and "
                                  "the median of each repeat (fwd_bwd_ms_repeat_medians)",
                            useful_flops="expert-FFN matmuls of the T*K routed pairs (no padding, no router); frozen "
                                         "weights: forward + input gradient only; LoRA-MoE fused: frozen FFN once per "
                                         "token (flops.py)",
                            a2a_bytes="bytes of the dispatch all-to-all payload (one direction): moedist = kept pairs x H x "
                                      "element size, deepspeed/fairscale = E x C x H x element size",
                            memory=(next(iter(mem.values()))["mem_method"] if mem else None)),
                results=results, targets=evaluate_targets(results, routing, cfg), profiles=profiles,
                memory_at_peak={name: dict(op=m["peak_at"], live_mb=m["peak_live_mb"])
                                for name, m in mem.items() if "peak_live_mb" in m})


def _live_at_peak(m: dict, top: int = 4) -> str:
    """`; at the peak (during op): MB by allocating op` for the log line (CPU only)."""
    if "peak_live_mb" not in m:
        return ""
    parts = [f"{op} {mb:.1f}" for op, mb in list(m["peak_live_mb"].items())[:top]]
    return f"; at the peak (during {m['peak_at']}): " + ", ".join(parts)


def _timed_repeats(cases: List[Case], cfg: LayerBenchConfig, device: torch.device, log) -> tuple:
    """`cfg.repeats` rounds of interleaved timing (forward, then forward+backward), each with
    its own order seed. Returns (fwd, fwd_bwd): name -> {"wall", "cpu", "per_repeat": [[ms], ...]}."""
    out = []
    for what, step in (("forward", lambda c: c.forward), ("forward+backward", lambda c: (lambda: c.backward(c.forward())))):
        merged = {c.name: dict(wall=[], cpu=[], per_repeat=[]) for c in cases}
        for rep in range(cfg.repeats):
            log(f"timing {what}: {len(cases)} impls x {cfg.iters} iters, repeat {rep + 1}/{cfg.repeats}")
            got = run_interleaved({c.name: step(c) for c in cases}, cfg.iters, cfg.warmup, device,
                                  before_each={c.name: c.clear for c in cases},
                                  order_seed=cfg.seed * 1009 + rep * 2 + (what == "forward"))
            for name, v in got.items():
                merged[name]["wall"] += v["wall"]
                merged[name]["cpu"] += v["cpu"]
                merged[name]["per_repeat"].append(v["wall"])
        out.append(merged)
    return out[0], out[1]


def _profile_key(c: Case, cfg: LayerBenchConfig):
    """The profile name of a case if --profile asked for it: impl/mode (one FFN run) or impl/mode/ffn."""
    short = f"{c.impl}/{c.mode}"
    if c.name in cfg.profile:
        return c.name
    if short in cfg.profile:
        return short if len(cfg.ffn_impls) == 1 else c.name
    return None


def profile_case(c: Case, device: torch.device, steps: int = 2, top: int = 14) -> List[dict]:
    """Where one fwd+bwd step of a case spends its time (`timing.profile_ops`)."""

    def step():
        c.clear()
        c.backward(c.forward())

    return profile_ops(step, device, steps, top)


def _find(results, impl, mode=None, ffn=None):
    for r in results:
        if r["impl"] == impl and (mode is None or r["mode"] == mode) and (ffn is None or r.get("ffn") == ffn):
            return r
    return None


def _ratio(a, b):
    return a / b if a is not None and b else None


def add_ratios(results: List[dict]) -> None:
    """Per row: time and memory relative to dense, to deepspeed in the same mode, to dense-lora.

    Time ratios from wall-clock medians (`*_vs_*`) and from CPU-time medians (`cpu_*_vs_*`).
    """
    for r in results:
        rat = {}
        ffn = r.get("ffn")  # compare rows of the same expert FFN only
        refs = [("dense", _find(results, "dense", ffn=ffn)), ("deepspeed", _find(results, "deepspeed", r["mode"], ffn))]
        if r["impl"] == "moedist":
            refs.append(("floor", _find(results, "floor", r["mode"], ffn)))
        if r["impl"].endswith("lora"):
            refs.append(("dense_lora", _find(results, "dense-lora", ffn=ffn)))
        for tag, ref in refs:
            if ref is None:
                continue
            rat[f"fwd_bwd_vs_{tag}"] = _ratio(r["fwd_bwd_ms"], ref["fwd_bwd_ms"])
            rat[f"fwd_vs_{tag}"] = _ratio(r["fwd_ms"], ref["fwd_ms"])
            rat[f"cpu_fwd_bwd_vs_{tag}"] = _ratio(r.get("fwd_bwd_cpu_ms"), ref.get("fwd_bwd_cpu_ms"))
            rat[f"act_mem_vs_{tag}"] = _ratio(r.get("act_mem_mb"), ref.get("act_mem_mb"))
            rat[f"peak_mem_vs_{tag}"] = _ratio(r.get("peak_mem_mb"), ref.get("peak_mem_mb"))
        r["ratios"] = {k: v for k, v in rat.items() if v is not None}


def evaluate_targets(results: List[dict], routing: dict, cfg: LayerBenchConfig) -> List[dict]:
    """The issue's targets that this run can decide (each a ratio measured in this run).

    `value` is from wall-clock medians (memory: tracked bytes); `cpu_value`,
    for time targets, from CPU-time medians of the same iterations.
    """
    out = []

    def add(name, r, key, limit):
        value = r["ratios"].get(key) if r else None
        if value is None:
            return
        t = dict(target=name, value=value, limit=limit, ok=bool(value <= limit))
        if key.startswith("fwd_bwd") and r["ratios"].get("cpu_" + key) is not None:
            t["cpu_value"] = r["ratios"]["cpu_" + key]
            t["cpu_ok"] = bool(t["cpu_value"] <= limit)
        out.append(t)

    for ffn in cfg.ffn_impls:
        tag = f"[ffn {ffn}] "
        cap, drop = _find(results, "moedist", "capacity", ffn), _find(results, "moedist", "dropless", ffn)
        add(f"{tag}capacity cf {cfg.capacity_factor}: moedist / deepspeed fwd+bwd time", cap, "fwd_bwd_vs_deepspeed", 0.8)
        add(f"{tag}capacity cf {cfg.capacity_factor}: moedist / deepspeed activation memory", cap,
            "act_mem_vs_deepspeed", 0.7)
        add(f"{tag}capacity cf {cfg.capacity_factor}: moedist / deepspeed peak memory", cap, "peak_mem_vs_deepspeed", 0.9)
        for r in (cap, drop):
            if r:
                add(f"{tag}{r['mode']}: moedist / floor fwd+bwd time", r, "fwd_bwd_vs_floor", 1.10)
        if routing["load_max_over_mean"] >= 4:
            add(f"{tag}dropless skewed: moedist / deepspeed(drop_tokens=False) fwd+bwd time", drop,
                "fwd_bwd_vs_deepspeed", 0.25)
            add(f"{tag}dropless skewed: moedist / deepspeed(drop_tokens=False) peak memory", drop,
                "peak_mem_vs_deepspeed", 0.25)
        if not cfg.skew:
            for r in (cap, drop):
                if r:
                    add(f"{tag}{r['mode']}: moedist / dense FFN (equal active FLOPs) fwd+bwd time", r,
                        "fwd_bwd_vs_dense", 1.15)
        add(f"{tag}LoRA-MoE (fused) / frozen FFN + one LoRA fwd+bwd time", _find(results, "moedist-lora", "fused", ffn),
            "fwd_bwd_vs_dense_lora", 1.3)
    return out


# --------------------------------------------------------------------------- sweep

SWEEP_TOKENS = (1024, 2048, 4096, 8192, 16384)
SWEEP_EXPERTS = (8, 16, 32, 64, 128)


def run_layer_sweep(cfg: LayerBenchConfig, tokens: Sequence[int] = SWEEP_TOKENS, experts: Sequence[int] = SWEEP_EXPERTS,
                    log: Callable[[str], None] = lambda s: None) -> dict:
    """Tokens sweep at E = cfg.experts, then experts sweep at T = cfg.tokens.

    Rows carry `sweep` ("tokens" or "experts"); `fits` holds, per impl/mode,
    the straight-line fit of fwd+bwd time against tokens and its R^2.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    created = peers.ensure_process_group(device) if _needs_dist(cfg.impls) else False
    rows, runs = [], []
    try:
        points = [("tokens", dataclasses.replace(cfg, tokens=t)) for t in tokens]
        points += [("experts", dataclasses.replace(cfg, experts=e)) for e in experts]
        for which, pc in points:
            log(f"sweep {which}: T={pc.tokens} E={pc.experts}")
            res = _run(pc, device, DTYPES[pc.dtype], log)
            for r in res["results"]:
                r["sweep"] = which
                rows.append(r)
            runs.append(dict(sweep=which, tokens=pc.tokens, experts=pc.experts, routing=res["routing"],
                             skipped=res["skipped"], loadavg_1m=res["environment"].get("loadavg_1m")))
    finally:
        if created:
            peers.teardown_process_group(created)
    fits = {}
    for key in sorted({(r["impl"], r["mode"], r["ffn"]) for r in rows if r["sweep"] == "tokens"}):
        pts = [(r["tokens"], r["fwd_bwd_ms"]) for r in rows
               if r["sweep"] == "tokens" and (r["impl"], r["mode"], r["ffn"]) == key]
        if len(pts) >= 2:
            fit = linear_fit([p[0] for p in pts], [p[1] for p in pts])
            name = f"{key[0]}/{key[1]}" if len(cfg.ffn_impls) == 1 else f"{key[0]}/{key[1]}/{key[2]}"
            fits[name] = dict(ms_per_1k_tokens=fit["slope"] * 1024, intercept_ms=fit["intercept"],
                                              r2=fit["r2"], points=len(pts))
    config = dataclasses.asdict(cfg)
    config.update(impls=list(cfg.impls), modes=list(cfg.modes), sweep_tokens=list(tokens), sweep_experts=list(experts))
    return dict(config=config, environment=environment(device), runs=runs, results=rows, fits=fits)
