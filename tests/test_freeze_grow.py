"""moe.freeze_experts and `moedist grow` (issue 14.3).

Frozen experts (their weights, or LoRA adapters in moe_lora) and router rows are bitwise equal to the
initial model after training with weight decay at EP 1 and EP 2 while the other experts move; likewise
under DeepSpeed ZeRO-1/2 (weight decay 0), whose losses equal the plain runner's. A grown
checkpoint equals the base on old experts (bitwise), its new experts copy the group's, its new router
rows are zero, and it trains afterwards at EP 1 and EP 2 with the same losses (old experts frozen).
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests._dist import run_workers
from tests._lifelong import base_cfg, with_world, write_domains

FROZEN = [1, 5]


def _train_export(rank: int, world: int, jobs: list, outdir: str) -> list:
    from moedist.config import config_from_dict
    from moedist.train.export import export_model
    from moedist.train.trainer import Trainer

    out = []
    for label, cfg_dict in jobs:
        trainer = Trainer(config_from_dict(cfg_dict), write_outputs=False, console=False, save_checkpoints=False)
        res = trainer.train()
        export_model(trainer, f"{outdir}/{label}")
        out.append({"label": label, "loss": [r["loss"] for r in res.records]})
    return out


def _full(cfg_dict: dict, ckpt=None) -> dict:
    """{name: tensor} of the whole model (EP 1): initial weights, or those of a checkpoint."""
    from moedist.checkpoint import load_checkpoint
    from moedist.config import config_from_dict
    from moedist.models.build import build_model

    d = copy.deepcopy(cfg_dict)
    d["parallel"] = {"ep_size": 1}
    model = build_model(config_from_dict(d))
    if ckpt is not None:
        with torch.random.fork_rng(devices=[]):
            load_checkpoint(ckpt, model, load_optim=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _expert_rows(weights: dict, ids: list) -> dict:
    """The slices of expert ids: stacked expert tensors [E, ...] and router rows [E, H]."""
    return {n: t[ids] for n, t in weights.items() if ".mlp.experts." in n or n.endswith("router.weight")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("freeze")
    paths = write_domains(root / "text")
    cache = str(root / "cache")
    frozen = base_cfg(paths, cache, freeze_experts=FROZEN)
    lora = copy.deepcopy(frozen)
    lora["lora"] = {"mode": "moe_lora", "rank": 4}
    no_decay = copy.deepcopy(frozen)
    no_decay["train"]["weight_decay"] = 0.0
    accum = copy.deepcopy(frozen)
    accum["train"]["grad_accum"] = 2   # the snapshot/restore happens around the stepping micro-batch only
    zero = {st: copy.deepcopy(no_decay) for st in (1, 2)}
    for st, cfg in zero.items():
        cfg["deepspeed"] = {"enabled": True, "zero_stage": st}
    jobs = [("freeze_ep1", with_world(frozen, 2, 1)), ("freeze_ep2", with_world(frozen, 2, 2)),
            ("lora_ep2", with_world(lora, 2, 2)), ("base", with_world(base_cfg(paths, cache), 2, 2)),
            ("plain_wd0_ep2", with_world(no_decay, 2, 2)), ("zero1_ep1", with_world(zero[1], 2, 1)),
            ("zero2_ep2", with_world(zero[2], 2, 2)), ("accum_ep2", with_world(accum, 2, 2))]
    res = run_workers(_train_export, 2, args=(jobs, str(root / "out")), timeout=400)[0]
    return {"root": root, "paths": paths, "cache": cache, "jobs": dict(jobs), "res": {r["label"]: r for r in res}}


@pytest.mark.slow
def test_frozen_experts_bitwise_unchanged_at_ep1_and_ep2(runs):
    for label in ("freeze_ep1", "freeze_ep2", "lora_ep2", "zero1_ep1", "zero2_ep2", "accum_ep2"):
        cfg = runs["jobs"][label]
        before, after = _full(cfg), _full(cfg, runs["root"] / "out" / label)
        trains = {n for n, t in before.items() if ".mlp.experts." in n or n.endswith("router.weight")}
        if label == "lora_ep2":
            trains = {n for n in trains if "lora_" in n or n.endswith("router.weight")}
        assert trains
        for n in trains:
            assert torch.equal(before[n][FROZEN], after[n][FROZEN]), (label, n)
            moved = [e for e in range(before[n].shape[0]) if e not in FROZEN
                     and not torch.equal(before[n][e], after[n][e])]
            assert moved, (label, n)           # the other experts (in both groups) train
    for got, want in (("freeze_ep2", "freeze_ep1"), ("zero1_ep1", "plain_wd0_ep2"), ("zero2_ep2", "plain_wd0_ep2")):
        a, b = runs["res"][got]["loss"], runs["res"][want]["loss"]
        assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b)), (got, a, b)


def test_deepspeed_freeze_needs_no_weight_decay(tmp_path):
    from moedist.config import ConfigError, config_from_dict

    cfg = base_cfg(write_domains(tmp_path / "text"), str(tmp_path / "cache"), freeze_experts=FROZEN)
    cfg["deepspeed"] = {"enabled": True, "zero_stage": 2}
    with pytest.raises(ConfigError, match="needs train.weight_decay=0"):
        config_from_dict(cfg)
    cfg["train"]["weight_decay"] = 0.0
    cfg["deepspeed"]["zero_stage"] = 3
    with pytest.raises(ConfigError, match="zero_stage=3"):
        config_from_dict(cfg)


@pytest.mark.slow
def test_grow_keeps_old_experts_and_trains_at_ep1_ep2(runs, capsys):
    from moedist.checkpoint.grow import main_grow
    from moedist.checkpoint.io import read_manifest

    base = runs["root"] / "out" / "base"
    out = runs["root"] / "grown"
    assert main_grow([str(base), "--add-experts", "2", "--group", "code", str(out)]) == 0
    assert main_grow([str(base), "--add-experts", "2", "--group", "code", str(out)]) == 2      # OUT not empty
    assert "not an empty directory" in capsys.readouterr().err
    assert main_grow([str(base), "--add-experts", "2", "--group", "nope", str(runs["root"] / "g2")]) == 2
    assert not (runs["root"] / "g2").exists()
    stored = read_manifest(out)["config"]["moe"]
    assert stored["num_experts"] == 10 and stored["expert_groups"]["code"] == [4, 5, 6, 7, 8, 9]

    base_cfg_dict = runs["jobs"]["base"]
    grown_cfg = copy.deepcopy(base_cfg_dict)
    grown_cfg["moe"].update(num_experts=10, expert_groups={"prose": [0, 1, 2], "code": [4, 5, 6, 7, 8, 9]})
    old, new = _full(base_cfg_dict, base), _full(grown_cfg, out)
    for n, t in old.items():
        if ".mlp.experts." in n or n.endswith("router.weight"):
            assert torch.equal(new[n][:8], t), n                        # old experts and router rows: bitwise
            if n.endswith("router.weight"):
                assert torch.equal(new[n][8:], torch.zeros_like(t[:2]))
            else:
                assert torch.equal(new[n][8:], t[[4, 5]]), n            # copies of the group's first members
        else:
            assert torch.equal(new[n], t), n

    # train the grown model with the old experts frozen: EP 1 = EP 2, old experts still bitwise the base's
    grown_cfg["model"]["init_from"] = str(out)
    grown_cfg["moe"]["freeze_experts"] = list(range(8))
    jobs = [("grown_ep1", with_world(grown_cfg, 2, 1)), ("grown_ep2", with_world(grown_cfg, 2, 2))]
    res = run_workers(_train_export, 2, args=(jobs, str(runs["root"] / "out2")), timeout=400)[0]
    a, b = res[0]["loss"], res[1]["loss"]
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b)), (a, b)
    after = _full(grown_cfg, runs["root"] / "out2" / "grown_ep2")
    for n, t in old.items():
        if ".mlp.experts." in n or n.endswith("router.weight"):
            assert torch.equal(after[n][:8], t), n
            assert not torch.equal(after[n][8:], new[n][8:]), n         # the new experts learn


@pytest.mark.slow
def test_grow_lora_experts_copies_adapters(runs):
    """moe_lora: the new experts' LoRA adapters copy the group's; the old ones and the shared base are bitwise."""
    from moedist.checkpoint.grow import main_grow

    src = runs["root"] / "out" / "lora_ep2"
    out = runs["root"] / "grown_lora"
    assert main_grow([str(src), "--add-experts", "3", "--group", "prose", str(out)]) == 0
    cfg = runs["jobs"]["lora_ep2"]
    grown_cfg = copy.deepcopy(cfg)
    grown_cfg["moe"].update(num_experts=11, expert_groups={"prose": [0, 1, 2, 8, 9, 10], "code": [4, 5, 6, 7]})
    old, new = _full(cfg, src), _full(grown_cfg, out)
    lora = [n for n in old if "lora_" in n and ".mlp.experts." in n]
    assert lora
    for n, t in old.items():
        if n in lora or n.endswith("router.weight"):
            assert torch.equal(new[n][:8], t), n
            assert torch.equal(new[n][8:], t[[0, 1, 2]] if n in lora else torch.zeros_like(t[:3])), n
        else:
            assert torch.equal(new[n], t), n
