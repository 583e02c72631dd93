"""HF export: `to_hf` writes a directory that `AutoModelForCausalLM.from_pretrained` loads
with the same logits as the moedist model (fp32, 1e-4), for imported models, for
moedist-native MoE models (merged LoRA, LoRA-MoE -> Mixtral / Qwen2-MoE), and
refuses models with no HF equivalent.
"""
import json

import pytest
import torch

from tests.test_hf_import import ARCHS, hf_logits, make_hf, our_logits, token_ids

EXPORTED_AS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "mixtral",
               "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def perturb(model, seed=0, std=0.1, only=("lora_", "router")):
    """Make adapters (B = 0 at init) and routers non-trivial so the export has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or any(s in name for s in only):
                p.add_(std * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_hf_moedist_hf(arch, tmp_path):
    from moedist.models import from_hf, to_hf

    hf = make_hf(arch)
    hf.save_pretrained(tmp_path / "in")
    model, cfg = from_hf(str(tmp_path / "in"), data={"seq_len": 16})
    config = to_hf(model, tmp_path / "out", cfg)
    assert config["model_type"] == EXPORTED_AS[arch]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "model.safetensors"}
    ids = token_ids(5)
    ref = hf_logits(hf, ids)
    torch.testing.assert_close(hf_logits(load_hf(tmp_path / "out"), ids), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(our_logits(model, ids), ref, atol=1e-4, rtol=0)


NATIVE = ["model.hidden_size=32", "model.ffn_size=48", "model.num_heads=4", "model.num_kv_heads=2",
          "moe.num_experts=4", "moe.top_k=2", "lora.rank=4", "lora.alpha=8"]


@pytest.mark.parametrize("mode,extra,expected", [
    ("none", [], "mixtral"),
    ("expert_lora", [], "mixtral"),
    ("moe_lora", ["moe.num_shared_experts=1", "moe.shared_expert_gate=true"], "qwen2_moe"),
    ("none", ["moe.num_shared_experts=2", "moe.shared_expert_gate=true"], "qwen2_moe"),
    ("moe_lora", ["model.moe_every=2"], "qwen2_moe"),                           # zero shared expert
    ("none", ["model.moe_every=2", "moe.renormalize=false"], "qwen2_moe"),   # zero shared expert
    ("full", ["model.moe_every=0"], "llama"),
])
def test_native_models_export_with_lora_merged(mode, extra, expected, tmp_path):
    from moedist.config import load_config
    from moedist.models import build_model, to_hf

    model = build_model(load_config(None, NATIVE + [f"lora.mode={mode}"] + extra))
    perturb(model, only=None, std=0.05)         # every weight, incl. adapters and routers
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
    ours = our_logits(model, ids)
    assert to_hf(model, tmp_path)["model_type"] == expected
    torch.testing.assert_close(hf_logits(load_hf(tmp_path), ids), ours, atol=1e-4, rtol=0)


def test_upcycled_lora_moe_merges_into_mixtral(tmp_path):
    """Llama -> LoRA-MoE (upcycle) -> perturb adapters/routers -> Mixtral with expert e = FFN + adapter e."""
    from moedist.models import from_hf, to_hf, upcycle

    hf = make_hf("llama")
    model, cfg = from_hf(hf)
    upcycle(model, "lora_moe", 4, 2, cfg=cfg, lora_rank=4)
    ids = token_ids(7)
    torch.testing.assert_close(our_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    perturb(model)
    ours = our_logits(model, ids)
    assert (ours - hf_logits(hf, ids)).abs().max() > 1e-2   # the adapters now matter
    config = to_hf(model, tmp_path, cfg)
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4 and config["tie_word_embeddings"]
    exported = load_hf(tmp_path)
    torch.testing.assert_close(hf_logits(exported, ids), ours, atol=1e-4, rtol=0)
    # the experts really differ: expert e carries its own adapter
    experts = exported.model.layers[0].mlp.experts.gate_up_proj
    assert (experts[0] - experts[1]).abs().max() > 1e-3


def test_export_refuses_what_hf_cannot_express(tmp_path):
    from moedist.config import load_config
    from moedist.models import build_model, shard_experts_, to_hf

    def build(*extra):
        return build_model(load_config(None, NATIVE + list(extra)))

    with pytest.raises(ValueError, match="ungated shared experts"):
        to_hf(build("moe.num_shared_experts=1"), tmp_path)
    with pytest.raises(ValueError, match="score_func='sigmoid'"):
        to_hf(build("moe.score_func=sigmoid"), tmp_path)
    with pytest.raises(ValueError, match="activation='gelu'"):
        to_hf(build("moe.activation=gelu"), tmp_path)
    # LoRA-MoE keeps the frozen FFN at full weight (tests/test_moe_routing_options.py); HF experts are weighted
    with pytest.raises(ValueError, match="LoRA-MoE with moe.renormalize=false"):
        to_hf(build("lora.mode=moe_lora", "moe.renormalize=false"), tmp_path)
    model = build()
    shard_experts_(model.layers[0].mlp.experts, 0, 2)
    with pytest.raises(ValueError, match="sharded"):
        to_hf(model, tmp_path)
    assert not any(tmp_path.iterdir())                      # nothing half-written


def test_bf16_export_keeps_dtype(tmp_path):
    from moedist.models import from_hf, to_hf

    model, cfg = from_hf(make_hf("mixtral"))
    model.to(torch.bfloat16)
    to_hf(model, tmp_path, cfg)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
