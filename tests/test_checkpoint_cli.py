"""`moedist extract` / `moedist merge` through the CLI entry point, on real checkpoint files.

The reference is the fine-tuned model held in memory: extract -> merge must give
back its logits bit for bit (from the pre-fine-tuning checkpoint, from the dense
checkpoint the LoRA-MoE was made from, from a Hugging Face directory), and
``--format hf`` must load in transformers with the same logits (1e-4).
Bad input: exit 2, one stderr line, no OUT and no temporary directory left.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moedist.checkpoint import read_manifest, save_checkpoint
from moedist.cli import main
from moedist.config import config_to_dict, load_config
from moedist.models import build_model, from_hf, to_hf
from moedist.models.convert_cli import load_model_checkpoint, save_model_checkpoint

SMALL = ["model.hidden_size=32", "model.ffn_size=48", "model.num_heads=4", "model.num_kv_heads=2",
         "model.num_layers=2", "model.max_seq_len=32", "data.seq_len=16", "moe.num_experts=4", "moe.top_k=2",
         "lora.rank=4", "lora.alpha=8"]
REPO = Path(__file__).resolve().parents[1]


def token_ids(seed=1, batch=2, seq=12, vocab=256):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


IDS = token_ids()


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def perturb(model, seed, only=("lora_", ".router.")):
    """Stand-in for fine-tuning: move the trainable tensors (LoRA B starts at 0) off their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in only):
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def cfg_dict(cfg, from_hf=None):
    d = config_to_dict(cfg)
    d["model"]["from_hf"] = from_hf
    return d


