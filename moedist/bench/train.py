"""`moedist bench train`: end-to-end training tokens/s of the tiny model, moedist's MoE
layers against the same model with DeepSpeed's native MoE, under the same DeepSpeed
engine and ZeRO stage.

    python -m moedist.bench.cli train --config configs/tiny.yaml --zero-stage 1 --steps 20
    torchrun --standalone --nproc_per_node 2 -m moedist.bench.cli train --ep-size 2 --zero-stage 2

Both models come from one `build_model(cfg)`: the DeepSpeed one has every
`MoELayer` replaced by `deepspeed.moe.layer.MoE` holding the same router and
expert weights (top-2 gating without 2nd-expert sampling, drop by position, as
moedist with `moe.drop_policy=position`, which this benchmark sets). Everything
else (attention, embeddings, optimizer, data) is identical. The two engines
step round robin on the same batches; a step is forward + backward + optimizer
step of one micro-batch per rank.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from moedist.bench import peers
from moedist.bench.layer import environment
from moedist.bench.report import profile_lines
from moedist.bench.timing import round_orders, summarize, synchronize


class DeepSpeedNativeBlock(nn.Module):
    """A model FFN slot holding `deepspeed.moe.layer.MoE`; returns (y, MoEAux) like MoELayer."""

    def __init__(self, layer, ep_size: int, ep_rank: int):
        super().__init__()
        from moedist.moe.layer import MoELayer

        assert isinstance(layer, MoELayer)
        cf = layer.capacity_factor
        self.ds = peers.DeepSpeedMoE(layer.router.weight.detach(), layer.experts, layer.router.top_k, cf,
                                     drop_tokens=cf is not None, min_capacity=layer.min_capacity, ep_size=ep_size,
                                     ep_rank=ep_rank, set_groups=False)
        self.moe = self.ds.moe  # the engine looks for MoE instances among the modules
        self.aux_loss_coef = layer.aux_loss_coef
        self.num_experts = layer.num_experts

    def forward(self, x_BSH: torch.Tensor):
        from moedist.moe.layer import MoEAux

        y, l_aux, counts = self.ds.forward_with_aux(x_BSH)
        zero = l_aux.detach() * 0.0
        cap = self.ds.capacity
        aux = MoEAux(loss=self.aux_loss_coef * l_aux, aux_loss=l_aux.detach(), z_loss=zero,
                     tokens_per_expert=counts.detach().long(), dropped_per_expert=torch.zeros_like(counts).long(),
                     dropped_frac=zero.float(), router_entropy=zero.float(), capacity=cap,
                     a2a_bytes=self.ds.a2a_bytes(x_BSH.element_size()))
        return y, aux


def swap_in_deepspeed_moe(model: nn.Module, ep_size: int, ep_rank: int) -> int:
    """Replace every MoELayer (experts all local, before parallelize) by DeepSpeed's MoE. Returns the count."""
    from moedist.moe.layer import MoELayer

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoELayer):
                if child.shared_experts is not None:
                    raise ValueError("bench train: moe.num_shared_experts must be 0 (DeepSpeed's MoE has no shared experts)")
                setattr(parent, name, DeepSpeedNativeBlock(child, ep_size, ep_rank))
                n += 1
    return n


def step_row(impl: str, times_ms: List[float], losses: List[float], global_tokens: int) -> dict:
    """One impl's row of a train bench: step time spread, tokens/s (every rank steps in lock-step:
    global tokens / median step time), first and last loss."""
    s = summarize(times_ms)
    return dict(impl=impl, step_ms=s["median"], step_ms_p10=s["p10"], step_ms_p90=s["p90"], step_ms_q25=s["q25"],
                step_ms_q75=s["q75"], step_ms_min=s["min"], step_ms_max=s["max"],
                tokens_per_s=global_tokens / (s["median"] / 1e3), loss_first=losses[0], loss_last=losses[-1])


