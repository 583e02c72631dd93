"""ZeRO-3 partitioned construction (issue 11 item 1): no rank holds the whole non-expert model.

Under `deepspeed.zero_stage=3` the trainer builds with `build_partitioned_model`: one decoder
layer is allocated and drawn at a time and handed to DeepSpeed's `zero.Init` conversion, which
keeps this rank's partition only. Checked on 2 gloo processes at EP=2, against independent
references:

* values: every gathered parameter equals the whole-model build (`build_local_model`) bitwise;
* memory: the construction's peak RSS (VmHWM, reset through /proc/self/clear_refs) against the
  route it replaces (whole model, then `zero.Init(module=...)` as `deepspeed.initialize` does):
  the non-expert weights, which dominate this model, are held whole on no rank;
* training: the losses of a ZeRO-3 run equal the ZeRO-2 run's (1e-5 relative).
"""
from __future__ import annotations

import copy

import pytest

from tests._dist import run_workers

LAYERS = 8
CFG = {
    "name": "z3init",
    "model": {"hidden_size": 384, "num_layers": LAYERS, "num_heads": 4, "num_kv_heads": 4, "ffn_size": 1536,
              "max_seq_len": 32, "moe_every": 4},
    "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_size": 64, "capacity_factor": None},
    "train": {"max_steps": 3, "lr": 1e-3, "warmup_steps": 0, "micro_batch_size": 2, "grad_accum": 1, "seed": 3,
              "eval_batches": 1, "log_every": 100, "grad_clip": 1.0},
    "data": {"source": "pydoc", "seq_len": 32},
    "parallel": {"ep_size": 2},
    "deepspeed": {"enabled": True, "zero_stage": 3,
                  "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
}


def _reset_peak() -> float:
    """Reset this process's VmHWM to its RSS now (Linux clear_refs '5'); returns the RSS in MiB."""
    from moedist.train.memory import rss_mb

    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    return rss_mb()


def _construct(rank: int, world: int) -> dict:
    import gc

    import deepspeed
    import torch

    from moedist.config import config_from_dict
    from moedist.models.materialize import build_local_model, build_meta_model, build_partitioned_model
    from moedist.moe.experts import EXPERT_ATTR
    from moedist.train import deepspeed_setup as dss
    from moedist.train.memory import hwm_mb

    cfg = config_from_dict(copy.deepcopy(CFG))
    dims = dss.init_expert_groups(2)
    partition = dss.zero3_partitioner(cfg, dims)
    meta = build_meta_model(cfg)
    dense_mb = sum(p.numel() * 4 for p in meta.parameters() if not getattr(p, EXPERT_ATTR, False)) / 2 ** 20

    base = _reset_peak()
    model = build_partitioned_model(cfg, partition, dims.ep_rank, 2, meta_model=meta)
    new_peak = hwm_mb() - base
    held = sum(p.data.numel() for p in model.parameters())  # whole tensors left on this rank
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    ref = build_local_model(cfg, dims.ep_rank, 2).state_dict()
    same = []
    for name, p in model.named_parameters():
        with dss.gathered([p]):
            same.append((name, torch.equal(p.data, ref[name])))
    del model, ref
    gc.collect()

    base = _reset_peak()
    old = build_local_model(cfg, dims.ep_rank, 2, meta_model=build_meta_model(cfg))
    dss.tag_expert_params(old.parameters(), 2, 3, dims)
    deepspeed.zero.Init(module=old, config_dict_or_path=dss.ds_config(cfg, world))
    old_peak = hwm_mb() - base
    return {"new_peak": new_peak, "old_peak": old_peak, "dense_mb": dense_mb, "held": held, "local": local,
            "same": same}


def test_zero3_construction_holds_a_partition_and_draws_the_same_weights(monkeypatch):
    # glibc raises its mmap threshold as large blocks are freed and then keeps freed memory in the
    # heap, where a later allocation reuses it unseen by RSS: a fixed threshold returns it at once
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    ranks = run_workers(_construct, 2, timeout=280)
    for r in ranks:
        print(f"construction peak: partitioned {r['new_peak']:.1f} MiB, whole-then-partition "
              f"{r['old_peak']:.1f} MiB, non-expert fp32 weights {r['dense_mb']:.1f} MiB")
        assert r["same"] and all(ok for _, ok in r["same"]), [n for n, ok in r["same"] if not ok]
        assert r["held"] == 0 and r["local"] > 0
        assert r["old_peak"] >= 0.9 * r["dense_mb"]  # the route replaced: the whole model on each rank
        # half of the weights (world 2) plus one decoder layer whole, plus allocator slack (seen: 4-9 MiB;
        # the whole model would be >= 59 MiB here, so 12 MiB still separates the two)
        assert r["new_peak"] <= (0.5 + 1.0 / LAYERS) * r["dense_mb"] + 12, r
        assert r["new_peak"] <= 0.75 * r["old_peak"], r


