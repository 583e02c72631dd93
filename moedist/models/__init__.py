"""Models: a tiny Llama-style decoder with dense or MoE FFNs, built from config."""
from moedist.models.build import adapter_params, apply_lora_freezing, build_model, moe_layers, trainable_params
from moedist.models.llama import CausalLM, CausalLMOutput, DenseFFN
from moedist.models.hf import apply_hf_config, from_hf, load_hf_weights_into, to_hf
from moedist.models.parallelize import parallelize, shard_experts_
from moedist.models.materialize import build_local_model, build_meta_model, materialize_
from moedist.models.upcycle import upcycle, upcycled_config

__all__ = ["adapter_params", "apply_lora_freezing", "build_model", "moe_layers", "trainable_params",
           "CausalLM", "CausalLMOutput", "DenseFFN", "parallelize", "shard_experts_",
           "build_local_model", "build_meta_model", "materialize_",
           "from_hf", "load_hf_weights_into", "apply_hf_config", "to_hf", "upcycle", "upcycled_config"]
