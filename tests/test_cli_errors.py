"""`moedist train` on bad configs: exit 2, one line on stderr naming the key, nothing created.

Most cases call ``cli.main`` in-process (milliseconds); a few run ``python -m moedist``
in a subprocess to check the real exit status, stream and absence of a traceback.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moedist import cli

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
model: {vocab_size: 256, hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 4, ffn_size: 128, max_seq_len: 64}
moe: {num_experts: 8, top_k: 2, capacity_factor: 1.25}
train: {max_steps: 5, warmup_steps: 1, output_dir: OUT}
data: {source: pydoc, seq_len: 64}
"""

# (id, YAML text appended to GOOD (later keys of a section replace earlier ones via overrides
#  below, so extra text adds new sections only), overrides, dotted key the message must name)
BAD = [
    ("unknown-section", "modle: {hidden_size: 64}\n", [], "modle"),
    ("unknown-key", "", ["moe.topk=2"], "moe.topk"),
    ("key-in-wrong-section", "parallel: {ep_size: 2, zero_stage: 2}\n", [], "parallel.zero_stage"),
    ("str-for-int", "", ["model.hidden_size='64'"], "model.hidden_size"),
    ("float-for-int", "", ["model.num_layers=2.5"], "model.num_layers"),
    ("bool-for-int", "", ["moe.num_experts=true"], "moe.num_experts"),
    ("yes-is-not-bool", "", ["train.tensorboard=yes"], "train.tensorboard"),
    ("int-is-not-bool", "deepspeed: {enabled: 1}\n", [], "deepspeed.enabled"),
    ("str-for-float", "", ["train.lr=fast"], "train.lr"),
    ("nan-float", "", ["moe.aux_loss_coef=.nan"], "moe.aux_loss_coef"),
    ("top-k-above-experts", "", ["moe.top_k=9"], "moe.top_k"),
    ("experts-not-divisible-by-ep", "parallel: {ep_size: 3}\n", [], "parallel.ep_size"),
    ("negative-capacity", "", ["moe.capacity_factor=-0.5"], "moe.capacity_factor"),
    ("drop-policy", "", ["moe.drop_policy=random"], "moe.drop_policy"),
    ("aux-loss-type", "", ["moe.aux_loss_type=entropy"], "moe.aux_loss_type"),
    ("score-func", "", ["moe.score_func=relu"], "moe.score_func"),
    ("shared-gate-without-shared", "", ["moe.shared_expert_gate=true"], "moe.shared_expert_gate"),
    ("lora-rank-zero", "lora: {mode: moe_lora, rank: 0}\n", [], "lora.rank"),
    ("moe-lora-on-dense-model", "lora: {mode: moe_lora}\n", ["model.moe_every=0"], "lora.mode"),
    ("lora-target", "", ["lora.targets=[gate,qkv]"], "lora.targets"),
    ("lora-dropout", "", ["lora.dropout=1.0"], "lora.dropout"),
    ("hidden-not-divisible-by-heads", "", ["model.hidden_size=66"], "model.hidden_size"),
    ("heads-not-divisible-by-kv", "", ["model.num_kv_heads=3"], "model.num_kv_heads"),
    ("moe-every-beyond-layers", "", ["model.moe_every=3"], "model.moe_every"),
    ("dtype", "", ["model.dtype=float64"], "model.dtype"),
    ("zero-stage-4", "deepspeed: {enabled: true, zero_stage: 4}\n", [], "deepspeed.zero_stage"),
    ("bf16-and-fp16", "deepspeed: {bf16: true, fp16: true}\n", [], "deepspeed.fp16"),
    ("extra-not-mapping", "deepspeed: {extra: [1, 2]}\n", [], "deepspeed.extra"),
    ("tokenizer-without-sources", "", ["data.tokenizer=some/dir"], "data.tokenizer"),
    ("grad-accum-zero", "", ["train.grad_accum=0"], "train.grad_accum"),
    ("min-lr-above-lr", "", ["train.min_lr=0.1"], "train.min_lr"),
    ("optimizer", "", ["train.optimizer=adam"], "train.optimizer"),
    ("lr-schedule", "", ["train.lr_schedule=step"], "train.lr_schedule"),
    ("adam-betas", "", ["train.adam_betas=[0.9, 1.5]"], "train.adam_betas"),
    ("resume-missing-dir", "", ["train.resume=no/such/ckpt"], "train.resume"),
    ("from-hf-missing-dir", "", ["model.from_hf=no/such/model"], "model.from_hf"),
    ("val-fraction-one", "", ["data.val_fraction=1.0"], "data.val_fraction"),
    ("val-fraction-zero", "", ["data.val_fraction=0"], "data.val_fraction"),
    ("file-source-without-path", "", ["data.source=file"], "data.path"),
    ("data-source", "", ["data.source=wikipedia"], "data.source"),
    ("seq-len-above-max", "", ["data.seq_len=65"], "data.seq_len"),
    ("vocab-too-small-for-bytes", "", ["model.vocab_size=100"], "model.vocab_size"),
    ("section-not-mapping", "", ["moe=3"], "moe"),
    ("override-without-value", "", ["moe.top_k"], "moe.top_k"),
    ("override-through-scalar", "", ["train.lr.x=1"], "train.lr.x"),
    ("duplicate-yaml-key", "lora: {rank: 4, rank: 8}\n", [], "lora.rank"),
]


def _write(tmp_path: Path, extra: str) -> tuple[Path, Path]:
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(GOOD.replace("OUT", str(out)) + extra)
    return cfg, out


