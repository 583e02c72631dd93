"""`moedist bench train --peer autoep`: one Hugging Face MoE model trained by moedist (`model.from_hf`)
and by DeepSpeed AutoEP (the same `transformers` model, its MoE blocks swapped by DeepSpeed's
`expert_parallel` config section), on the same batches, layout and ZeRO stage.

    python -m moedist.models.toy_hf runs/toy_qwen3_moe
    torchrun --standalone --nproc_per_node 2 -m moedist bench train --peer autoep --hf runs/toy_qwen3_moe \
        --ep-size 2 --zero-stage 2 --steps 20 --json benchmarks/train_autoep_ep2_z2.json

Both sides: fp32, dropless (AutoEP has no capacity factor, so moedist runs with
moe.capacity_factor=null), one micro-batch per rank per step, AdamW with moedist's
train.lr / adam_betas / weight_decay (DeepSpeed's torch AdamW: no JIT-compiled FusedAdam on CPU),
expert parallelism of --ep-size. Batches: random token ids (seeded by step and rank) of
shape [micro_batch_size, seq_len]; moedist gets labels shifted by one, the HF model the same ids
as labels (it shifts them itself). Steps alternate in an order reshuffled every step.

Peak memory: CUDA `max_memory_allocated` over the timed steps (reset before each step); on CPU the
tracked allocations of one extra step (`memory.AllocationTracker`: activations, gradients and
optimizer temporaries allocated inside the step; weights and optimizer states made earlier are
not counted, for either side).

Where the installed DeepSpeed has no AutoEP, or AutoEP refuses the model, the peer is listed in
`skipped` with the reason and moedist's row is still measured.
"""
from __future__ import annotations

import importlib
import os
import time
from typing import Callable, Dict, List, Optional

import torch

from moedist.bench.timing import profile_ops, round_orders, synchronize


def autoep_support() -> Optional[str]:
    """None when the installed DeepSpeed has AutoEP, else why not (version found, what is missing)."""
    try:
        import deepspeed
    except ImportError as e:
        return f"deepspeed is not installed ({e})"
    version = getattr(deepspeed, "__version__", "?")
    for mod in ("deepspeed.module_inject.auto_ep", "deepspeed.module_inject.auto_ep_config"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            return (f"deepspeed {version} has no AutoEP: {mod} is missing ({e}); AutoEP is the "
                    "`expert_parallel` config section of newer DeepSpeed releases")
    return None


def autoep_preset(model_type: str) -> Optional[str]:
    """DeepSpeed's AutoEP preset for a Hugging Face `model_type` (e.g. qwen3_moe), or None."""
    from deepspeed.module_inject.auto_ep_config import PRESET_MODELS

    return model_type if model_type in PRESET_MODELS else None


def autoep_ds_config(micro_batch: int, zero_stage: int, ep_size: int, preset: str, lr: float,
                     betas: tuple, weight_decay: float, grad_clip: float) -> dict:
    """The DeepSpeed config of the AutoEP side (pure): moedist's optimizer settings, the same ZeRO stage and EP."""
    cfg = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": 1e-8,
                                                     "weight_decay": weight_decay, "torch_adam": True}},
           "zero_optimization": {"stage": zero_stage},
           "expert_parallel": {"enabled": True, "autoep_size": ep_size, "preset_model": preset}}
    if grad_clip > 0:
        cfg["gradient_clipping"] = grad_clip
    return cfg


def batch_ids(step: int, rank: int, micro_batch: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Token ids [micro_batch, seq_len + 1] of one step on one rank: the same for both sides."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + rank)
    return torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=g)


class _MoedistSide:
    def __init__(self, cfg, dims, device):
        from moedist.models import parallelize
        from moedist.models.materialize import build_local_model
        from moedist.train.deepspeed_runner import DeepSpeedRunner
        from moedist.train.trainer import load_weights

        model = build_local_model(cfg, dims.ep_rank, cfg.parallel.ep_size, device=device)
        load_weights(cfg, model)
        parallelize(model, dims.ep_comm)
        self.runner = DeepSpeedRunner(model, cfg, dims, device)
        self.lr = cfg.train.lr

    def step(self, ids: torch.Tensor) -> float:
        from moedist.data.batch import Batch

        r = self.runner
        out = r.forward(Batch(input_ids=ids[:, :-1], labels=ids[:, 1:]))
        r.backward(out.loss)
        r.step(self.lr)
        return float(out.loss.detach())


class _AutoEPSide:
    def __init__(self, hf_dir: str, ds_config: dict, device):
        import deepspeed
        import transformers as tf

        model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                               config=ds_config)

    def step(self, ids: torch.Tensor) -> float:
        x = ids[:, :-1]
        out = self.engine(input_ids=x, labels=x)  # transformers shifts the labels itself
        self.engine.backward(out.loss)
        self.engine.step()
        return float(out.loss.detach())


def _step_memory(fn: Callable[[], object], device: torch.device) -> dict:
    from moedist.bench.memory import MB, AllocationTracker

    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return dict(peak_mem_mb=(torch.cuda.max_memory_allocated(device) - base) / MB,
                    mem_method="torch.cuda.max_memory_allocated during one step")
    tracker = AllocationTracker()
    with tracker:
        fn()
    return dict(peak_mem_mb=tracker.peak / MB, mem_method="tracked aten allocations of one step (TorchDispatchMode)")


