"""`moedist bench ep`: the expert-parallel MoE layer under torchrun.

    torchrun --standalone --nproc_per_node 2 -m moedist.bench.cli ep --tokens 2048 --experts 8 --json ep.json

Every rank holds E/P experts and its own T tokens (same router, other tokens
per rank). Per impl and mode it measures, on every rank: forward and
forward+backward time, the all-to-all time (forward dispatch + combine, and
the same two in backward) and bytes, and the rows each rank's experts receive;
rank 0 gathers them and reports the imbalance (max / mean over ranks).

moedist: `MoELayer` with `TokenDispatcher` over an `ExpertParallelComm` of the
world group; its all-to-alls are timed by running moedist's own autograd
all-to-all inside a timing wrapper. deepspeed: `deepspeed.moe.layer.MoE` with
ep_size = P (its [E, C, H] all-to-all timed in peers.timed_deepspeed_all_to_all).
GPU: NCCL, CUDA-synchronised wall clock around each collective.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from moedist.bench import peers
from moedist.bench.layer import DTYPES, LayerBenchConfig, environment, make_inputs, resolve_device
from moedist.bench.timing import round_orders, summarize, synchronize

# The expert FFN of both impls: moedist's GroupedExperts keeps gate/up and recomputes h (its
# GroupedGatedFFN); DeepSpeed's experts get the bench's recompute node (ffns.py), the same saving.
EP_FFN = "recompute"
from moedist.distributed.comm import ExpertParallelComm
from moedist.moe import GroupedExperts, MoELayer, Router, TokenDispatcher


class _Recorder:
    """Accumulates (seconds, bytes) per key for the current step."""

    def __init__(self):
        self.t: Dict[str, float] = {}
        self.b: Dict[str, int] = {}

    def __call__(self, key: str, seconds: float, nbytes: int) -> None:
        self.t[key] = self.t.get(key, 0.0) + seconds
        self.b[key] = self.b.get(key, 0) + nbytes

    def reset(self) -> None:
        self.t.clear()
        self.b.clear()


class _TimedA2A(torch.autograd.Function):
    """moedist's autograd all-to-all (`comm._AllToAllSingle`) with each direction timed."""

    @staticmethod
    def forward(ctx, x_NH, out_splits, in_splits, group, rec):
        from moedist.distributed.comm import _AllToAllSingle

        ctx.rec = rec
        synchronize(x_NH.device)
        t0 = time.perf_counter()
        out = _AllToAllSingle.forward(ctx, x_NH, out_splits, in_splits, group)
        synchronize(x_NH.device)
        rec("fwd", time.perf_counter() - t0, x_NH.numel() * x_NH.element_size())
        return out

    @staticmethod
    def backward(ctx, grad):
        from moedist.distributed.comm import _AllToAllSingle

        synchronize(grad.device)
        t0 = time.perf_counter()
        g = _AllToAllSingle.backward(ctx, grad)[0]
        synchronize(grad.device)
        ctx.rec("bwd", time.perf_counter() - t0, grad.numel() * grad.element_size())
        return g, None, None, None, None


class TimedComm(ExpertParallelComm):
    """ExpertParallelComm whose activation all-to-alls are timed into `rec`."""

    def __init__(self, group, rec: _Recorder):
        super().__init__(group)
        self.rec = rec

    def all_to_all(self, x_NH, out_splits, in_splits):
        if self.size == 1:
            return x_NH
        return _TimedA2A.apply(x_NH, [int(s) for s in out_splits], [int(s) for s in in_splits], self.group, self.rec)

    def exchange_counts(self, counts_PL):
        synchronize(counts_PL.device)
        t0 = time.perf_counter()
        out = super().exchange_counts(counts_PL)
        synchronize(counts_PL.device)
        self.rec("counts", time.perf_counter() - t0, counts_PL.numel() * counts_PL.element_size())
        return out


def run_ep_bench(cfg: LayerBenchConfig, log: Callable[[str], None] = lambda s: None) -> Optional[dict]:
    """Run on every rank (torch.distributed initialised or torchrun env); rank 0 returns the dict."""
    cfg.validate()
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    created = peers.ensure_process_group(device)
    try:
        return _run(cfg, device, dtype, log)
    finally:
        peers.teardown_process_group(created)


