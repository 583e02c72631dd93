"""`moedist generate` and `moedist.models.generate` against transformers `generate` (CPU, fp32).

Small random Qwen3-MoE and Llama models are saved with ``save_pretrained`` next to
a real byte-level BPE tokenizer (trained on pydoc text in the test); greedy output
of `moedist generate DIR` must be exactly what transformers decodes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.data.tok_helpers import EOS, IM_END, make_tokenizer_dir
from tests.test_hf_import import make_hf

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The class definition"
NEW = 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tok")


def _hf_model(arch: str, tok):
    """make_hf's random model sized to the tokenizer, eos = the tokenizer's <|endoftext|>, bos unset."""
    hf = make_hf(arch, vocab=len(tok))
    for cfg in (hf.config, hf.generation_config):
        cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = tok.eos_token_id, None, tok.pad_token_id
    return hf


@pytest.fixture(scope="module")
def hf_dirs(tok_dir, tmp_path_factory):
    """{arch: (hf_model, tokenizer, dir)}: model and tokenizer saved into one directory."""
    import shutil

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    out = {}
    for arch in ("qwen3_moe", "llama"):
        d = tmp_path_factory.mktemp("hf") / arch
        hf = _hf_model(arch, tok)
        hf.save_pretrained(d)
        for f in os.listdir(tok_dir):
            shutil.copy(os.path.join(tok_dir, f), d / f)
        out[arch] = (hf, tok, str(d))
    return out


def hf_greedy(hf, tok, text: str, chat: bool = False, new: int = NEW) -> str:
    """What transformers generates greedily (new tokens only, special tokens skipped)."""
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, do_sample=False, max_new_tokens=new)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run_cli(capsys, *args: str):
    from moedist.cli import main

    rc = main(["generate", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama"])
def test_greedy_matches_transformers(arch, hf_dirs, capsys):
    hf, tok, d = hf_dirs[arch]
    want = hf_greedy(hf, tok, PROMPT)
    assert want.strip()  # a real continuation, not an immediate eos
    rc, out, err = run_cli(capsys, d, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(NEW))
    assert rc == 0, err
    assert out == want + "\n"


def test_chat_matches_transformers(hf_dirs, capsys):
    hf, tok, d = hf_dirs["qwen3_moe"]
    want = hf_greedy(hf, tok, "What is a class?", chat=True)
    rc, out, err = run_cli(capsys, d, "--prompt", "What is a class?", "--chat", "--temperature", "0",
                           "--max-new-tokens", str(NEW))
    assert rc == 0, err
    assert out == want + "\n"


def test_subprocess_prints_only_the_continuation(hf_dirs):
    hf, tok, d = hf_dirs["llama"]
    want = hf_greedy(hf, tok, PROMPT, new=8)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "moedist", "generate", d, "--prompt", PROMPT, "--temperature", "0",
                          "--max-new-tokens", "8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == want + "\n"
    assert "Traceback" not in res.stderr


def test_stops_at_eos_and_reads_generation_config(hf_dirs, tmp_path, capsys):
    """The stop id comes from generation_config.json (a list there), else config.json; the eos is not printed."""
    import shutil

    from moedist.models.generate import generate
    from moedist.models.hf_import import from_hf

    hf, tok, d = hf_dirs["llama"]
    model, _ = from_hf(d)
    ids = tok(PROMPT)["input_ids"]
    free = generate(model, ids, max_new_tokens=NEW, temperature=0)
    assert len(free) == NEW
    stop = free[5]
    assert generate(model, ids, max_new_tokens=NEW, temperature=0, eos_ids=[stop]) == free[:free.index(stop)]
    d2 = shutil.copytree(d, tmp_path / "stop")
    gc = json.loads((d2 / "generation_config.json").read_text())
    gc["eos_token_id"] = [tok.convert_tokens_to_ids(IM_END), stop]
    (d2 / "generation_config.json").write_text(json.dumps(gc))
    rc, out, err = run_cli(capsys, str(d2), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(NEW))
    assert rc == 0, err
    assert out == tok.decode(free[:free.index(stop)], skip_special_tokens=True) + "\n"
    (d2 / "generation_config.json").unlink()   # config.json's eos (<|endoftext|>): runs to the limit
    rc, out, _ = run_cli(capsys, str(d2), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(NEW))
    assert rc == 0 and out == tok.decode(free, skip_special_tokens=True) + "\n"


def test_sampling_is_seeded_and_top_p_narrows(hf_dirs, capsys):
    from moedist.models.generate import generate, top_p_filter
    from moedist.models.hf_import import from_hf

    hf, tok, d = hf_dirs["qwen3_moe"]
    args = [d, "--prompt", PROMPT, "--max-new-tokens", "12"]
    outs = [run_cli(capsys, *args, "--seed", s) for s in ("1", "1", "2")]
    assert all(rc == 0 for rc, _, _ in outs)
    assert outs[0][1] == outs[1][1] != outs[2][1]
    model, _ = from_hf(d)
    ids = tok(PROMPT)["input_ids"]
    greedy = generate(model, ids, max_new_tokens=12, temperature=0)
    # a tiny nucleus keeps only the most likely token: sampling becomes greedy
    assert generate(model, ids, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3) == greedy
    sampled = [generate(model, ids, max_new_tokens=12, temperature=1.0, seed=s) for s in range(3)]
    assert any(s != greedy for s in sampled)
    p = torch.tensor([0.1, 0.5, 0.25, 0.15])
    torch.testing.assert_close(top_p_filter(p, 0.7), torch.tensor([0.0, 0.5, 0.25, 0.0]) / 0.75)
    torch.testing.assert_close(top_p_filter(p, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(top_p_filter(p, 1.0), p)


def test_moedist_checkpoint_and_run_dir(hf_dirs, tmp_path, capsys):
    """A moedist checkpoint of the HF model (no tokenizer in it): generate finds the run's tokenizer."""
    import shutil

    from moedist.models.convert_cli import save_model_checkpoint
    from moedist.models.hf_import import from_hf

    hf, tok, d = hf_dirs["qwen3_moe"]
    want = hf_greedy(hf, tok, PROMPT, new=10)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000003"
    save_model_checkpoint(*from_hf(d), str(ckpt))
    args = ["--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "10"]
    rc, out, err = run_cli(capsys, str(ckpt), *args)
    assert rc == 2 and "no tokenizer" in err and len(err.strip().splitlines()) == 1
    for f in os.listdir(d):  # the run's tokenizer, as the trainer saves it
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(d, f), tmp_path / "run" / f)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000003\n")
    for path in (ckpt, tmp_path / "run"):
        rc, out, err = run_cli(capsys, str(path), *args)
        assert rc == 0, err
        assert out == want + "\n"   # eos: the tokenizer's (<|endoftext|>), the same id as the HF config's
    # final/ wins over checkpoints/latest
    shutil.copytree(ckpt, tmp_path / "run" / "final")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("missing\n")
    rc, out, err = run_cli(capsys, str(tmp_path / "run"), *args)
    assert rc == 0 and out == want + "\n", err