def _start() -> tuple:
    """(this rank's device, whether this call created the process group): the set-up of every train bench."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    return device, _init_dist(device)


def _init_dist(device: torch.device) -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(peers._free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def run_train_bench(config: Optional[str], overrides: List[str], steps: int, warmup: int, zero_stage: int,
                    ep_size: int, log: Callable[[str], None] = lambda s: None) -> dict:
    """Time `steps` training steps of both models (after `warmup`); returns the JSON-ready dict."""
    import torch.distributed as dist

    from moedist.config import load_config
    from moedist.models import build_model, parallelize
    from moedist.train import deepspeed_setup as dss
    from moedist.train.data import ByteLMData
    from moedist.train.deepspeed_runner import DeepSpeedRunner

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
    device, created = _start()
    try:
        cfg = load_config(config, list(overrides) + ["deepspeed.enabled=true", f"deepspeed.zero_stage={zero_stage}",
                                                     f"parallel.ep_size={ep_size}", "moe.drop_policy=position",
                                                     "train.grad_accum=1"])
        if zero_stage == 3:
            raise ValueError("--zero-stage=3: DeepSpeed refuses its native MoE under ZeRO-3; compare at 0, 1 or 2")
        if cfg.lora.mode != "none":
            raise ValueError(f"lora.mode={cfg.lora.mode!r}: bench train compares plain MoE layers; use lora.mode=none")
        rank, world = dist.get_rank(), dist.get_world_size()
        dims = dss.init_expert_groups(ep_size)
        data = ByteLMData.from_config(cfg.data)
        torch.manual_seed(cfg.train.seed)
        model_a = build_model(cfg)
        model_b = build_model(cfg)  # same seeds: same weights
        n_moe = swap_in_deepspeed_moe(model_b, ep_size, dims.ep_rank)
        parallelize(model_a, dims.ep_comm)
        runners = {"moedist": DeepSpeedRunner(model_a, cfg, dims, device),
                   "deepspeed": DeepSpeedRunner(model_b.to(device), cfg, dims, device)}
        M, S = cfg.train.micro_batch_size, cfg.data.seq_len
        times = {k: [] for k in runners}
        losses = {k: [] for k in runners}
        lr = cfg.train.lr
        # the order of the two engines is reshuffled every step (same seed on every rank)
        for i, order in enumerate(round_orders(list(runners), warmup + steps, cfg.train.seed)):
            batch = data.train_micro((i * world + rank) * M, M).to(device)
            for name in order:
                r = runners[name]
                synchronize(device)
                t0 = time.perf_counter()
                out = r.forward(batch)
                r.backward(out.loss)
                r.step(lr)
                synchronize(device)
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[name].append(dt * 1e3)
                    losses[name].append(float(out.loss.detach()))
            if rank == 0:
                log(f"step {i + 1}/{warmup + steps}: " + ", ".join(f"{k} {times[k][-1]:.0f} ms" for k in runners if times[k]))
        results = [step_row(name, times[name], losses[name], M * S * world) for name in runners]
        ref = results[1]["step_ms"]
        for r in results:
            r["step_time_vs_deepspeed"] = r["step_ms"] / ref
        m = cfg.model
        config_out = dict(config=config, overrides=list(overrides), zero_stage=zero_stage, ep_size=ep_size,
                          world_size=world, steps=steps, warmup=warmup, micro_batch_size=M, seq_len=S,
                          hidden=m.hidden_size, layers=m.num_layers, ffn=m.ffn_size, moe_layers=n_moe,
                          experts=cfg.moe.num_experts, topk=cfg.moe.top_k, capacity_factor=cfg.moe.capacity_factor,
                          dtype=m.dtype)
        return dict(config=config_out, environment=environment(device), results=results)
    finally:  # also drops DeepSpeed's handle on the group, so a later run in this process starts clean
        peers.teardown_process_group(created)


def run_train_from_args(args) -> Optional[dict]:
    import sys

    import torch.distributed as dist

    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(f"[bench train] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if getattr(args, "peer", "deepspeed") == "autoep":
        from moedist.bench.autoep import run_autoep_bench

        res = run_autoep_bench(args.config, args.set or [], args.steps, args.warmup, args.zero_stage, args.ep_size,
                               args.hf, log=log, profile=args.profile)
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_autoep(res))
        return res if int(os.environ.get("RANK", "0")) == 0 else None
    if args.profile:
        raise ValueError("--profile: only with --peer autoep")
    res = run_train_bench(args.config, args.set or [], args.steps, args.warmup, args.zero_stage, args.ep_size, log=log)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return None
    c = res["config"]
    print(f"tiny model: {c['layers']} layers, H={c['hidden']}, {c['moe_layers']} MoE layers of {c['experts']} experts "
          f"top-{c['topk']}, cf={c['capacity_factor']}, batch {c['micro_batch_size']}x{c['seq_len']} per rank, "
          f"{c['world_size']} rank(s), EP {c['ep_size']}, ZeRO-{c['zero_stage']}")
    for r in res["results"]:
        print(f"{r['impl']:<10} step {r['step_ms']:8.1f} ms (p10 {r['step_ms_p10']:.1f}, p90 {r['step_ms_p90']:.1f})  "
              f"{r['tokens_per_s']:9.0f} tokens/s  x DS {r['step_time_vs_deepspeed']:.2f}  "
              f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    return res


def format_autoep(res: dict) -> str:
    """The printed table of `bench train --peer autoep` (step time median, IQR, tokens/s, peak memory)."""
    c = res["config"]
    lines = [f"{c['model_type']} from {c['hf']}: {c['layers']} layers, H={c['hidden']}, {c['experts']} experts "
             f"top-{c['topk']}, dropless, batch {c['micro_batch_size']}x{c['seq_len']} per rank, {c['world_size']} "
             f"rank(s), EP {c['ep_size']}, ZeRO-{c['zero_stage']}"]
    for r in res["results"]:
        vs = r.get("step_time_vs_autoep")
        lines.append(f"{r['impl']:<8} step {r['step_ms']:8.1f} ms (IQR {r['step_ms_q25']:.1f}-{r['step_ms_q75']:.1f}, "
                     f"min-max {r['step_ms_min']:.1f}-{r['step_ms_max']:.1f})  {r['tokens_per_s']:9.0f} tokens/s  "
                     f"peak {r['peak_mem_mb']:.1f} MB  x AutoEP {'-' if vs is None else format(vs, '.2f')}  "
                     f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    for t in res.get("targets", []):
        lines.append(f"target {'OK  ' if t['ok'] else 'MISS'} {t['target']}: {t['value']:.3f} (<= {t['limit']})")
    for k, v in res.get("skipped", {}).items():
        lines.append(f"skipped {k}: {v}")
    return "\n".join(lines + profile_lines(res.get("profiles", {}), "training step, rank 0"))
