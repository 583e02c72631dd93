"""Models: a tiny Llama-style decoder with dense or MoE FFNs, built from config."""
from moedist.models.build import adapter_params, apply_lora_freezing, build_model, moe_layers, trainable_params
from moedist.models.llama import CausalLM, CausalLMOutput, DenseFFN
from moedist.models.parallelize import parallelize, shard_experts_

__all__ = ["adapter_params", "apply_lora_freezing", "build_model", "moe_layers", "trainable_params",
           "CausalLM", "CausalLMOutput", "DenseFFN", "parallelize", "shard_experts_"]
