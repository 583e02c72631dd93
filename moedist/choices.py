"""Every closed set of names a config key or a part accepts, in one torch-free module.

`moedist.config` takes its `choices=` from here and the parts that check their arguments
(`moe/`, `models/`) import the same tuples, so a new routing type or drop policy is added once.
"""
from __future__ import annotations

# model
DTYPES = ("float32", "bfloat16", "float16")
GATED_ACTIVATIONS = ("swiglu", "geglu")        # phi(gate) * up
PLAIN_ACTIVATIONS = ("gelu", "relu", "silu")   # phi(up)
ACTIVATIONS = GATED_ACTIVATIONS + PLAIN_ACTIVATIONS    # what the FFN kernels compute
MODEL_ACTIVATIONS = ("swiglu", "gelu", "relu")         # what `moe.activation` offers (the HF import sets others)

# routing and capacity
SCORE_FUNCS = ("softmax", "sigmoid")
ROUTER_TYPES = ("token_choice", "expert_choice")
SECOND_EXPERT_POLICIES = ("all", "random")
DROP_POLICIES = ("position", "probs")
AUX_LOSS_TYPES = ("switch", "importance", "none")
GROUP_ROUTING = ("learned", "random")

# adapters
LORA_MODES = ("none", "moe_lora", "expert_lora", "full")
LORA_TARGETS = ("gate", "up", "down")
DENSE_LORA_TARGETS = ("mlp", "proj")           # layers.DenseMLPWithLoRA: one adapter on the FFN or one per projection
UPCYCLE_METHODS = ("sparse", "moefication", "lora_moe")

# Hugging Face architectures (config.json model_type) that import and export
HF_DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
HF_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
HF_MODEL_TYPES = HF_DENSE_TYPES + HF_MOE_TYPES
ROPE_TYPES = ("default", "linear", "llama3")   # HF rope_type; "default" = no scaling
ROPE_SCALING_TYPES = ("linear", "llama3")      # what `model.rope_scaling.rope_type` may say

# training
LR_SCHEDULES = ("cosine", "constant", "linear")
OPTIMIZERS = ("adamw", "sgd")
NONFINITE_POLICIES = ("stop", "skip")
ACT_CKPT_MODES = ("none", "moe", "full")
EXPERT_GRADS = ("auto", "kept", "fresh")        # train.expert_grads (moe.experts.keeps_expert_grads)

# data
DATA_SOURCES = ("pydoc", "stdlib", "file")
SOURCE_FORMATS = ("text", "jsonl", "prompt_completion", "chat", "parquet")
SOURCE_KEYS = ("name", "path", "format", "weight", "text_field")

# DeepSpeed
ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu")
