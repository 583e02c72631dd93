"""Nothing in moedist ever unpickles a file a user hands it.

A planted pickle whose loading would create a marker file is put where each entry
point looks (a DeepSpeed-style resume directory, a real moedist checkpoint, a run
directory's latest checkpoint, a Hugging Face directory) and fed to `train.resume`
(plain and DeepSpeed), `model.from_hf`, `convert`, `merge`, `extract`, `eval` and
`generate`. Each must refuse with exit 2 and one line naming the pickle file, write
no output, and the marker must never appear.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


class _Planted:
    """Unpickling this calls pathlib.Path.touch(marker): proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(folder: Path, name: str, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / name
    with open(f, "wb") as fh:
        pickle.dump({"module": _Planted(str(marker))}, fh)
    return f


def moedist(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "moedist", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_refused(res: subprocess.CompletedProcess, marker: Path, pickle_name: str) -> None:
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "WARNING" not in ln and "warn" not in ln.lower()]
    assert len(lines) == 1, err
    assert pickle_name in lines[0] and "pickle" in lines[0], lines[0]
    assert not marker.exists(), "the planted pickle was loaded"


def test_the_planted_pickle_really_runs_code(tmp_path):
    """The probe is live: plain pickle.load of the planted file creates the marker."""
    marker = tmp_path / "MARKER"
    f = plant(tmp_path, "x.pt", marker)
    with open(f, "rb") as fh:
        pickle.load(fh)  # noqa: S301 - the point of this test
    assert marker.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 1-step run (moedist checkpoints under checkpoints/ and final/)."""
    base = tmp_path_factory.mktemp("run")
    res = moedist("train", TINY, "train.max_steps=1", f"train.output_dir={base / 'run'}", "train.plot=false",
                  cwd=base)
    assert res.returncode == 0, res.stderr[-3000:]
    return base / "run"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small real Hugging Face Llama directory (config.json + model.safetensors)."""
    import torch
    import transformers as tf

    d = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_train_resume_deepspeed_format_dir_is_refused(tmp_path):
    """The reported hole: a DeepSpeed-format directory handed to train.resume under DeepSpeed."""
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "ds_ckpt" / "global_step2"
    plant(ckpt, "mp_rank_00_model_states.pt", marker)
    (tmp_path / "ds_ckpt" / "latest").write_text("global_step2")
    for resume in (ckpt, tmp_path / "ds_ckpt"):
        out = tmp_path / "out"
        res = moedist("train", TINY, "deepspeed.enabled=true", f"train.resume={resume}",
                      f"train.output_dir={out}", cwd=tmp_path)
        assert_refused(res, marker, "mp_rank_00_model_states.pt")
        assert not out.exists()


@pytest.mark.parametrize("engine", ["pytorch", "deepspeed"])
def test_train_resume_checkpoint_with_planted_pickle_is_refused(trained, tmp_path, engine):
    marker = tmp_path / "MARKER"
    ckpt = _copy(trained / "checkpoints" / "step_000001", tmp_path / "ckpt")
    plant(ckpt, "optimizer.bin", marker)
    out = tmp_path / "out"
    res = moedist("train", TINY, f"deepspeed.enabled={'true' if engine == 'deepspeed' else 'false'}",
                  f"train.resume={ckpt}", f"train.output_dir={out}", "train.max_steps=2", cwd=tmp_path)
    assert_refused(res, marker, "optimizer.bin")
    assert not out.exists()


def test_train_resume_auto_and_eval_refuse_planted_latest(trained, tmp_path):
    marker = tmp_path / "MARKER"
    run = _copy(trained, tmp_path / "run")
    plant(run / "checkpoints" / "step_000001", "rng_state_0.pth", marker)
    res = moedist("train", TINY, "train.resume=auto", f"train.output_dir={run}", "train.max_steps=2", cwd=tmp_path)
    assert_refused(res, marker, "rng_state_0.pth")
    res = moedist("eval", TINY, f"train.output_dir={run}", cwd=tmp_path)
    assert_refused(res, marker, "rng_state_0.pth")
    res = moedist("eval", TINY, f"train.resume={run / 'checkpoints' / 'step_000001'}", cwd=tmp_path)
    assert_refused(res, marker, "rng_state_0.pth")


def test_from_hf_with_pickled_weights_is_refused(hf_dir, tmp_path):
    marker = tmp_path / "MARKER"
    only_bin = tmp_path / "hf_bin"
    only_bin.mkdir()
    shutil.copy(hf_dir / "config.json", only_bin / "config.json")
    plant(only_bin, "pytorch_model.bin", marker)
    both = _copy(hf_dir, tmp_path / "hf_both")  # safetensors beside a pickle: still refused as a whole
    plant(both, "training_args.bin", marker)
    for d, name in ((only_bin, "pytorch_model.bin"), (both, "training_args.bin")):
        out = tmp_path / f"out_{d.name}"
        res = moedist("train", TINY, f"model.from_hf={d}", "lora.mode=full", f"train.output_dir={out}", cwd=tmp_path)
        assert_refused(res, marker, name)
        assert not out.exists()
        res = moedist("convert", "from-hf", str(d), str(out), cwd=tmp_path)
        assert_refused(res, marker, name)
        assert not out.exists()


def test_checkpoint_tools_refuse_planted_pickles(trained, hf_dir, tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = _copy(trained / "final", tmp_path / "final")
    plant(ckpt, "extra.pt", marker)
    out = tmp_path / "out"
    for args in (["convert", "to-hf", str(ckpt), str(out)],
                 ["extract", str(ckpt), str(out)],
                 ["merge", str(ckpt), "--base", str(hf_dir), str(out)],
                 ["merge", str(trained / "final"), "--base", str(ckpt), str(out)],
                 ["generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "2"]):
        res = moedist(*args, cwd=tmp_path)
        assert_refused(res, marker, "extra.pt")
        assert not out.exists(), args
    hf_planted = _copy(hf_dir, tmp_path / "hf_planted")
    plant(hf_planted, "pytorch_model.bin", marker)
    res = moedist("generate", str(hf_planted), "--prompt", "hi", "--max-new-tokens", "2", cwd=tmp_path)
    assert_refused(res, marker, "pytorch_model.bin")


def test_no_torch_load_without_weights_only_in_the_package():
    """The source never calls torch.load / pickle.load on anything but weights_only=True."""
    offenders = []
    for f in (ROOT / "moedist").rglob("*.py"):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or "pickle.load" in line \
                    or ".load_checkpoint(" in line and "engine" in line:
                offenders.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_written_checkpoints_hold_no_pickles(trained):
    files = [p for p in trained.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".pkl")], files
    manifest = json.loads((trained / "final" / "manifest.json").read_text())
    assert manifest["format"]