def test_good_config_is_accepted(tmp_path, capsys):
    """The base of every bad case is itself valid, so each failure below comes from its one change."""
    cfg, _ = _write(tmp_path, "")
    assert cli.main(["train", str(cfg), "--print-config"]) == 0
    assert "top_k: 2" in capsys.readouterr().out


@pytest.mark.parametrize("extra, overrides, key", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_in_process(tmp_path, monkeypatch, capsys, extra, overrides, key):
    monkeypatch.chdir(tmp_path)          # a wrongly accepted config must not litter the repo
    monkeypatch.setattr(cli, "_resolve", lambda name: pytest.fail(f"config was accepted: {overrides}"))
    cfg, out = _write(tmp_path, extra)
    rc = cli.main(["train", str(cfg), *overrides])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("moedist: error: ")
    assert key in lines[0], lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


SUBPROCESS_CASES = ["yes-is-not-bool", "top-k-above-experts", "experts-not-divisible-by-ep",
                    "unknown-section", "duplicate-yaml-key"]


def _run_cli(args: list[str], cwd: Path, module: str = "moedist") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_config_subprocess(tmp_path, case):
    _, extra, overrides, key = next(c for c in BAD if c[0] == case)
    cfg, out = _write(tmp_path, extra)
    # the deepspeed launcher adds --local_rank=N: it must not change the outcome;
    # launch/*.sh run `python -m moedist.cli`, the console script is `python -m moedist`
    module = "moedist.cli" if case == SUBPROCESS_CASES[0] else "moedist"
    proc = _run_cli(["train", str(cfg), *overrides, "--local_rank=0"], cwd=tmp_path, module=module)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moedist: error: ") and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_missing_config_file_subprocess(tmp_path):
    proc = _run_cli(["train", "nope.yaml"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "moedist: error: config file 'nope.yaml': No such file or directory\n"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ dispatch

def test_local_rank_forms_are_ignored(tmp_path, capsys):
    cfg, _ = _write(tmp_path, "")
    for extra in (["--local_rank=1"], ["--local_rank", "1"], ["--local-rank=0"]):
        assert cli.main(["train", *extra, str(cfg), "moe.top_k=1", *extra, "--print-config"]) == 0
        assert "top_k: 1" in capsys.readouterr().out
    # `deepspeed --module moedist train ...` runs `python -m moedist --local_rank=0 train ...`
    assert cli.main(["--local_rank=0", "train", str(cfg), "--print-config"]) == 0
    assert "top_k: 2" in capsys.readouterr().out


def test_no_config_file_means_defaults(capsys):
    assert cli.main(["train", "moe.top_k=1", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "top_k: 1" in out and "output_dir: runs/moedist" in out


def _fake_module(tmp_path, monkeypatch, source: str) -> str:
    pkg = tmp_path / "fakecmds"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("fakecmds")]:
        monkeypatch.delitem(sys.modules, name)
    return "fakecmds.mod"


def test_argv_command_gets_the_rest_untouched(tmp_path, monkeypatch, capsys):
    mod = _fake_module(tmp_path, monkeypatch, """
        def main(argv):
            print("got", argv)
            return 3
    """)
    monkeypatch.setitem(cli.COMMANDS, "bench", cli.Command(f"{mod}:main", "bench", False))
    assert cli.main(["bench", "--help", "x=1", "--local_rank=0", "-n", "2"]) == 3
    assert capsys.readouterr().out == "got ['--help', 'x=1', '-n', '2']\n"


def test_config_command_gets_validated_config(tmp_path, monkeypatch, capsys):
    mod = _fake_module(tmp_path, monkeypatch, """
        from moedist.config import ConfigError
        def main_train(cfg, args):
            print(cfg.moe.top_k, args.config is None, args.overrides)
            if cfg.moe.top_k == 1:
                raise ConfigError("parallel.ep_size=2: must divide the world size (3)")
    """)
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command(f"{mod}:main_train", "train", True))
    assert cli.main(["train", "moe.top_k=4"]) == 0
    assert capsys.readouterr().out == "4 True ['moe.top_k=4']\n"
    assert cli.main(["train", "moe.top_k=1"]) == 2          # ConfigError from the command: one line
    captured = capsys.readouterr()
    assert captured.err == "moedist: error: parallel.ep_size=2: must divide the world size (3)\n"


def test_broken_import_inside_a_command_is_not_hidden(tmp_path, monkeypatch):
    mod = _fake_module(tmp_path, monkeypatch, "import package_that_does_not_exist_xyz\n")
    monkeypatch.setitem(cli.COMMANDS, "merge", cli.Command(f"{mod}:main", "x", False))
    with pytest.raises(ModuleNotFoundError, match="package_that_does_not_exist_xyz"):
        cli.main(["merge"])


def test_every_subcommand_is_registered():
    assert set(cli.COMMANDS) == {"train", "bench", "convert", "merge", "extract", "eval", "doctor", "demo",
                                 "generate", "data", "plan", "grow"}
    assert cli.COMMANDS["train"].target == "moedist.train.run:main_train" and cli.COMMANDS["train"].takes_config
    assert cli.COMMANDS["bench"].target == "moedist.bench.cli:main"


def test_doctor(capsys):
    import platform

    import torch
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["python"].startswith(platform.python_version())
    assert rows["torch"] == torch.__version__
    assert rows["cuda available"] == str(torch.cuda.is_available())
    assert rows["cpus"].startswith(str(os.cpu_count()))
    for name in ("deepspeed", "transformers"):
        assert name in rows


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out
