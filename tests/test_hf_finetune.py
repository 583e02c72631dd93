"""Fine-tune a real Hugging Face model on the user's own data, end to end, as the README shows.

A random `transformers` Qwen3-MoE saved beside its own BPE tokenizer; a
prompt/completion JSONL source; `torchrun` with 2 processes, EP=2, DeepSpeed
ZeRO-2, dropless, `expert_lora` (adapters start at B=0, so the model starts equal
to the HF one).

* The first logged `lm_loss` equals the masked cross-entropy `transformers`
  computes on the same ids (prompt tokens and padding excluded), to 1e-4.
* The run directory is self-contained (tokenizer saved), `moedist generate` on it
  prints what `transformers` greedy-generates from its `convert to-hf` export, and
  `transformers` loads that export.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=str(ROOT))


def _moedist(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moedist", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _write_sources(folder: Path) -> dict:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    pc, chat = folder / "pc.jsonl", folder / "chat.jsonl"
    with open(pc, "w") as fh:
        for k in keys:
            text = " ".join(topics[k].split())
            fh.write(json.dumps({"prompt": f"Topic {k}:", "completion": " " + text[:140]}) + "\n")
    with open(chat, "w") as fh:
        for k in keys:
            text = " ".join(topics[k].split())
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Explain {k}."},
                                              {"role": "assistant", "content": text[140:260]}]}) + "\n")
    return {"pc": pc, "chat": chat}


def _config(tmp: Path, hf: Path, sources: list, file: str = "cfg.yaml", **train) -> Path:
    import yaml

    cfg = {
        "name": "hf-finetune",
        "model": {"from_hf": str(hf)},
        "moe": {"capacity_factor": None},
        "lora": {"mode": "expert_lora", "rank": 4, "dropout": 0.0},
        "parallel": {"ep_size": 2},
        "deepspeed": {"enabled": True, "zero_stage": 2},
        "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
                  "eval_batches": 1, "output_dir": str(tmp / "run"), **train},
        "data": {"seq_len": 48, "pack": False, "cache_dir": str(tmp / "cache"), "sources": sources},
    }
    path = tmp / file
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    from moedist.models.toy_hf import make_toy_hf_model

    tmp = tmp_path_factory.mktemp("hf_finetune")
    hf = Path(make_toy_hf_model(str(tmp / "qwen3_moe"), seed=0))
    src = _write_sources(tmp)
    cfg = _config(tmp, hf, [{"name": "pc", "path": str(src["pc"]), "format": "prompt_completion"}])
    prep = _moedist("data", "prepare", cfg, cwd=tmp)
    assert prep.returncode == 0, prep.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "moedist", "train", str(cfg)], cwd=tmp, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return {"tmp": tmp, "hf": hf, "cfg": cfg, "run": tmp / "run", "prepare": prep.stdout}


def test_data_prepare_reports_each_source(finetuned):
    line = next(ln for ln in finetuned["prepare"].splitlines() if ln.startswith("pc"))
    assert "documents" in line and "tokens" in line


def test_first_lm_loss_equals_transformers_masked_cross_entropy(finetuned):
    """The first step's global batch (2 ranks x 2 sequences), recomputed by transformers."""
    import transformers as tf

    from moedist.config import load_config
    from moedist.data.dataset import build_data

    cfg = load_config(str(finetuned["cfg"]))
    data = build_data(cfg)
    batch = data.train_micro(0, 2 * cfg.train.micro_batch_size)  # positions of step 1 on both ranks
    assert batch.position_ids is None and (batch.labels == -100).any() and (batch.labels != -100).any()
    hf = tf.AutoModelForCausalLM.from_pretrained(str(finetuned["hf"])).eval()
    with torch.no_grad():
        logits = hf(batch.input_ids).logits.float()  # [B, S, V]; right padding cannot reach earlier tokens
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                             ignore_index=-100)
    first = json.loads((finetuned["run"] / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert first["loss_tokens"] == int((batch.labels != -100).sum())
    assert abs(first["lm_loss"] - float(want)) <= 1e-4, (first["lm_loss"], float(want))


def test_run_dir_is_self_contained_and_generate_matches_the_export(finetuned, tmp_path):
    import transformers as tf

    run = finetuned["run"]
    for folder in (run, run / "final", run / "checkpoints" / "step_000002"):
        assert (folder / "tokenizer.json").is_file(), folder
    out = tmp_path / "hf_out"
    res = _moedist("convert", "to-hf", run, out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "tokenizer.json").is_file()  # the export is self-contained too
    tok = tf.AutoTokenizer.from_pretrained(str(out))
    model = tf.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    prompt = "Topic assert:"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, do_sample=False, max_new_tokens=12)
    want = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    res = subprocess.run([sys.executable, "-m", "moedist", "generate", str(run), "--prompt", prompt, "--temperature",
                          "0", "--max-new-tokens", "12"], cwd=tmp_path, env=_env(), capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.decode("utf-8") == want + "\n"  # bytes: the text may hold a \r


def test_mixture_reports_val_loss_per_source(finetuned, tmp_path):
    """Two sources (prompt/completion + chat, weights 2:1): val_loss_<name> each, val_loss their token mean."""
    src = _write_sources(tmp_path)
    cfg = _config(tmp_path, finetuned["hf"],
                  [{"name": "pc", "path": str(src["pc"]), "format": "prompt_completion", "weight": 2},
                   {"name": "chat", "path": str(src["chat"]), "format": "chat", "weight": 1}],
                  max_steps=1, eval_every=0)
    res = _moedist("train", cfg, "parallel.ep_size=1", "deepspeed.enabled=false", "deepspeed.zero_stage=0", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    lo, hi = sorted((rec["val_loss_pc"], rec["val_loss_chat"]))
    assert lo <= rec["val_loss"] <= hi


def test_bad_data_and_mismatched_tokenizer_stop_with_one_line(finetuned, tmp_path):
    """Through `moedist train`: exit 2, one line naming the file/line (or the vocabularies), nothing written."""
    from moedist.data.bpe import train_bpe_tokenizer

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    big_tok = train_bpe_tokenizer(tmp_path / "big_tok", vocab_size=900)  # the model embeds ~600 ids
    src = _write_sources(tmp_path)
    cases = [
        (_config(tmp_path, finetuned["hf"], [{"name": "b", "path": str(bad), "format": "prompt_completion"}],
                 file="c1.yaml"),
         [], ["bad.jsonl", "line 2", "JSON"]),
        (_config(tmp_path, finetuned["hf"], [{"name": "pc", "path": str(src["pc"]), "format": "prompt_completion"}],
                 file="c2.yaml"),
         [f"data.tokenizer={big_tok}"], ["data.tokenizer", "model.vocab_size"]),
        (_config(tmp_path, finetuned["hf"], [{"name": "c", "path": str(src["pc"]), "format": "chat"}],
                 file="c3.yaml"),
         [], ["pc.jsonl", "line 1", "messages"]),
    ]
    for cfg, over, words in cases:
        res = _moedist("train", cfg, "parallel.ep_size=1", "deepspeed.enabled=false", "deepspeed.zero_stage=0",
                       f"data.cache_dir={tmp_path / 'cache_bad'}", *over, cwd=tmp_path)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert all(w in lines[0] for w in words), (words, lines[0])
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache_bad").exists()
