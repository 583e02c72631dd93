"""Reference MLP building blocks with LoRA (specs/layers.md).

    from moedist.layers import DenseMLPWithLoRA, SparseMLPWithLoRA, MLPActivationType
"""
from moedist.layers.activation import MLPActivationType
from moedist.layers.dense_lora import DenseMLPWithLoRA
from moedist.layers.lora import SeededDropout
from moedist.layers.sparse_lora import SparseMLPWithLoRA

__all__ = ["DenseMLPWithLoRA", "SparseMLPWithLoRA", "MLPActivationType", "SeededDropout"]