def test_bytes_tokenizer_checkpoint(tmp_path, capsys):
    """A byte-level moedist model: the tokenizer is moedist_tokenizer.json; output is decoded bytes."""
    from moedist.config import config_from_dict
    from moedist.data.tokenizer import ByteTokenizer
    from moedist.models import build_model
    from moedist.models.convert_cli import save_model_checkpoint
    from moedist.models.generate import generate

    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "ffn_size": 32,
                                      "max_seq_len": 16}, "data": {"seq_len": 16}, "moe": {"num_experts": 2}})
    model = build_model(cfg)
    save_model_checkpoint(model, cfg, str(tmp_path / "ckpt"))
    ByteTokenizer().save(str(tmp_path / "ckpt"))
    want = generate(model, list(b"abc"), max_new_tokens=20, temperature=0)
    assert len(want) == 14  # capped by max_seq_len=16: 3 prompt + 13 fed back + 1
    rc, out, err = run_cli(capsys, str(tmp_path / "ckpt"), "--prompt", "abc", "--temperature", "0",
                           "--max-new-tokens", "20")
    assert rc == 0 and "max_seq_len" in err
    assert out == ByteTokenizer().decode(want) + "\n"
    rc, out, err = run_cli(capsys, str(tmp_path / "ckpt"), "--prompt", "abc", "--chat")
    assert rc == 2 and "chat" in err and len(err.strip().splitlines()) == 1 and not out


def _one_error_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("moedist generate: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_errors_are_one_line_exit_2(hf_dirs, tmp_path, capsys):
    import shutil

    _, _, d = hf_dirs["llama"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(os.path.join(d, f), no_tok / f)
    pickled = shutil.copytree(d, tmp_path / "pickled")
    (pickled / "training_args.bin").write_bytes(b"\x80\x04N.")
    cases = [
        ([str(tmp_path / "missing"), "--prompt", "x"], ["no such directory"]),
        ([str(tmp_path / "file.txt"), "--prompt", "x"], ["not a directory"]),
        ([str(tmp_path / "empty"), "--prompt", "x"], ["not a moedist run directory"]),
        ([str(no_tok), "--prompt", "x"], ["no tokenizer"]),
        ([str(pickled), "--prompt", "x"], ["training_args.bin", "pickle"]),
        ([d, "--prompt", "x", "--max-new-tokens", "0"], ["max_new_tokens=0"]),
        ([d, "--prompt", "x", "--temperature", "-0.5"], ["temperature=-0.5"]),
        ([d, "--prompt", "x", "--top-p", "0"], ["top_p=0"]),
        ([d, "--prompt", "x", "--top-p", "1.5"], ["top_p=1.5"]),
        ([d], ["--prompt"]),
        ([d, "--prompt", "x", "--max-new-tokens", "many"], ["--max-new-tokens"]),
        ([d, "--prompt", "x", "--device", "bogus"], ["--device"]),
    ]
    for args, needles in cases:
        rc, out, err = run_cli(capsys, *args)
        assert rc == 2 and not out, (args, out, err)
        _one_error_line(err, *needles)