def _run(cfg, device, dtype, log) -> Optional[dict]:
    rank, P = dist.get_rank(), dist.get_world_size()
    E, K, H = cfg.experts, cfg.topk, cfg.hidden
    if E % P:
        raise ValueError(f"--experts={E} is not divisible by the number of processes {P}")
    L = E // P
    elem = torch.tensor([], dtype=dtype).element_size()
    x, grad, router_w = make_inputs(cfg, device, dtype, rank=rank)
    router_w = router_w.to(device)
    x.requires_grad_(True)
    experts = GroupedExperts(E, H, cfg.ffn, activation=cfg.activation, num_local=L, first_expert=rank * L,
                             seed=cfg.seed + 2, dtype=dtype, device=device)
    rec = _Recorder()
    rows_in: Dict[str, int] = {}
    experts.register_forward_pre_hook(lambda _m, args: rows_in.__setitem__("rows", int(args[0].shape[0])))
    cases = {}
    for impl in cfg.impls:
        for mode in cfg.modes:
            cf = cfg.capacity_factor if mode == "capacity" else None
            if impl == "moedist":
                router = Router(H, E, K, renormalize=K > 1).to(device)
                with torch.no_grad():
                    router.weight.copy_(router_w)
                comm = TimedComm(dist.group.WORLD if P > 1 else None, rec)
                layer = MoELayer(router, experts, dispatcher=TokenDispatcher(E, comm), capacity_factor=cf,
                                 min_capacity=cfg.min_capacity)
                cases[f"moedist/{mode}"] = layer
            elif impl == "deepspeed":
                cases[f"deepspeed/{mode}"] = peers.DeepSpeedMoE(router_w, experts, K, cfg.capacity_factor,
                                                                drop_tokens=(mode == "capacity"),
                                                                min_capacity=cfg.min_capacity, ep_size=P,
                                                                ep_rank=rank, ffn_impl=EP_FFN).to(device)
            else:
                raise ValueError(f"--impls: {impl!r} is not measured by bench ep (allowed moedist, deepspeed)")

    def step(name, mod, backward: bool):
        x.grad = None
        for p in mod.parameters():
            p.grad = None
        rec.reset()
        synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        if name.startswith("deepspeed"):
            with peers.timed_deepspeed_all_to_all(rec):
                y = mod(x)
                if backward:
                    y.backward(grad)
            info = dict(a2a_bytes=mod.a2a_bytes(elem), capacity=mod.capacity,
                        rows_recv=P * L * mod.capacity, rows_sent=E * mod.capacity)
        else:
            y, aux = mod(x)
            if backward:
                y.backward(grad)
            st = mod.dispatcher.last_stats
            info = dict(a2a_bytes=int(st.get("a2a_bytes", 0)), a2a_bytes_remote=int(st.get("a2a_bytes_remote", 0)),
                        capacity=aux.capacity, rows_sent=int(st.get("a2a_rows", 0)),
                        rows_recv=rows_in.get("rows", 0))  # rows my experts computed
        synchronize(device)
        dt = (time.perf_counter() - t0) * 1e3
        info.update(ms=dt, a2a_fwd_ms=rec.t.get("fwd", 0.0) * 1e3, a2a_bwd_ms=rec.t.get("bwd", 0.0) * 1e3,
                    counts_ms=rec.t.get("counts", 0.0) * 1e3, a2a_fwd_bytes=rec.b.get("fwd", 0))
        return info

    samples: Dict[str, Dict[str, List[dict]]] = {n: dict(fwd=[], fwd_bwd=[]) for n in cases}
    # the impl order is reshuffled every iteration; the seed is the same on every rank (collectives line up)
    orders = round_orders(list(cases), 2 * (cfg.warmup + cfg.iters), cfg.seed)
    for i in range(cfg.warmup + cfg.iters):
        for j, kind in enumerate(("fwd", "fwd_bwd")):
            for name in orders[2 * i + j]:
                mod = cases[name]
                info = step(name, mod, backward=(kind == "fwd_bwd"))
                if i >= cfg.warmup:
                    samples[name][kind].append(info)
        if rank == 0:
            log(f"iteration {i + 1}/{cfg.warmup + cfg.iters}")
    mine = {}
    for name, s in samples.items():
        fb, f = s["fwd_bwd"], s["fwd"]
        last = fb[-1]
        remote = last.get("a2a_bytes_remote")
        if remote is None:  # DeepSpeed sends its whole [E, C, H] buffer; (P-1)/P of it leaves the rank
            remote = last["a2a_bytes"] * (P - 1) // P
        mine[name] = dict(rank=rank, fwd_ms=summarize([v["ms"] for v in f])["median"],
                          fwd_bwd_ms=summarize([v["ms"] for v in fb])["median"],
                          a2a_fwd_ms=summarize([v["a2a_fwd_ms"] for v in fb])["median"],
                          a2a_bwd_ms=summarize([v["a2a_bwd_ms"] for v in fb])["median"],
                          counts_ms=summarize([v["counts_ms"] for v in fb])["median"],
                          a2a_bytes=last["a2a_bytes"], a2a_bytes_remote=remote,
                          a2a_bytes_measured=last["a2a_fwd_bytes"], capacity=last["capacity"],
                          rows_sent=last["rows_sent"], rows_recv=last["rows_recv"])
    gathered: List[dict] = [None] * P  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return None
    results = []
    for name in cases:
        per_rank = [g[name] for g in gathered]
        impl, mode = name.split("/")

        def agg(key, fn=max):
            return fn(r[key] for r in per_rank)

        recv = [r["rows_recv"] for r in per_rank]
        mean_recv = sum(recv) / len(recv)
        results.append(dict(impl=impl, mode=mode, ffn=EP_FFN, fwd_ms=agg("fwd_ms"), fwd_bwd_ms=agg("fwd_bwd_ms"),
                            a2a_ms=agg("a2a_fwd_ms") + agg("a2a_bwd_ms"), a2a_fwd_ms=agg("a2a_fwd_ms"),
                            a2a_bwd_ms=agg("a2a_bwd_ms"), counts_ms=agg("counts_ms"),
                            a2a_bytes=agg("a2a_bytes", sum), a2a_bytes_remote=agg("a2a_bytes_remote", sum),
                            tokens_per_s=cfg.tokens * P / (agg("fwd_bwd_ms") / 1e3),
                            rows_recv_imbalance=(max(recv) / mean_recv) if mean_recv else None,
                            step_imbalance=agg("fwd_bwd_ms") / (sum(r["fwd_bwd_ms"] for r in per_rank) / P),
                            per_rank=per_rank))
    config = dataclasses.asdict(cfg)
    config.update(impls=list(cfg.impls), modes=list(cfg.modes), world_size=P, local_experts=L)
    return dict(config=config, environment=environment(device), results=results,
                notes=dict(times="max over ranks of each rank's median; a2a_ms = forward (dispatch + combine) + "
                                 "backward all-to-alls, activations only",
                           a2a_bytes="sum over ranks of the forward dispatch payload (one direction; combine and the "
                                     "two backward all-to-alls move the same amount each)",
                           rows_recv_imbalance="max / mean over ranks of the rows each rank's experts received"))