def fake_optim(model):
    """AdamW-like state for the trainable parameters: what a training checkpoint also holds."""
    return {n: {"exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p), "step": torch.tensor(50.0)}
            for n, p in model.named_parameters() if p.requires_grad}


def hf_logits(path):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(IDS).logits


def assert_same_model(a, b):
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(logits(a), logits(b))


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Files of one LoRA-MoE fine-tuning story, plus a few odd ones for the refusals."""
    root = tmp_path_factory.mktemp("ckpt_cli")
    ns = {"root": root}
    # The pretrained dense model, as a moedist checkpoint and as a Hugging Face directory.
    dense_cfg = load_config(None, SMALL + ["model.moe_every=0"])
    dense = build_model(dense_cfg, seed=77)     # not what the adapter's config would initialise
    save_model_checkpoint(dense, dense_cfg, str(root / "dense"))
    to_hf(dense, root / "hf", dense_cfg)
    # LoRA-MoE on it (routers and LoRA experts at init), saved before fine-tuning ...
    pre, cfg = from_hf(str(root / "hf"), cfg=load_config(None, SMALL + ["lora.mode=moe_lora"]))
    save_model_checkpoint(pre, cfg, str(root / "pre"))
    # ... and after: a run directory whose config still names the HF base (as a training run's does).
    perturb(pre, seed=3)
    ns["ft"] = pre
    save_checkpoint(root / "run" / "step_000050", pre, step=50, optim_state=fake_optim(pre),
                    config=cfg_dict(cfg, from_hf=str(root / "hf")))
    # The same story one size wider (hidden 48): a base the adapter does not fit.
    wide_cfg = load_config(None, SMALL + ["model.hidden_size=48", "model.moe_every=0"])
    wide = build_model(wide_cfg, seed=77)
    to_hf(wide, root / "hf_wide", wide_cfg)
    wide_pre, wcfg = from_hf(str(root / "hf_wide"), cfg=load_config(None, SMALL + ["lora.mode=moe_lora"]))
    save_model_checkpoint(wide_pre, wcfg, str(root / "pre_wide"))
    return ns


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def extract_adapter(w, capsys):
    out = w["root"] / "adapter"
    if not out.exists():
        assert run_cli(capsys, "extract", w["root"] / "run", out)[0] == 0
    return out


def test_extract_keeps_exactly_the_trainable_tensors(w, capsys):
    rc, out, err = run_cli(capsys, "extract", w["root"] / "run", w["root"] / "adapter")
    assert rc == 0, err
    m = read_manifest(w["root"] / "adapter")
    assert m["adapter_only"] and m["step"] == 50
    assert m["config"]["model"]["from_hf"] == str(w["root"] / "hf")        # the full checkpoint's config
    # by hand: each layer's router, and LoRA A/B of each projection of each expert, keyed by global expert id
    want = {f"layers.{l}.mlp.router.weight" for l in range(2)}
    want |= {f"layers.{l}.mlp.experts.{e}.lora.{proj}.lora_{ab}" for l in range(2) for e in range(4)
             for proj in ("gate", "up", "down") for ab in "AB"}
    assert set(m["index"]) == want
    assert sum(p.requires_grad for p in w["ft"].parameters()) == 2 * (1 + 6)   # and that is what trains
    assert not any(f.startswith("optim") for f in m["files"])
    lines = out.strip().splitlines()
    assert any(line.startswith("size: ") and " -> " in line for line in lines)
    assert lines[-1].startswith("extracted adapter") and str(w["root"] / "adapter") in lines[-1]
    assert not [p for p in w["root"].iterdir() if p.name.startswith(".")]  # no temp dir, no 'latest' beside OUT
    assert (w["root"] / "latest").read_text().strip() == "pre_wide"        # the fixture's last save, not OUT


@pytest.mark.parametrize("base", ["pre", "dense", "hf", None])
def test_extract_then_merge_gives_the_fine_tuned_model_back(w, capsys, base):
    """pre: same layout (copied by name); dense: other layout (via HF tensors); hf: from_hf; None: config's from_hf."""
    adapter = extract_adapter(w, capsys)
    out = w["root"] / f"merged_{base}"
    argv = ["merge", adapter, out] + ([] if base is None else ["--base", w["root"] / base])
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert lines[-1].startswith("merged adapter") and "moedist checkpoint" in lines[-1]
    assert ("through Hugging Face tensors" in stdout) == (base == "dense")     # other layout: via HF tensors
    merged, cfg = load_model_checkpoint(str(out))
    assert cfg.lora.mode == "moe_lora" and cfg.model.from_hf is None
    assert_same_model(merged, w["ft"])


def test_merge_to_hf_loads_in_transformers(w, capsys):
    adapter = extract_adapter(w, capsys)
    out = w["root"] / "export_hf"
    rc, stdout, err = run_cli(capsys, "merge", adapter, "--base", w["root"] / "dense", out, "--format", "hf")
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"   # LoRA-MoE -> real experts
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    torch.testing.assert_close(hf_logits(out), logits(w["ft"]), atol=1e-4, rtol=0)
    assert "Hugging Face mixtral directory" in stdout.strip().splitlines()[-1]


def test_full_lora_and_expert_lora(tmp_path, capsys, w):
    """lora.mode=full (attention LoRA, names q_proj.base.weight) on the dense base; expert_lora on a MoE base."""
    ft, cfg = from_hf(str(w["root"] / "hf"), cfg=load_config(None, SMALL + ["lora.mode=full"]))
    perturb(ft, seed=5)
    save_checkpoint(tmp_path / "full", ft, step=7, config=cfg_dict(cfg))
    assert run_cli(capsys, "extract", tmp_path / "full", tmp_path / "a_full")[0] == 0
    assert run_cli(capsys, "merge", tmp_path / "a_full", "--base", w["root"] / "dense", tmp_path / "m_full")[0] == 0
    assert_same_model(load_model_checkpoint(str(tmp_path / "m_full"))[0], ft)
    rc, _, err = run_cli(capsys, "merge", tmp_path / "a_full", "--base", w["root"] / "hf", tmp_path / "h_full",
                         "--format", "hf")
    assert rc == 0, err
    assert json.loads((tmp_path / "h_full" / "config.json").read_text())["model_type"] == "llama"
    torch.testing.assert_close(hf_logits(tmp_path / "h_full"), logits(ft), atol=1e-4, rtol=0)

    # expert_lora: the base is a plain MoE checkpoint (same frozen names, no LoRA tensors at all)
    ecfg = load_config(None, SMALL + ["lora.mode=expert_lora"])
    eft = build_model(ecfg)
    perturb(eft, seed=4, only=("",))            # "pretrained": frozen weights away from the seeded init
    plain_cfg = load_config(None, SMALL)
    plain = build_model(plain_cfg, seed=99)
    plain.load_state_dict({k: v for k, v in eft.state_dict().items() if "lora_" not in k})
    save_model_checkpoint(plain, plain_cfg, str(tmp_path / "moe_base"))
    perturb(eft, seed=6)
    stale = cfg_dict(ecfg, from_hf="/gone/hf")     # paths of the training machine that do not exist here
    stale["train"]["resume"] = "/gone/run"
    stale["data"].update(source="file", path="/gone/data.txt")
    save_checkpoint(tmp_path / "eft", eft, step=3, config=stale)
    assert run_cli(capsys, "extract", tmp_path / "eft", tmp_path / "a_e")[0] == 0
    assert run_cli(capsys, "merge", tmp_path / "a_e", "--base", tmp_path / "moe_base", tmp_path / "m_e")[0] == 0
    assert_same_model(load_model_checkpoint(str(tmp_path / "m_e"))[0], eft)


# ---------------------------------------------------------------------------------------- refusals

def refused(capsys, argv, needle, out):
    rc, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and needle in lines[0], lines
    assert not Path(out).exists() or Path(out).name == "busy"
    parent = Path(out).parent
    assert not parent.exists() or not [p for p in parent.iterdir() if ".tmp" in p.name]
    return lines[0]


def test_extract_refusals(w, capsys, tmp_path):
    adapter = extract_adapter(w, capsys)
    out = tmp_path / "out"
    refused(capsys, ["extract", tmp_path / "nope", out], "CKPT=", out)
    (tmp_path / "empty").mkdir()
    refused(capsys, ["extract", tmp_path / "empty", out], "not a moedist checkpoint", out)
    refused(capsys, ["extract", w["root"] / "dense", out], "lora.mode='none'", out)
    refused(capsys, ["extract", adapter, out], "already an adapter-only checkpoint", out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused(capsys, ["extract", w["root"] / "run", busy], "already exists", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    refused(capsys, ["extract", w["root"] / "run"], "required", out)


def test_merge_refusals(w, capsys, tmp_path):
    adapter = extract_adapter(w, capsys)
    out = tmp_path / "new" / "sub" / "out"
    base = ["--base", w["root"] / "pre"]
    refused(capsys, ["merge", w["root"] / "run", out] + base, "adapter_only=false", out)
    refused(capsys, ["merge", tmp_path / "gone", out] + base, "no such file or directory", out)
    refused(capsys, ["merge", adapter, out, "--base", tmp_path / "gone"], "--base", out)
    (tmp_path / "empty").mkdir()
    refused(capsys, ["merge", adapter, out, "--base", tmp_path / "empty"], "neither a moedist checkpoint", out)
    refused(capsys, ["merge", adapter, out, "--format", "gguf"] + base, "invalid choice", out)
    # no --base, and the adapter's config names no base
    assert run_cli(capsys, "extract", w["root"] / "run" / "step_000050", tmp_path / "a_nohf")[0] == 0
    m = json.loads((tmp_path / "a_nohf" / "manifest.json").read_text())
    m["config"]["model"]["from_hf"] = None
    (tmp_path / "a_nohf" / "manifest.json").write_text(json.dumps(m))
    refused(capsys, ["merge", tmp_path / "a_nohf", out], "--base: required", out)
    # a corrupt adapter file
    bad = tmp_path / "a_nohf" / "model-experts-ep0.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    refused(capsys, ["merge", tmp_path / "a_nohf", out] + base, "SHA-256 mismatch", out)


@pytest.mark.parametrize("base,tensor", [
    ("pre_wide", "embed_tokens.weight: base shape (256, 48) != (256, 32)"),     # same layout: the base tensor
    ("hf_wide", "layers.0.mlp.router.weight: adapter shape (4, 32) != (4, 48)"),  # HF base: the adapter tensor
])
def test_merge_refuses_an_adapter_that_does_not_fit(w, capsys, base, tensor, tmp_path):
    adapter = extract_adapter(w, capsys)
    line = refused(capsys, ["merge", adapter, tmp_path / "out", "--base", w["root"] / base],
                   "adapter does not fit the base", tmp_path / "out")
    assert tensor in line


def test_failure_while_writing_leaves_nothing(tmp_path, capsys):
    """--format hf of a model with no HF form (sigmoid router) fails after staging began: no OUT, no parents."""
    cfg = load_config(None, SMALL + ["lora.mode=moe_lora", "moe.score_func=sigmoid"])
    model = build_model(cfg)
    save_checkpoint(tmp_path / "full", model, step=1, config=cfg_dict(cfg))
    assert run_cli(capsys, "extract", tmp_path / "full", tmp_path / "a")[0] == 0
    out = tmp_path / "x" / "y" / "out"
    refused(capsys, ["merge", tmp_path / "a", out, "--base", tmp_path / "full", "--format", "hf"], "score_func", out)
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "full", "latest"]   # `latest` from save_checkpoint


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moedist", "merge", str(tmp_path / "nope"), str(tmp_path / "out"),
                        "--base", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ADAPTER_CKPT=" in r.stderr and not (tmp_path / "out").exists()
