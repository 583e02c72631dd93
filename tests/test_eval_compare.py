"""`moedist eval A B ... --table T.md --plot P.png` (issue 14, Deliver 7): several models side by side, per
domain; the single-model --json line unchanged; Hugging Face directories; bad input writes nothing."""
import json

import pytest

from moedist.cli import main
from moedist.train.eval_compare import markdown_table
from tests._lifelong import base_cfg, write_domains


def _json_lines(text: str) -> list:
    return [json.loads(ln) for ln in text.strip().splitlines() if ln.startswith("{")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 steps over two named byte-level domains (prose, code), with an EMA."""
    from moedist.config import config_from_dict, save_config

    tmp = tmp_path_factory.mktemp("cmp")
    cfg = base_cfg(write_domains(tmp / "data"), str(tmp / "cache"))
    del cfg["moe"]["expert_groups"]
    cfg["train"].update(ema_decay=0.5, output_dir=str(tmp / "run"))
    save_config(config_from_dict(cfg), tmp / "cfg.yaml")
    assert main(["train", str(tmp / "cfg.yaml")]) == 0
    return tmp / "run"


def test_markdown_table_by_hand():
    rows = [{"model": "a", "val_loss": 1.5, "val_loss_x": 1.0, "step": 2},
            {"model": "b", "val_loss": 1.25, "val_loss_y": 2.0}]
    assert markdown_table(rows) == ("| model | overall | x | y |\n"
                                    "|---|---:|---:|---:|\n"
                                    "| a | 1.5000 | **1.0000** | - |\n"
                                    "| b | **1.2500** | - | **2.0000** |\n")


def test_several_models_side_by_side(run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    (single,) = _json_lines(capsys.readouterr().out)
    assert list(single) == ["val_loss", "val_loss_prose", "val_loss_code", "step", "checkpoint"]
    table, plot = tmp_path / "cmp.md", tmp_path / "cmp.png"
    assert main(["eval", str(run), str(run / "final_ema"), "--json", "--table", str(table), "--plot", str(plot)]) == 0
    a, b = _json_lines(capsys.readouterr().out)
    assert a == single  # the first model's line is exactly the single-model line
    assert b["checkpoint"] == str(run / "final_ema") and b["val_loss"] != a["val_loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert b["val_loss"] == pytest.approx(summary["ema_val_loss"], rel=1e-6)
    for row in (a, b):  # overall is the token-weighted mean: between the domains
        assert min(row["val_loss_prose"], row["val_loss_code"]) < row["val_loss"] < \
            max(row["val_loss_prose"], row["val_loss_code"])
    lines = table.read_text().splitlines()
    assert lines[0] == "| model | overall | prose | code |"
    for line, row, label in ((lines[2], a, str(run)), (lines[3], b, str(run / "final_ema"))):
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        assert cells[0] == label
        assert cells[1:] == [f"{row[k]:.4f}" for k in ("val_loss", "val_loss_prose", "val_loss_code")]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without --json: the table on stdout
    assert main(["eval", str(run), str(run / "final_ema"), "train.eval_batches=1"]) == 0
    assert capsys.readouterr().out.startswith("| model | overall | prose | code |")


def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys):
    table = tmp_path / "t.md"
    capsys.readouterr()
    assert main(["eval", str(run), str(tmp_path / "nope"), "--table", str(table)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and not table.exists()
    assert main(["eval", str(run), "--plot", str(tmp_path / "no" / "p.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plot" in err[0]


def test_a_hugging_face_directory_equals_its_conversion(tmp_path, capsys):
    from tests.test_hf_import import make_hf

    make_hf("llama", vocab=256).save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "base")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "hf"), str(tmp_path / "base"), "data.seq_len=32", "train.eval_batches=1",
                 "--json"]) == 0
    hf, conv = _json_lines(capsys.readouterr().out)
    assert hf["checkpoint"] == str(tmp_path / "hf") and hf["step"] == 0
    assert hf["val_loss"] == pytest.approx(conv["val_loss"], abs=1e-5)
