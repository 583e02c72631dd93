"""EMA / SWA / LAWA in the trainer (issue 14, Deliver 5): arithmetic against a hand computation from
the step checkpoints, EP=1 vs EP=2 equality, resume exactness, config errors."""
import json
from pathlib import Path

import pytest
import torch

from moedist.cli import main
from tests._dist import run_workers

TINY = "configs/tiny.yaml"
STEPS = 4
# SGD with a constant LR and no clipping: weights move by a lot each step, so every average differs from
# the final weights (and from each other) by far more than the tolerance
SMALL = ["train.optimizer=sgd", "train.lr=0.5", "train.lr_schedule=constant", "train.warmup_steps=0",
         "train.weight_decay=0", "train.grad_clip=0", "train.eval_batches=2", "train.plot=false",
         "train.micro_batch_size=2", "train.grad_accum=2", "data.seq_len=32", "model.max_seq_len=32",
         "moe.num_experts=4", "train.save_every=1", "train.keep_last=0",
         "train.ema_decay=0.5", "train.swa_start=2", "train.lawa_k=2"]


def _weights(ckpt: Path) -> dict:
    """Every parameter of a checkpoint, read at EP=1 (all experts by global id)."""
    from moedist.checkpoint import load_checkpoint
    from moedist.checkpoint.io import read_manifest
    from moedist.config import config_from_dict
    from moedist.models import build_model

    raw = read_manifest(ckpt)["config"]
    raw["parallel"] = {"ep_size": 1}
    raw["train"]["resume"] = None
    model = build_model(config_from_dict(raw))
    with torch.random.fork_rng(devices=[]):
        load_checkpoint(ckpt, model, load_optim=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


_CACHE: dict = {}  # weights read once per module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The reference run (one process, EP=1), with its step-0 weights captured before training."""
    out = tmp_path_factory.mktemp("avg") / "run"
    _CACHE["w0"] = run_workers(_train_job, 1, args=([*SMALL, f"train.max_steps={STEPS}", f"train.output_dir={out}"],))[0]
    return out


def test_ema_swa_lawa_match_a_hand_computation(run):
    _check_by_hand(run, _CACHE["w0"], {kind: _cached(run, kind) for kind in ("ema", "swa", "lawa")})
    summary = json.loads((run / "summary.json").read_text())
    for kind in ("ema", "swa", "lawa"):
        assert summary[f"{kind}_val_loss"] == summary["averages"][kind]["val_loss"]
        assert summary["averages"][kind]["checkpoint"] == str(run / f"final_{kind}")
        assert summary[f"{kind}_val_loss"] != summary["val_loss"]
    assert (run / "latest").read_text().strip() == "final"  # final/ was saved after the averages


def _check_by_hand(run: Path, w0: dict, saved: dict) -> None:
    """EMA (d=0.5 from w_0), SWA (steps 2-4) and LAWA (checkpoints 3, 4) from the step checkpoints, in float64."""
    steps = [_weights(run / "checkpoints" / f"step_{s:06d}") for s in range(1, STEPS + 1)]  # w_1 .. w_4
    names = [n for n in steps[0] if not torch.equal(steps[0][n], steps[-1][n])]  # trainable: they moved
    assert len(names) > 5
    d = 0.5
    moved = {"ema": 0.0, "swa": 0.0, "lawa": 0.0}
    for n in names:
        ema = w0[n].double()
        for w in steps:
            ema = d * ema + (1 - d) * w[n].double()
        swa = sum(w[n].double() for w in steps[1:]) / 3  # steps 2, 3, 4
        lawa = (steps[2][n].double() + steps[3][n].double()) / 2  # the latest 2 checkpoints: steps 3, 4
        for kind, want in (("ema", ema), ("swa", swa), ("lawa", lawa)):
            got = saved[kind][n].double()
            assert torch.allclose(got, want, atol=1e-6, rtol=0), (kind, n, (got - want).abs().max())
            moved[kind] = max(moved[kind], float((want - steps[-1][n].double()).abs().max()))
    # the tolerance is far below how much each average differs from the last weights
    assert min(moved.values()) > 1e-4, moved


def _cached(run: Path, kind: str) -> dict:
    if kind not in _CACHE:
        _CACHE[kind] = _weights(run / f"final_{kind}")
    return _CACHE[kind]


def test_the_averages_load_in_eval(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run / "final_ema"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert got["val_loss"] == pytest.approx(summary["ema_val_loss"], rel=1e-6)


def test_resume_ends_with_the_same_averages(run, tmp_path):
    out = tmp_path / "resumed"
    # like the reference run: one gloo process (the same thread count, so the same float sums)
    run_workers(_train_job, 1, args=([*SMALL, "train.max_steps=2", f"train.output_dir={out}"],))
    run_workers(_train_job, 1, args=([*SMALL, f"train.max_steps={STEPS}", f"train.output_dir={out}",
                                      "train.resume=auto"],))
    for kind in ("ema", "swa", "lawa"):
        a, b = _weights(run / f"final_{kind}"), _weights(out / f"final_{kind}")
        for n in a:
            assert torch.equal(a[n], b[n]), (kind, n)


def _train_job(rank, world, overrides):
    """Train in a gloo process group; returns the step-0 weights of this rank."""
    from moedist.config import load_config
    from moedist.train.trainer import Trainer

    trainer = Trainer(load_config(TINY, overrides), console=False)
    w0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return w0


def test_ema_is_the_same_at_ep1_and_ep2(run, tmp_path):
    out = tmp_path / "ep2"
    # the same global batch: 2 ranks x micro 2 x accum 1 = 1 rank x micro 2 x accum 2
    run_workers(_train_job, 2, args=([*SMALL, f"train.max_steps={STEPS}", "train.grad_accum=1", "parallel.ep_size=2",
                                   f"train.output_dir={out}"],))
    manifest = json.loads((out / "final_ema" / "manifest.json").read_text())
    assert sorted(f for f in manifest["files"] if f.startswith("model-experts")) == \
        ["model-experts-ep0.safetensors", "model-experts-ep1.safetensors"]
    for kind in ("ema", "swa", "lawa"):
        a, b = _cached(run, kind), _weights(out / f"final_{kind}")
        for n in a:
            assert torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-5), (kind, n, (a[n] - b[n]).abs().max())


@pytest.mark.parametrize("extra, key", [
    (["train.ema_decay=1"], "train.ema_decay"),
    (["train.ema_decay=-0.1"], "train.ema_decay"),
    (["train.lawa_k=2"], "train.lawa_k"),  # save_every=0
    (["train.lawa_k=4", "train.save_every=1", "train.keep_last=3"], "train.lawa_k"),
    (["train.lawa_k=3", "train.save_every=2", "train.max_steps=4"], "train.lawa_k"),
    (["train.swa_start=9", "train.max_steps=4"], "train.swa_start"),
    (["train.ema_decay=0.9", "deepspeed.enabled=true", "deepspeed.zero_stage=3"], "train.ema_decay"),
])
def test_nonsense_is_one_line(extra, key, capsys, tmp_path):
    assert main(["train", TINY, f"train.output_dir={tmp_path / 'x'}", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("stage, bf16", [(0, False), (1, False), (2, False), (2, True)])
def test_averages_under_deepspeed_match_a_hand_computation(stage, bf16, tmp_path):
    """bf16: the module holds bf16 copies; the averages follow the fp32 master weights the checkpoints hold."""
    out = tmp_path / f"zero{stage}"
    # AdamW: moedist's DeepSpeed checkpoints read Adam state (SGD under ZeRO-2 cannot save a step checkpoint)
    w0 = run_workers(_train_job, 1, args=([*SMALL, f"train.max_steps={STEPS}", "train.optimizer=adamw",
                                           "train.lr=0.01", "deepspeed.enabled=true", f"deepspeed.zero_stage={stage}", f"deepspeed.bf16={str(bf16).lower()}",
                                           f"train.output_dir={out}"],))[0]
    _check_by_hand(out, w0, {"ema": _weights(out / "final_ema"), "swa": _weights(out / "final_swa"),
                             "lawa": _weights(out / "final_lawa")})
