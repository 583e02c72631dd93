"""Aux-loss-free balancing (moe.expert_bias + moe.expert_bias_update_rate, issue 18.4).

* `ExpertBiasUpdater` over 3 steps of 2 micro-batches against a hand loop: routing by
  sigmoid(x W^T) + bias (tests/moe_reference.ref_route), the load counted before capacity
  dropping, b += rate * sign(mean - load) on python floats (ref_bias_update);
* on a router skewed towards one expert, the updates shrink the load imbalance;
* the trainer, 2 gloo processes: EP=1, EP=2 and DeepSpeed ZeRO-2 EP=2 give the same losses
  and the same biases on every rank, and the final bias equals rate * sum over steps of
  sign(mean - load) of the GLOBAL per-step loads the trainer logged.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from moedist.moe import GroupedExperts, MoELayer, Router
from moedist.train.balance import ExpertBiasUpdater
from tests._dist import run_workers
from tests.moe_reference import ref_bias_update, ref_route

E, H, F = 8, 6, 8


def _layer(cf=None, seed=1) -> MoELayer:
    router = Router(H, E, 2, score_func="sigmoid", expert_bias=True, init_std=0.7, seed=seed)
    return MoELayer(router, GroupedExperts(E, H, F, init_std=0.4, seed=2), capacity_factor=cf)


def test_update_over_three_steps_matches_hand_loop():
    rate = 0.05
    layer = _layer(cf=0.5)
    upd = ExpertBiasUpdater(nn.ModuleList([layer]), rate)
    assert upd.enabled
    bias_ref = [0.0] * E
    w64 = layer.router.weight.detach().double()
    dropped = 0
    for step in range(3):
        load = [0] * E
        for micro in range(2):
            x = torch.randn(2, 5 + micro, H, generator=torch.Generator().manual_seed(10 * step + micro))
            _, aux = layer(x)
            upd.add([aux])
            dropped += int(aux.dropped_per_expert.sum())
            r = ref_route(x.double().reshape(-1, H), {"weight": w64, "bias": torch.tensor(bias_ref)}, 2, "sigmoid")
            for chosen in r["idx"]:  # every routed pair, kept or dropped by capacity
                for e in chosen:
                    load[e] += 1
        upd.step()
        bias_ref = ref_bias_update(bias_ref, load, rate)
        torch.testing.assert_close(layer.router.expert_bias, torch.tensor(bias_ref, dtype=torch.float32),
                                   atol=1e-7, rtol=0)
    assert dropped > 0  # the load is counted before dropping, and dropping happened
    assert all(abs(b) > 0 for b in bias_ref)
    x = torch.randn(4, 8, H, generator=torch.Generator().manual_seed(99)).double().reshape(-1, H)
    biased = ref_route(x, {"weight": w64, "bias": torch.tensor(bias_ref)}, 2, "sigmoid")["idx"]
    unbiased = ref_route(x, {"weight": w64, "bias": None}, 2, "sigmoid")["idx"]
    assert biased != unbiased  # the bias changes which experts are chosen (so the 3 steps fed back)


def test_updater_off_without_bias_or_rate():
    layer = _layer()
    assert not ExpertBiasUpdater(nn.ModuleList([layer]), 0.0).enabled
    plain = MoELayer(Router(H, E, 2, seed=1), GroupedExperts(E, H, F))
    upd = ExpertBiasUpdater(nn.ModuleList([plain]), 0.001)
    assert not upd.enabled and upd.step() is None


def test_bias_reduces_imbalance_on_skewed_router():
    layer = _layer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, H, generator=g) + 1.0  # every token leans the same way ...
    with torch.no_grad():
        layer.router.weight[0] = 2.0  # ... towards expert 0
        layer.router.weight[1] = 1.0
    upd = ExpertBiasUpdater(nn.ModuleList([layer]), 0.01)

    def imbalance() -> float:
        with torch.no_grad():
            _, aux = layer(x)
        load = aux.tokens_per_expert.double()
        return float(load.max() / load.mean())

    before = imbalance()
    for _ in range(300):
        with torch.no_grad():
            _, aux = layer(x)
        upd.add([aux])
        upd.step()
    after = imbalance()
    assert before > 3.0  # expert 0 takes (nearly) every token
    assert after < 1.75 and after < before / 2, (before, after)
    b = layer.router.expert_bias
    assert b[0] < 0 and b[1] < 0 and b.max() > 0  # the favoured experts pushed down, others up


def test_bias_is_saved_and_loaded_with_the_checkpoint(tmp_path):
    from moedist.checkpoint import load_checkpoint, save_checkpoint
    from moedist.config import load_config
    from moedist.models import build_model, moe_layers

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.ffn_size=48", "moe.num_experts=4",
                             "moe.score_func=sigmoid", "moe.expert_bias=true"])
    model = build_model(cfg)
    with torch.no_grad():
        for i, layer in enumerate(moe_layers(model)):
            layer.router.expert_bias.copy_(torch.arange(4.0) * 0.001 * (i + 1))
    names = [n for n, _ in model.named_buffers() if n.endswith("router.expert_bias")]
    assert len(names) == 2 and not any(n.endswith("expert_bias") for n, _ in model.named_parameters())  # no optimizer
    save_checkpoint(tmp_path / "c", model, step=1)
    fresh = build_model(cfg)
    load_checkpoint(tmp_path / "c", fresh)
    for a, b in zip(moe_layers(model), moe_layers(fresh)):
        assert torch.equal(a.router.expert_bias, b.router.expert_bias)


# ------------------------------------------------------------------ the trainer, 2 processes
STEPS, RATE = 3, 0.01
BASE = {
    "name": "bias",
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_size": 48,
              "max_seq_len": 32},
    "moe": {"num_experts": 8, "top_k": 2, "capacity_factor": None, "score_func": "sigmoid", "expert_bias": True,
            "expert_bias_update_rate": RATE, "aux_loss_coef": 0.0},
    "train": {"max_steps": STEPS, "lr": 3e-3, "warmup_steps": 1, "micro_batch_size": 2, "grad_accum": 2, "seed": 7,
              "eval_batches": 1, "log_every": 100},
    "data": {"source": "pydoc", "seq_len": 32},
}


def _cfg(ep: int, deepspeed: bool, bf16: bool = False) -> dict:
    cfg = copy.deepcopy(BASE)
    cfg["parallel"] = {"ep_size": ep}
    cfg["deepspeed"] = {"enabled": deepspeed, "zero_stage": 2 if deepspeed else 0, "bf16": bf16}
    return cfg


def _train(rank: int, world: int, jobs: list) -> list:
    from moedist.config import config_from_dict
    from moedist.models import moe_layers
    from moedist.train.trainer import Trainer

    out = []
    for label, cfg_dict in jobs:
        trainer = Trainer(config_from_dict(cfg_dict), write_outputs=False, console=False, save_checkpoints=False)
        res = trainer.train()
        out.append({"label": label, "loss": [r["loss"] for r in res.records],
                    "load": [r["expert_tokens"] for r in res.records],
                    "bias": [m.router.expert_bias.detach().cpu().clone() for m in moe_layers(trainer.model)],
                    "bias_dtype": {str(m.router.expert_bias.dtype) for m in moe_layers(trainer.model)}})
    return out


@pytest.mark.timeout(600)
def test_trainer_bias_same_at_ep1_ep2_and_deepspeed_from_global_load():
    jobs = [("ep1", _cfg(1, False)), ("ep2", _cfg(2, False)), ("ds_zero2_ep2", _cfg(2, True)),
            ("ds_zero2_ep2_bf16", _cfg(2, True, bf16=True))]
    results = run_workers(_train, 2, args=(jobs,), timeout=600)
    ref = results[0][0]
    assert len(ref["bias"]) == 2
    # hand reference from the global per-step loads the trainer logged (dropless: logged = routed)
    for res in (ref, results[0][3]):
        for l in range(2):
            want = [0.0] * E
            for step in range(STEPS):
                want = ref_bias_update(want, res["load"][step][l], RATE)
            torch.testing.assert_close(res["bias"][l], torch.tensor(want, dtype=torch.float32), atol=1e-7, rtol=0)
            assert any(abs(b) > 0 for b in want)
    assert results[0][3]["bias_dtype"] == {"torch.float32"}  # DeepSpeed bf16 casts buffers; the bias is kept fp32
    assert sum(ref["load"][0][0]) == 8 * 32 * 2  # global: 2 ranks x 2 micro-batches x 2 sequences x 32 tokens x K
    for rank_res in results:
        assert rank_res[3]["load"] == results[0][3]["load"]
        assert all(torch.equal(a, b) for a, b in zip(rank_res[3]["bias"], results[0][3]["bias"]))
        for res in rank_res[:3]:
            assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5), res["label"]
            assert res["load"] == ref["load"], res["label"]
            for got, want in zip(res["bias"], ref["bias"]):
                torch.testing.assert_close(got, want, atol=1e-7, rtol=0, msg=res["label"])
