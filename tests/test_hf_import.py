"""HF import: moedist logits equal transformers logits for the same weights (fp32, 1e-4).

Tiny random-init transformers models are built from small configs (no downloads),
saved with ``save_pretrained`` and imported from the directory and from memory.
"""
import pytest
import torch

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]
VOCAB = 64


def make_hf(arch: str, seed: int = 0, vocab: int = VOCAB):
    """A tiny random transformers CausalLM of `arch`, eval mode, every weight random.

    Norm weights are 1 + noise, routers have a large std so top-k choices are not
    near-ties (a near-tie could flip on rounding and make a valid import look wrong).
    """
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    moe = dict(moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    cfg = {
        "llama": lambda: tf.LlamaConfig(**common, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=16),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**dict(common, num_hidden_layers=3), **moe, decoder_sparse_step=2,
                                               shared_expert_intermediate_size=40, norm_topk_prob=False),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**dict(common, num_hidden_layers=3), **moe, head_dim=16,
                                               mlp_only_layers=[1], norm_topk_prob=True),
    }[arch]()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                p.copy_(noise)
            else:
                p.copy_(0.1 * noise)
    return model


def token_ids(seed: int = 1, batch: int = 2, seq: int = 12, vocab: int = VOCAB):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each architecture's tiny model, saved with save_pretrained; {arch: (hf_model, dir)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ARCHS:
        hf = make_hf(arch)
        hf.save_pretrained(root / arch)
        out[arch] = (hf, str(root / arch))
    return out


# Mistral's sliding window (16) caps model.max_seq_len, so the data section must fit under it.
SEQ = {"data": {"seq_len": 16}}


@pytest.mark.parametrize("arch", ARCHS)
def test_import_matches_transformers(arch, hf_dirs):
    from moedist.models import from_hf

    hf, path = hf_dirs[arch]
    ids = token_ids()
    ref = hf_logits(hf, ids)
    model, cfg = from_hf(path, **SEQ)
    assert cfg.model.from_hf == path and cfg.moe.capacity_factor is None
    torch.testing.assert_close(our_logits(model, ids), ref, atol=1e-4, rtol=0)
    mem, _ = from_hf(hf, **SEQ)                       # in-memory model: fused expert layout of transformers 5
    torch.testing.assert_close(our_logits(mem, ids), ref, atol=1e-4, rtol=0)


def test_config_mapping_of_each_architecture(hf_dirs):
    from moedist.models import moe_layers
    from moedist.models.hf import from_hf

    def load(arch):
        return from_hf(hf_dirs[arch][1], **SEQ)

    model, cfg = load("llama")
    assert cfg.model.tie_embeddings and model.lm_head is None and cfg.model.moe_every == 0
    _, cfg = load("mistral")
    assert cfg.model.max_seq_len == 16                                   # the sliding window
    model, cfg = load("qwen2")
    assert model.layers[0].self_attn.q_proj.bias is not None
    model, cfg = load("qwen3")
    assert cfg.model.head_dim == 16 and model.layers[0].self_attn.q_norm is not None
    model, cfg = load("mixtral")
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.renormalize) == (4, 2, True) and len(moe_layers(model)) == 2
    model, cfg = load("qwen2_moe")
    assert cfg.model.moe_every == 2 and not cfg.moe.renormalize and cfg.moe.expert_ffn_size == 24
    moe = moe_layers(model)
    assert len(moe) == 1 and moe[0].shared_experts.w_up.shape == (32, 40) and moe[0].shared_experts.w_shared_gate is not None
    model, cfg = load("qwen3_moe")
    assert cfg.model.mlp_only_layers == [1] and cfg.moe.renormalize and len(moe_layers(model)) == 2


def test_sharded_and_fused_checkpoints(hf_dirs, tmp_path):
    """A sharded safetensors checkpoint (index.json), the fused in-memory expert layout, and a refused .bin."""
    from moedist.models import from_hf

    hf, _ = hf_dirs["qwen3_moe"]
    ids = token_ids(2)
    ref = hf_logits(hf, ids)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, _ = from_hf(str(tmp_path / "sharded"))
    torch.testing.assert_close(our_logits(model, ids), ref, atol=1e-4, rtol=0)
    from safetensors.torch import save_file

    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},  # in-memory names: experts.gate_up_proj
              str(tmp_path / "fused" / "model.safetensors"))
    model, _ = from_hf(str(tmp_path / "fused"))
    torch.testing.assert_close(our_logits(model, ids), ref, atol=1e-4, rtol=0)
    # pickled weights are refused before anything is opened (moedist never unpickles)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*never unpickles"):
        from_hf(str(tmp_path / "bin"))