def _keep(model) -> None:
    """A `model_init` that changes nothing: it makes the trainer build whole (the route replaced)."""


def _losses(rank: int, world: int) -> dict:
    from moedist.config import config_from_dict
    from moedist.train.trainer import Trainer

    out = {}
    for label, stage, init in (("zero2", 2, None), ("zero3", 3, None), ("zero3 whole", 3, _keep)):
        d = copy.deepcopy(CFG)
        d["deepspeed"]["zero_stage"] = stage
        if stage != 3:
            d["deepspeed"].pop("extra")
        t = Trainer(config_from_dict(d), model_init=init, write_outputs=False, console=False, save_checkpoints=False)
        out[label] = [(r["loss"], r["grad_norm"]) for r in t.train().records]
    return out


@pytest.mark.slow  # about a minute: three engines of an 8-layer model (test_train_equivalence covers ZeRO-3 too)
def test_zero3_partitioned_build_trains_like_zero2():
    ranks = run_workers(_losses, 2, timeout=280)
    got = ranks[0]
    print(got)
    assert got["zero3"] == got["zero3 whole"]  # the same engine state as building whole: bitwise
    z2, z3 = got["zero2"], got["zero3"]
    assert len(z2) == 3 and z2[-1][0] != z2[0][0]
    for (a, _), (b, _) in zip(z3, z2):
        assert abs(a - b) <= 1e-5 * abs(b), (z3, z2)


def _loaded(rank: int, world: int, overrides: list) -> list:
    """Parameters of `overrides` (model.from_hf or model.init_from) built at ZeRO-3 layer by layer
    with the loader run per layer, against the whole build + loader: names of the ones that differ."""
    import torch

    from moedist.config import load_config
    from moedist.models.materialize import build_local_model, build_meta_model, build_partitioned_model
    from moedist.train import deepspeed_setup as dss
    from moedist.train.preflight import resolve_hf
    from moedist.train.trainer import load_weights

    cfg = resolve_hf(load_config(None, overrides))
    dims = dss.init_expert_groups(2)
    calls = []

    def load(m) -> None:
        load_weights(cfg, m, verify=not calls)
        calls.append(1)

    model = build_partitioned_model(cfg, dss.zero3_partitioner(cfg, dims), dims.ep_rank, 2,
                                    meta_model=build_meta_model(cfg), load=load)
    ref = build_local_model(cfg, dims.ep_rank, 2)
    load_weights(cfg, ref)
    ref = ref.state_dict()
    differ = []
    for name, p in model.named_parameters():
        with dss.gathered([p]):
            if not torch.equal(p.data, ref[name]):
                differ.append(name)
    assert len(calls) == cfg.model.num_layers + 1
    return differ


def test_zero3_construction_loads_from_hf_and_init_from(tmp_path):
    """model.from_hf (a toy Qwen3-MoE) and model.init_from (its `moedist convert from-hf` checkpoint) under
    ZeRO-3: loaded layer by layer into the partitioned build, every weight equals the whole build's."""
    from moedist.cli import main
    from moedist.models.toy_hf import make_toy_hf_model

    hf = make_toy_hf_model(str(tmp_path / "hf"), seed=0, num_layers=2)
    assert main(["convert", "from-hf", hf, str(tmp_path / "ckpt")]) == 0
    common = ["parallel.ep_size=2", "deepspeed.enabled=true", "deepspeed.zero_stage=3", "lora.mode=expert_lora",
              "moe.capacity_factor=null"]
    for source in (f"model.from_hf={hf}", f"model.init_from={tmp_path / 'ckpt'}"):
        ranks = run_workers(_loaded, 2, args=(common + [source],), timeout=280)
        assert ranks == [[], []], (source, ranks)
