"""`moedist convert`: from-hf / to-hf / upcycle / peft through the CLI entry point.

Byte-level vocab (256): a checkpoint's config (model.from_hf cleared) must validate on its own.
"""
import torch

from moedist.cli import main
from tests.test_hf_export import load_hf, perturb
from tests.test_hf_import import hf_logits, make_hf, our_logits, token_ids

V = 256


def test_from_hf_then_to_hf_and_upcycle(tmp_path, capsys):
    hf = make_hf("qwen3", vocab=V)                  # head_dim override: an arch fact kept in safetensors metadata
    hf.save_pretrained(tmp_path / "hf")
    ids = token_ids(12, vocab=V)
    ref = hf_logits(hf, ids)
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "md")]) == 0
    assert (tmp_path / "md" / "manifest.json").exists()
    assert main(["convert", "to-hf", str(tmp_path / "md"), str(tmp_path / "back")]) == 0
    torch.testing.assert_close(hf_logits(load_hf(tmp_path / "back"), ids), ref, atol=1e-4, rtol=0)
    # upcycle straight from the HF directory, then export: Qwen3 + experts = qwen3_moe
    assert main(["convert", "upcycle", str(tmp_path / "hf"), str(tmp_path / "up"), "--method", "lora_moe",
                 "--num-experts", "4", "--top-k", "2", "--lora-rank", "4"]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "up"), str(tmp_path / "up_hf")]) == 0
    assert "qwen3_moe" in capsys.readouterr().out
    torch.testing.assert_close(hf_logits(load_hf(tmp_path / "up_hf"), ids), ref, atol=1e-4, rtol=0)


def test_checkpoint_to_hf_and_peft(tmp_path):
    """A checkpoint written by moedist.checkpoint (experts keyed by global id) -> HF; PEFT from a LoRA model."""
    from moedist.checkpoint import save_checkpoint
    from moedist.config import config_to_dict, load_config
    from moedist.models import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.ffn_size=48", "model.num_heads=4", "moe.num_experts=4",
                             "lora.mode=expert_lora", "lora.rank=2"])
    model = build_model(cfg)
    perturb(model, only=None, std=0.05)
    save_checkpoint(tmp_path / "run" / "step_000007", model, step=7, config=config_to_dict(cfg))
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0   # run dir: its latest
    ids = token_ids(13, vocab=V)
    torch.testing.assert_close(hf_logits(load_hf(tmp_path / "hf"), ids), our_logits(model, ids), atol=1e-4, rtol=0)

    make_hf("llama", vocab=V).save_pretrained(tmp_path / "llama")
    assert main(["convert", "from-hf", str(tmp_path / "llama"), str(tmp_path / "lora"), "lora.mode=full", "lora.rank=4"]) == 0
    assert main(["convert", "peft", str(tmp_path / "lora"), str(tmp_path / "adapter"), "--base", str(tmp_path / "base")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and (tmp_path / "base" / "config.json").exists()


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["convert", "to-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a moedist checkpoint" in err[0]
    assert main(["convert", "from-hf", str(tmp_path), str(tmp_path / "o"), "lora.rank"]) == 2
    assert "section.key=value" in capsys.readouterr().err
