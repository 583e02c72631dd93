"""No silent traps (issue 17, Deliver 5): each is an error or one warning line."""
import json

import pytest

from moedist.cli import main
from moedist.config import load_config
from moedist.train.schedule import lr_at
from tests.test_hf_import import make_hf

TINY = "configs/tiny.yaml"
SMALL = ["train.max_steps=2", "train.warmup_steps=1", "train.eval_batches=1", "train.plot=false",
         "train.micro_batch_size=2", "data.seq_len=32", "model.max_seq_len=32"]


def _warnings(err, text):
    return [ln for ln in err.splitlines() if ln.startswith("moedist") and "warning" in ln and text in ln]


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(tmp_path, capsys):
    cfg = load_config("configs/demo.yaml", ["train.max_steps=3"])       # warmup 10: was refused
    assert cfg.train.warmup_steps == 10
    assert lr_at(2, lr=1.0, warmup_steps=10, max_steps=3) == pytest.approx(1.0)  # full LR at the last step
    assert main(["train", TINY, *SMALL, "train.warmup_steps=5", f"train.output_dir={tmp_path / 'r'}"]) == 0
    assert len(_warnings(capsys.readouterr().err, "warm-up clamped to 2 steps")) == 1


def test_data_path_without_file_source_is_an_error(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("hello " * 1000)
    assert main(["train", TINY, f"data.path={f}", f"train.output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.path=" in err[0] and "no effect" in err[0]


def test_to_hf_of_a_capacity_model_warns_and_hf_moe_capacity_warns(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", TINY, *SMALL, f"train.output_dir={run}"]) == 0          # capacity_factor 1.25
    capsys.readouterr()
    assert main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if "capacity_factor=1.25" in ln and "dropless" in ln]) == 1
    make_hf("mixtral", vocab=256).save_pretrained(tmp_path / "mixtral")
    assert main(["train", TINY, *SMALL, f"model.from_hf={tmp_path / 'mixtral'}",
                 f"train.output_dir={tmp_path / 'ft'}"]) == 0
    assert len(_warnings(capsys.readouterr().err, "routes dropless")) == 1
    assert main(["train", TINY, *SMALL, f"model.from_hf={tmp_path / 'mixtral'}", "moe.capacity_factor=null",
                 f"train.output_dir={tmp_path / 'ft2'}"]) == 0
    assert not _warnings(capsys.readouterr().err, "routes dropless")


def test_peft_export_records_an_absolute_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_hf("llama", vocab=256).save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", "hf", "md", "lora.mode=full", "lora.rank=2"]) == 0   # relative paths
    assert main(["convert", "peft", "md", "adapter"]) == 0
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "hf")


def test_print_config_shows_the_resolved_hf_architecture(tmp_path, capsys):
    make_hf("llama", vocab=256).save_pretrained(tmp_path / "hf")
    assert main(["train", TINY, f"model.from_hf={tmp_path / 'hf'}", "--print-config"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert printed["model"]["hidden_size"] == hf["hidden_size"] and printed["model"]["moe_every"] == 0


def test_version(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["--version"])
    assert ex.value.code == 0 and capsys.readouterr().out.startswith("moedist ")
