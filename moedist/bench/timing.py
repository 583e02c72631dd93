"""Timing: wall clock on CPU, CUDA events on GPU; interleaved runs; summaries; TFLOP/s.

Implementations are timed round-robin (iteration i of every impl before
iteration i+1 of any), so a burst of load from other processes on a shared
machine hits every impl alike and the ratios stay meaningful. The order within
an iteration is drawn afresh each iteration (seeded), so no impl always runs
right after the same neighbour (warm caches, an allocator state it left).
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

# Dense peak throughput in TFLOP/s (no sparsity) by GPU name fragment and math mode.
# Sources: NVIDIA H100 / H200 datasheets (SXM: 67 FP32, 494.7 TF32, 989.4 BF16/FP16;
# PCIe: 51 / 378 / 756; NVL: 60 / 417.5 / 835.5; H200 SXM equals H100 SXM compute).
GPU_PEAK_TFLOPS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},  # SXM5 (e.g. "H100 80GB HBM3")
}


def gpu_peak_tflops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Peak dense TFLOP/s of this GPU for `dtype` (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if dtype == torch.float32:
        mode = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    else:
        mode = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    for key, table in GPU_PEAK_TFLOPS.items():  # most specific names first
        if key in name and mode in table:
            return table[mode]
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times one call: (wall ms, CPU ms). Wall: perf_counter on CPU, CUDA events on GPU.

    CPU ms is this process's CPU time (`time.process_time`) during the call. On
    a shared machine with one torch thread it counts the work done, not the
    time spent waiting for a core, so it is far steadier than wall time; with
    several threads it also counts OpenMP spin-waiting. None on CUDA.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object]):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)), None
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def round_orders(names: Sequence[str], rounds: int, seed: Optional[int]) -> List[List[str]]:
    """The order of the impls in each round: a fresh permutation per round from
    `random.Random(seed)`; seed None keeps the given order (the old behaviour)."""
    if seed is None:
        return [list(names) for _ in range(rounds)]
    rng = random.Random(seed)
    out = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        out.append(order)
    return out


def run_interleaved(steps: Dict[str, Callable[[], object]], iters: int, warmup: int, device: torch.device,
                    before_each: Optional[Dict[str, Callable[[], None]]] = None,
                    order_seed: Optional[int] = None) -> Dict[str, dict]:
    """Time every step `iters` times (after `warmup` untimed rounds), round-robin.

    `before_each[name]` (untimed) runs before each call, e.g. to clear gradients.
    `order_seed`: shuffle the order of the steps in every round (see `round_orders`).
    Returns name -> {"wall": [ms, ...], "cpu": [ms, ...] or []}.
    """
    timer = StepTimer(device)
    before_each = before_each or {}
    samples: Dict[str, dict] = {k: dict(wall=[], cpu=[]) for k in steps}
    for i, order in enumerate(round_orders(list(steps), warmup + iters, order_seed)):
        for name in order:
            fn = steps[name]
            if name in before_each:
                before_each[name]()
            wall, cpu = timer(fn)
            if i >= warmup:
                samples[name]["wall"].append(wall)
                if cpu is not None:
                    samples[name]["cpu"].append(cpu)
    return samples


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) without numpy."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> dict:
    """median, p10, p90, q25, q75 (the IQR), min, max, n of a list of milliseconds."""
    nan = float("nan")
    return dict(median=percentile(samples, 50), p10=percentile(samples, 10), p90=percentile(samples, 90),
                q25=percentile(samples, 25), q75=percentile(samples, 75),
                min=min(samples) if samples else nan, max=max(samples) if samples else nan, n=len(samples))


def ffn_flops(rows: int, hidden: int, ffn: int, gated: bool, backward: bool) -> float:
    """Matmul FLOPs of a trainable FFN on `rows` rows (kept for callers; see flops.py)."""
    from moedist.bench.flops import ffn_flops as _ffn_flops

    return _ffn_flops(rows, hidden, ffn, gated, backward)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least squares y = a + b x; returns slope, intercept and R^2."""
    n = len(xs)
    if n < 2:
        return dict(slope=float("nan"), intercept=float("nan"), r2=float("nan"))
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx else float("nan")
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    return dict(slope=b, intercept=a, r2=1.0 - ss_res / ss_tot if ss_tot else 1.0)


def profile_ops(step: Callable[[], object], device: torch.device, steps: int = 2, top: int = 14) -> List[dict]:
    """Where `step()` spends its time: torch.profiler self time per op, averaged over `steps` calls
    (the top `top` ops, plus the rest as one row "(other ops)"); device time on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [(e.key, getattr(e, key) / 1e3 / steps, e.count // steps) for e in prof.key_averages()]
    rows = [r for r in rows if r[1] > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    out = [dict(op=k, self_ms=ms, calls=n, share=ms / total) for k, ms, n in rows[:top]]
    rest = sum(r[1] for r in rows[top:])
    out.append(dict(op="(other ops)", self_ms=rest, calls=sum(r[2] for r in rows[top:]), share=rest / total))
    return out
