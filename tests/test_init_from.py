"""model.init_from (issue 17, Deliver 1): a converted model or a run directory starts a new run at step 0;
train.resume accepts a run directory; a converted checkpoint given to train.resume is one line."""
import json

import pytest
import torch

from moedist.cli import main
from tests.test_hf_import import make_hf

TINY = "configs/tiny.yaml"
SMALL = ["train.max_steps=2", "train.warmup_steps=1", "train.eval_batches=1", "train.plot=false",
         "train.micro_batch_size=2", "data.seq_len=32", "model.max_seq_len=32"]


def _metrics(path):
    return [json.loads(line) for line in open(path)]


def _first_loss_of_hf(hf_dir, tmp_path, extra):
    """step-1 lm_loss of a run started with model.from_hf (the reference for init_from)."""
    out = tmp_path / "ref"
    assert main(["train", TINY, f"model.from_hf={hf_dir}", f"train.output_dir={out}", *SMALL, *extra]) == 0
    return _metrics(out / "metrics.jsonl")[0]["lm_loss"]


@pytest.mark.parametrize("lora", ["none", "full", "moe_lora"])
def test_convert_from_hf_then_train_equals_from_hf(tmp_path, lora):
    make_hf("llama", vocab=256).save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "base")]) == 0
    extra = [f"lora.mode={lora}", "lora.rank=4", "moe.capacity_factor=null"]
    ref = _first_loss_of_hf(tmp_path / "hf", tmp_path, extra)
    out = tmp_path / "ft"
    assert main(["train", TINY, f"model.init_from={tmp_path / 'base'}", f"train.output_dir={out}", *SMALL,
                 *extra]) == 0
    got = _metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2]
    assert got[0]["lm_loss"] == pytest.approx(ref, rel=1e-5)


def test_upcycled_model_trains_and_run_dir_starts_another(tmp_path, capsys):
    make_hf("llama", vocab=256).save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "base")]) == 0
    assert main(["convert", "upcycle", "--method", "lora_moe", "--num-experts", "4", "--top-k", "2",
                 "--lora-rank", "4", str(tmp_path / "base"), str(tmp_path / "lora_moe")]) == 0
    run = tmp_path / "run"
    # the YAML says 8 experts, lora none: the checkpoint's architecture wins (4 LoRA experts, moe_lora)
    assert main(["train", TINY, f"model.init_from={tmp_path / 'lora_moe'}", f"train.output_dir={run}", *SMALL]) == 0
    saved = (run / "config.yaml").read_text()
    assert "mode: moe_lora" in saved and "num_experts: 4" in saved
    # train.resume of a converted model (no training state): one line naming model.init_from
    capsys.readouterr()
    assert main(["train", TINY, f"train.resume={tmp_path / 'lora_moe'}", f"train.output_dir={tmp_path / 'x'}",
                 *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.init_from" in err[0], err
    # a run directory starts another run at step 0 with its final weights
    run2 = tmp_path / "run2"
    assert main(["train", TINY, f"model.init_from={run}", f"train.output_dir={run2}", *SMALL]) == 0
    assert [r["step"] for r in _metrics(run2 / "metrics.jsonl")] == [1, 2]
    from safetensors.torch import load_file
    a = load_file(run / "final" / "model-dense.safetensors")
    b_first = _metrics(run2 / "metrics.jsonl")[0]["lm_loss"]
    last = _metrics(run / "metrics.jsonl")[-1]["lm_loss"]
    assert a and b_first < _metrics(run / "metrics.jsonl")[0]["lm_loss"] + 1.0 and last > 0


def test_resume_accepts_a_run_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [TINY, *SMALL, "train.max_steps=4", "train.save_every=2"]
    assert main(["train", *common, f"train.output_dir={a}"]) == 0
    assert main(["train", *common, f"train.output_dir={b}", "train.max_steps=2"]) == 0
    # resume from the run directory b (its checkpoints/latest, not final/ which has no optimizer state)
    c = tmp_path / "c"
    assert main(["train", *common, f"train.output_dir={c}", f"train.resume={b}"]) == 0
    la = [r["loss"] for r in _metrics(a / "metrics.jsonl")]
    lc = [r["loss"] for r in _metrics(c / "metrics.jsonl")]
    assert [r["step"] for r in _metrics(c / "metrics.jsonl")] == [3, 4]
    assert lc == pytest.approx(la[2:], rel=1e-6)


def test_init_from_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", TINY, f"model.init_from={tmp_path / 'empty'}", *SMALL,
                 f"train.output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.init_from" in err[0] and "not a moedist checkpoint" in err[0]
    assert main(["train", TINY, f"model.init_from={tmp_path / 'nope'}", *SMALL]) == 2
    assert "model.init_from" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