def run_autoep_bench(config: Optional[str], overrides: List[str], steps: int, warmup: int, zero_stage: int,
                     ep_size: int, hf_dir: Optional[str], log: Callable[[str], None] = lambda s: None,
                     profile: bool = False) -> dict:
    """moedist (model.from_hf) vs DeepSpeed AutoEP on one HF MoE model; returns the JSON-ready dict.
    profile: also profile 2 more steps of each side op by op (`profiles`: this rank's self time per op)."""
    import torch.distributed as dist

    from moedist.bench import peers
    from moedist.bench.layer import environment
    from moedist.bench.train import _start, step_row
    from moedist.config import load_config
    from moedist.train import deepspeed_setup as dss
    from moedist.train.preflight import resolve_hf

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
    if not hf_dir or not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ValueError(f"--peer autoep: --hf={hf_dir!r} must be a Hugging Face model directory (config.json); "
                         "make a tiny one with `python -m moedist.models.toy_hf DIR`")
    device, created = _start()
    try:
        cfg = load_config(config, list(overrides) + [
            f"model.from_hf={os.path.abspath(hf_dir)}", "deepspeed.enabled=true", f"deepspeed.zero_stage={zero_stage}",
            f"parallel.ep_size={ep_size}", "moe.capacity_factor=null", "train.grad_accum=1"])
        cfg = resolve_hf(cfg)
        if cfg.lora.mode != "none":
            raise ValueError(f"lora.mode={cfg.lora.mode!r}: bench train --peer autoep compares full fine-tuning")
        rank, world = dist.get_rank(), dist.get_world_size()
        import transformers as tf

        hf_cfg = tf.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
        vocab = int(hf_cfg.vocab_size)
        M, S, tr = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train
        skipped: Dict[str, str] = {}
        dims = dss.init_expert_groups(ep_size)
        sides: Dict[str, object] = {"moedist": _MoedistSide(cfg, dims, device)}
        why = autoep_support()
        preset = None
        if why is None:
            preset = autoep_preset(hf_cfg.model_type)
            if preset is None:
                why = f"AutoEP has no preset for model_type={hf_cfg.model_type!r}"
        if why is None:
            try:
                ds_cfg = autoep_ds_config(M, zero_stage, ep_size, preset, tr.lr, tuple(tr.adam_betas),
                                          tr.weight_decay, tr.grad_clip)
                sides["autoep"] = _AutoEPSide(hf_dir, ds_cfg, device)
            except Exception as e:  # noqa: BLE001 - the peer refusing this model/layout is a result
                from moedist.bench.cases import one_line

                why = f"deepspeed.initialize with expert_parallel failed: {one_line(e)}"
        if why is not None:
            skipped["autoep"] = why
            log(f"skipped autoep: {why}")
        times: Dict[str, list] = {k: [] for k in sides}
        losses: Dict[str, list] = {k: [] for k in sides}
        for i, order in enumerate(round_orders(list(sides), warmup + steps, cfg.train.seed)):
            ids = batch_ids(i, rank, M, S, vocab, cfg.train.seed).to(device)
            for name in order:
                synchronize(device)
                t0 = time.perf_counter()
                loss = sides[name].step(ids)
                synchronize(device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    losses[name].append(loss)
            if rank == 0:
                log(f"step {i + 1}/{warmup + steps}: " + ", ".join(f"{k} {times[k][-1]:.0f} ms" for k in sides if times[k]))
        mem = {name: _step_memory(lambda s=s: s.step(batch_ids(warmup + steps, rank, M, S, vocab, cfg.train.seed)
                                                     .to(device)), device) for name, s in sides.items()}
        after = warmup + steps + 1  # batches no timed step has seen
        profiles = {name: profile_ops(lambda s=s: s.step(batch_ids(after, rank, M, S, vocab, cfg.train.seed).to(device)),
                                      device) for name, s in sides.items()} if profile else {}
        results = [dict(step_row(name, times[name], losses[name], M * S * world), **mem[name]) for name in sides]
        ref = next((r for r in results if r["impl"] == "autoep"), None)
        for r in results:
            r["step_time_vs_autoep"] = r["step_ms"] / ref["step_ms"] if ref else None
        m = cfg.model
        config_out = dict(config=config, overrides=list(overrides), peer="autoep", hf=os.path.abspath(hf_dir),
                          model_type=hf_cfg.model_type, autoep_preset=preset, zero_stage=zero_stage, ep_size=ep_size,
                          world_size=world, steps=steps, warmup=warmup, micro_batch_size=M, seq_len=S,
                          hidden=m.hidden_size, layers=m.num_layers, experts=cfg.moe.num_experts, topk=cfg.moe.top_k,
                          capacity_factor=None, dtype=m.dtype)
        targets = []
        if ref:
            md = results[0]
            targets.append(dict(target=f"moedist / AutoEP step time (EP={ep_size}, ZeRO-{zero_stage}, dropless)",
                                value=md["step_time_vs_autoep"], limit=0.8, ok=bool(md["step_time_vs_autoep"] <= 0.8)))
        return dict(config=config_out, environment=environment(device), results=results, skipped=skipped,
                    targets=targets, profiles=profiles)
    finally:  # also drops DeepSpeed's handle on the group, so a later run in this process starts clean
        peers.teardown_process_group(created)