def run_ep_from_args(args) -> Optional[dict]:
    cfg = LayerBenchConfig(tokens=args.tokens, hidden=args.hidden, ffn=args.ffn, experts=args.experts, topk=args.topk,
                           capacity_factor=args.capacity_factor, dtype=args.dtype, iters=args.iters,
                           warmup=args.warmup, impls=args.impls, modes=args.modes, skew=args.skew,
                           activation=args.activation, seed=args.seed, device=args.device, threads=args.threads)
    log = lambda s: print(f"[bench ep] {s}", file=sys.stderr, flush=True)  # noqa: E731
    res = run_ep_bench(cfg, log=log)
    if res is None:
        return None
    c = res["config"]
    print(f"EP over {c['world_size']} rank(s): T={c['tokens']} per rank, H={c['hidden']}, F={c['ffn']}, "
          f"E={c['experts']} ({c['local_experts']} per rank), top-{c['topk']}, cf={c['capacity_factor']}")
    print(f"{'impl':<10}{'mode':<10}{'fwd ms':>9}{'fwd+bwd ms':>12}{'a2a ms':>9}{'a2a MB':>9}{'remote MB':>11}"
          f"{'recv imb':>10}{'tok/s':>9}")
    for r in res["results"]:
        print(f"{r['impl']:<10}{r['mode']:<10}{r['fwd_ms']:>9.1f}{r['fwd_bwd_ms']:>12.1f}{r['a2a_ms']:>9.1f}"
              f"{r['a2a_bytes'] / 2**20:>9.2f}{r['a2a_bytes_remote'] / 2**20:>11.2f}"
              f"{(r['rows_recv_imbalance'] or 0):>10.2f}{r['tokens_per_s']:>9.0f}")
    return res