def test_trainer_path_config_then_build_then_load(hf_dirs):
    """What `moedist train` does with model.from_hf: config -> build_model -> load_hf_weights_into."""
    from moedist.config import load_config
    from moedist.models import apply_hf_config, build_model, load_hf_weights_into

    hf, path = hf_dirs["mixtral"]
    cfg = apply_hf_config(load_config(None, [f"model.from_hf={path}", "moe.capacity_factor=1.5", "moe.top_k=1"]))
    assert cfg.moe.capacity_factor == 1.5 and cfg.moe.top_k == 2 and cfg.model.hidden_size == 32
    cfg.moe.capacity_factor = None
    model = load_hf_weights_into(build_model(cfg), cfg.model.from_hf)
    ids = token_ids(3)
    torch.testing.assert_close(our_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_import_with_lora_modes_starts_equal(hf_dirs):
    """LoRA on the imported model (full) and LoRA-MoE on its dense FFNs start equal to HF (B = 0)."""
    from moedist.models import from_hf, moe_layers
    from moedist.moe import MoELoRAExperts

    hf, path = hf_dirs["llama"]
    ids = token_ids(4)
    ref = hf_logits(hf, ids)
    model, cfg = from_hf(path, lora={"mode": "full", "rank": 4})
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} >= {"lora_A", "lora_B"}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(our_logits(model, ids), ref, atol=1e-4, rtol=0)
    model, cfg = from_hf(path, lora={"mode": "moe_lora", "rank": 4}, moe={"num_experts": 4, "top_k": 2})
    assert cfg.model.moe_every == 1 and all(isinstance(m.experts, MoELoRAExperts) for m in moe_layers(model))
    torch.testing.assert_close(our_logits(model, ids), ref, atol=1e-4, rtol=0)
    hf, path = hf_dirs["mixtral"]
    model, _ = from_hf(path, lora={"mode": "expert_lora", "rank": 4})
    torch.testing.assert_close(our_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_import_errors(hf_dirs, tmp_path):
    import json

    from moedist.config import load_config
    from moedist.models import build_model, from_hf, load_hf_weights_into

    _, path = hf_dirs["mixtral"]
    with pytest.raises(ValueError, match="model.hidden_size: fixed by the Hugging Face checkpoint"):
        from_hf(path, model={"hidden_size": 64})
    with pytest.raises(ValueError, match="moe.num_experts: fixed"):
        from_hf(path, moe={"num_experts": 8})
    with pytest.raises(ValueError, match="model.head_dim: fixed"):
        from_hf(path, model={"head_dim": 16})
    with pytest.raises(ValueError, match="moe.bogus: unknown key"):
        from_hf(path, moe={"bogus": 1})
    with pytest.raises(ValueError, match="lora.mode='moe_lora': needs a dense model"):
        from_hf(path, lora={"mode": "moe_lora"})
    with pytest.raises(ValueError, match="no config.json"):
        from_hf(str(tmp_path))
    with open(f"{hf_dirs['llama'][1]}/config.json", encoding="utf-8") as fh:
        cfg = json.load(fh)
    for key, value, msg in (("model_type", "gpt2", "model_type='gpt2'"), ("hidden_act", "gelu", "hidden_act"),
                            ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "rope_type='yarn'")):
        (tmp_path / key).mkdir()
        (tmp_path / key / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
        with pytest.raises(ValueError, match=msg):
            from_hf(str(tmp_path / key))
    # weights that do not fit: a dense model asked to load a checkpoint with experts
    dense = build_model(load_config(None, ["model.moe_every=0", "model.hidden_size=32", "model.ffn_size=48",
                                           "model.num_heads=4", "model.num_kv_heads=2", "model.vocab_size=256"]))
    with pytest.raises(ValueError, match="shape|missing tensor"):
        load_hf_weights_into(dense, path)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
])
def test_rope_scaling_import_and_export(rope, tmp_path):
    import transformers as tf

    from moedist.models import from_hf, to_hf

    hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            rope_parameters=rope)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():      # large q/k so positions matter
            std = 1.0 if ("q_proj" in name or "k_proj" in name) else 0.1
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else std * torch.randn(p.shape, generator=g))
    hf.save_pretrained(tmp_path / "in")
    ids = token_ids(5, seq=40)
    ref = hf_logits(hf, ids)
    model, cfg = from_hf(str(tmp_path / "in"))
    assert cfg.model.rope_scaling["rope_type"] == rope["rope_type"]
    torch.testing.assert_close(our_logits(model, ids), ref, atol=1e-4, rtol=0)
    to_hf(model, tmp_path / "out")
    torch.testing.assert_close(hf_logits(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), ids), ref,
                               atol=1e-4, rtol=0)
    model.rope_scaling = None                       # the scaling is not a no-op here
    assert (our_logits(model, ids) - ref).abs().max() > 1e-3
