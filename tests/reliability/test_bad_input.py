"""Bad configs, CLI arguments and launcher environments: each gives exit 2 and exactly one line on
stderr that names the key (or file, or variable), the value and what is allowed; no traceback and
no files left behind (the output directory is never created).

Table-driven; the cases run in-process through `moedist.cli.main` (milliseconds each, capsys), and a
sample through the real `python -m moedist` in one subprocess each to check the process exit status.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moedist import cli

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=32", "model.ffn_size=48", "model.max_seq_len=32", "data.seq_len=32",
         "train.max_steps=2", "train.warmup_steps=1", "moe.num_experts=4", "train.plot=false"]

# (id, overrides ({tmp} = a fresh directory, {file} = a regular file in it), extra environment,
#  fragments the one line must contain: key=value first, then what is allowed; long values such as
#  temporary paths are shortened to 80 characters in messages, so only their start is checked)
CASES = [
    ("top-k-not-integer", ["moe.top_k=1.5"], {}, ["moe.top_k=1.5", "must be an integer"]),
    ("capacity-factor-infinite", ["moe.capacity_factor=.inf"], {}, ["moe.capacity_factor=inf", "finite number"]),
    ("lr-nan", ["train.lr=.nan"], {}, ["train.lr=nan", "finite number"]),
    ("val-fraction-one", ["data.val_fraction=1.0"], {}, ["data.val_fraction=1.0", "< 1"]),
    ("seq-len-above-max", ["data.seq_len=64"], {}, ["data.seq_len=64", "<= model.max_seq_len (32)"]),
    ("hidden-not-divisible-by-heads", ["model.hidden_size=30"], {}, ["model.hidden_size=30", "divisible by model.num_heads"]),
    ("zero-layers", ["model.num_layers=0"], {}, ["model.num_layers=0", ">= 1"]),
    ("byte-data-small-vocab", ["model.vocab_size=100"], {}, ["model.vocab_size=100", ">= 256"]),
    ("unknown-lora-target", ["lora.targets=[gate,qkv]"], {}, ["lora.targets=['gate', 'qkv']", "gate|up|down", "'qkv' is not"]),
    ("ep-not-dividing-world", ["parallel.ep_size=2"], {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0",
                                                      "LOCAL_WORLD_SIZE": "3"},
     ["parallel.ep_size=2", "must divide the world size (3)"]),
    ("missing-data-file", ["data.source=file", "data.path={tmp}/nope.txt"], {}, ["data.path='/", "no such file"]),
    ("missing-hf-dir", ["model.from_hf={tmp}/nohf"], {}, ["model.from_hf='/", "existing local model directory"]),
    ("missing-resume-dir", ["train.resume={tmp}/nockpt"], {}, ["train.resume='/", "null, 'auto' or an existing"]),
    ("resume-dir-not-checkpoint", ["train.resume={tmp}"], {}, ["train.resume=", "not a moedist checkpoint"]),
    ("resume-dir-with-pickle", ["train.resume={pickledir}"], {}, ["train.resume=", "pickle file", "never unpickles"]),
    ("unwritable-output-dir", ["train.output_dir={file}/run"], {}, ["train.output_dir=", "is not writable"]),
    ("section-given-a-list", ["moe=[1,2]"], {}, ["moe=[1, 2]", "must be a mapping of moe keys"]),
    ("negative-max-steps", ["train.max_steps=-1"], {}, ["train.max_steps=-1", ">= 1"]),
    ("deepspeed-extra-contradicts", ["deepspeed.enabled=true", "deepspeed.extra={zero_optimization: {stage: 3}}"],
     {}, ["deepspeed.extra.zero_optimization.stage", "use deepspeed.zero_stage"]),
    ("deepspeed-extra-reserved", ["deepspeed.enabled=true", "deepspeed.extra={train_micro_batch_size_per_gpu: 8}"],
     {}, ["deepspeed.extra.train_micro_batch_size_per_gpu", "remove it"]),
    ("extra-without-deepspeed", ["deepspeed.extra={steps_per_print: 1}"], {}, ["deepspeed.extra", "deepspeed.enabled=false"]),
    ("zero-stage-without-deepspeed", ["deepspeed.zero_stage=2"], {}, ["deepspeed.zero_stage=2", "deepspeed.enabled=true"]),
    ("unknown-key", ["moe.topk=2"], {}, ["moe.topk", "unknown key", "did you mean moe.top_k"]),
    ("string-for-int", ["model.hidden_size='64'"], {}, ["model.hidden_size='64'", "an integer"]),
    ("lora-dropout-one", ["lora.dropout=1.0"], {}, ["lora.dropout=1.0", "< 1"]),
    ("shared-rank-without-moe-lora", ["lora.shared_rank=4"], {}, ["lora.shared_rank=4", "needs lora.mode=moe_lora"]),
    ("shared-rank-negative", ["lora.mode=moe_lora", "lora.shared_rank=-1"], {}, ["lora.shared_rank=-1", ">= 0"]),
    ("kv-heads-not-dividing", ["model.num_kv_heads=3"], {}, ["model.num_kv_heads=3", "must divide model.num_heads"]),
    ("data-path-without-file-source", ["data.path={file}"], {}, ["data.path='/", "no effect", "data.source='file'"]),
    ("keep-last-negative", ["train.keep_last=-1"], {}, ["train.keep_last=-1", ">= 0"]),
    ("nonfinite-choice", ["train.nonfinite=ignore"], {}, ["train.nonfinite='ignore'", "stop|skip"]),
    ("nonfinite-skip-deepspeed-zero0", ["train.nonfinite=skip", "deepspeed.enabled=true"], {},
     ["train.nonfinite='skip'", "deepspeed.zero_stage >= 1"]),
    ("timeout-zero", ["parallel.timeout_s=0"], {}, ["parallel.timeout_s=0", "> 0"]),
    ("adam-beta-above-one", ["train.adam_betas=[0.9,1.5]"], {}, ["train.adam_betas=[0.9, 1.5]", "[0, 1)"]),
    ("min-lr-above-lr", ["train.min_lr=1.0"], {}, ["train.min_lr=1.0", "<= train.lr"]),
    ("source-format", ["data.sources=[{name: a, path: {file}, format: csv}]"], {},
     ["data.sources[0].format='csv'", "text|jsonl"]),
    ("source-missing-path", ["data.sources=[{name: a, format: text}]"], {}, ["data.sources[0].path", "missing"]),
    ("bad-yaml-override", ["moe.top_k=[1,"], {}, ["moe.top_k"]),
    ("override-without-key", ["=3"], {}, ["override '=3'", "key=value"]),
    ("missing-config-file", [], {}, ["config file", "nope.yaml"]),
    ("local-world-size-zero", [], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "0"},
     ["LOCAL_WORLD_SIZE", "0"]),
    ("dtype-bf16-params", ["model.dtype=bfloat16"], {}, ["model.dtype='bfloat16'", "deepspeed.bf16"]),
    ("global-batch-too-large", ["data.source=file", "data.path={file}", "train.micro_batch_size=1000"], {},
     ["train.micro_batch_size=1000", "training sequences"]),
    ("fp16-without-cuda", ["deepspeed.enabled=true", "deepspeed.fp16=true", "deepspeed.zero_stage=1"], {},
     ["deepspeed.fp16=true", "CUDA GPU"]),
]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _args(case_id: str, overrides: list, tmp: Path) -> list:
    f = tmp / "small.txt"
    f.write_text("hello world\n" * 400)
    pick = tmp / "pickled"
    if "{pickledir}" in " ".join(overrides):
        pick.mkdir(exist_ok=True)
        (pick / "mp_rank_00_model_states.pt").write_bytes(b"never opened")
    sub = {"{tmp}": str(tmp), "{file}": str(f), "{pickledir}": str(pick)}
    out = []
    for o in overrides:
        for k, v in sub.items():
            o = o.replace(k, v)
        out.append(o)
    head = [str(tmp / "nope.yaml")] if case_id == "missing-config-file" else []
    return ["train", *head, *SMALL, f"train.output_dir={tmp}/out", f"data.cache_dir={tmp}/cache", *out]


def _clean_env(monkeypatch, env: dict) -> None:
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,overrides,env,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case_id, overrides, env, fragments, tmp_path, monkeypatch, capsys):
    if case_id == "fp16-without-cuda" and torch.cuda.is_available():
        pytest.skip("has CUDA")
    _clean_env(monkeypatch, env)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = cli.main(_args(case_id, overrides, tmp_path))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("moedist: error: "), err
    assert "Traceback" not in err + out
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in: {lines[0]}"
    assert not (tmp_path / "out").exists(), "output directory created"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [n for n in before if n != "cache"] \
        or not before


SUBPROCESS = ["top-k-not-integer", "missing-resume-dir", "ep-not-dividing-world", "section-given-a-list",
              "resume-dir-with-pickle"]


def test_real_cli_exit_status(tmp_path):
    """The same through `python -m moedist` (the real exit status, stderr only, no traceback)."""
    for case_id, overrides, env, fragments in [c for c in CASES if c[0] in SUBPROCESS]:
        tmp = tmp_path / case_id
        tmp.mkdir()
        e = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        e.update(env)
        p = subprocess.run([sys.executable, "-m", "moedist", *_args(case_id, overrides, tmp)], cwd=ROOT, env=e,
                           capture_output=True, text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and p.stdout == "", (case_id, p.stderr, p.stdout)
        assert all(f in lines[0] for f in fragments), (case_id, lines[0])
        assert not (tmp / "out").exists()
