"""PEFT export: adapters of a dense moedist model (lora.mode=full) load with
`peft.PeftModel.from_pretrained` on the exported HF base and reproduce moedist's logits."""
import json

import pytest
import torch

from tests.test_hf_export import perturb
from tests.test_hf_import import hf_logits, make_hf, our_logits, token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_peft_adapter_reproduces_moedist(arch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moedist.models import from_hf
    from moedist.models.peft_export import to_peft

    hf = make_hf(arch)
    model, cfg = from_hf(hf, lora={"mode": "full", "rank": 4, "alpha": 8})
    perturb(model, only=("lora_",))
    ids = token_ids(8)
    ours = our_logits(model, ids)
    assert (ours - hf_logits(hf, ids)).abs().max() > 1e-2          # adapters are not a no-op
    config = to_peft(model, tmp_path / "adapter", base_path=tmp_path / "base")
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    on_disk = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "LORA" and on_disk["base_model_name_or_path"] == str(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(hf_logits(base.eval(), ids), hf_logits(hf, ids), atol=1e-4, rtol=0)  # base unmerged
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(hf_logits(peft_model, ids), ours, atol=1e-4, rtol=0)


def test_partial_targets_and_refusals(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moedist.config import load_config
    from moedist.models import build_model, from_hf
    from moedist.models.peft_export import to_peft

    # FFN-only targets (gate/up): only those modules are named; attention has no adapters
    hf = make_hf("llama")
    model, _ = from_hf(hf, lora={"mode": "full", "rank": 2, "targets": ["gate", "up"]})
    perturb(model, only=("lora_",))
    ids = token_ids(9)
    ours = our_logits(model, ids)
    config = to_peft(model, tmp_path / "a", base_path=tmp_path / "b")
    assert "gate_proj" in config["target_modules"] and "down_proj" not in config["target_modules"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), tmp_path / "a").eval()
    torch.testing.assert_close(hf_logits(peft_model, ids), ours, atol=1e-4, rtol=0)

    with pytest.raises(ValueError, match="no LoRA adapters"):
        to_peft(from_hf(hf)[0], tmp_path / "c")
    moe = build_model(load_config(None, ["model.hidden_size=32", "model.ffn_size=48", "model.num_heads=4",
                                         "lora.mode=moe_lora", "lora.rank=2"]))
    with pytest.raises(ValueError, match="dense models"):
        to_peft(moe, tmp_path / "d")
