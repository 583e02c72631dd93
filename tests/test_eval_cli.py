"""`moedist eval RUN_OR_CKPT [key=value ...] [--json]` (issue 17, Deliver 2): the run's own config.yaml,
run or checkpoint directories, converted models, and the same validation loss at 1 and 2 processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moedist.cli import main
from tests.test_ep_launch import _clean_env, free_port

TINY = "configs/tiny.yaml"
SMALL = ["train.max_steps=2", "train.warmup_steps=1", "train.eval_batches=3", "train.plot=false",
         "train.micro_batch_size=2", "data.seq_len=32", "model.max_seq_len=32"]
ROOT = Path(__file__).resolve().parents[1]


def _json_line(text):
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("{")]
    assert len(lines) == 1, text
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step EP=2-capable run (its config.yaml says parallel.ep_size=2 is fine at 1 process too)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", TINY, *SMALL, f"train.output_dir={out}", "moe.num_experts=4"]) == 0
    return out


def test_eval_a_run_directory_uses_its_own_config(run, capsys):
    capsys.readouterr()
    # no YAML: the model (4 experts, not tiny.yaml's 8) comes from the run's config.yaml
    assert main(["eval", str(run), "--json"]) == 0
    got = _json_line(capsys.readouterr().out)
    last = [json.loads(x) for x in open(run / "metrics.jsonl")][-1]
    assert got["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert got["checkpoint"] == str(run / "final") and got["step"] == 2
    # a checkpoint directory, an override, text output
    ckpt = run / "checkpoints" / "step_000002"
    assert main(["eval", str(ckpt), "train.eval_batches=1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("val_loss ") and str(ckpt) in text


def test_eval_runs_preflight_once_per_model(run, monkeypatch, capsys):
    """`moedist eval` checks every model (opening its data) before any is evaluated and hands what it opened
    to the trainer: one preflight per model, not a second one inside the Trainer."""
    from moedist.train import preflight, trainer

    calls = []
    real = preflight.preflight
    counted = lambda *a, **k: calls.append(a[1]) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(preflight, "preflight", counted)   # what the eval command imports
    monkeypatch.setattr(trainer, "preflight", counted)     # what the Trainer calls
    assert main(["eval", str(run), str(run / "checkpoints" / "step_000002"), "--json"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]) == 2
    assert calls == [1, 1]


def test_eval_at_one_and_two_processes_is_the_same(run):
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "moedist", "eval", str(run),
           "parallel.ep_size=2", "--json"]
    two = subprocess.run(cmd, env=_clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "moedist", "eval", str(run), "--json"], env=_clean_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _json_line(one.stdout), _json_line(two.stdout)
    # 3 micro-batches in all: rank 0 takes 0 and 2, rank 1 takes 1 (and runs 0 again, uncounted)
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


def test_eval_a_converted_model_and_errors(tmp_path, capsys):
    from tests.test_hf_import import make_hf

    make_hf("llama", vocab=256).save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "base")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "base"), "data.seq_len=32", "train.eval_batches=1", "--json"]) == 0
    got = _json_line(capsys.readouterr().out)
    assert got["step"] == 0 and got["val_loss"] > 0
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint found" in err[0]
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "no such run or checkpoint directory" in capsys.readouterr().err


@pytest.mark.parametrize("override, names", [("model.num_layers=3", "layers.2.input_layernorm.weight: not in"),
                                             ("model.hidden_size=32", "embed_tokens.weight: checkpoint"),
                                             ("moe.num_experts=2", "layers.0.mlp.router.weight: checkpoint")])
def test_an_architecture_override_that_does_not_fit_is_one_line(run, tmp_path, override, names):
    """A checkpoint that does not fit the model the overrides build: one line naming the tensor, exit 2,
    for eval and for train.resume (it used to be a KeyError/ValueError traceback)."""
    resume = ["train", TINY, *SMALL, f"train.output_dir={tmp_path / 'again'}", f"train.resume={run / 'final'}",
              "moe.num_experts=4", override]
    for argv in [["eval", str(run), override]] + ([resume] if override.startswith("model.hidden") else []):
        p = subprocess.run([sys.executable, "-m", "moedist", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2, p.stderr[-2000:]
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and names in err[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
