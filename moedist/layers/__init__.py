"""Reference MLP building blocks with LoRA, built from the parts in `moedist.moe`.

    from moedist.layers import DenseMLPWithLoRA, SparseMLPWithLoRA, MLPActivationType

`DenseMLPWithLoRA` is a GLU MLP plus an optional LoRA branch; `SparseMLPWithLoRA` a softmax
top-k mixture of them, expert parallel over a process group when given one. Their
constructors, parameter names, shapes, initialisation and seeds are a fixed contract, stated
in each class's module docstring, so results reproduce bit for bit across machines and EP
layouts.
"""
from moedist.layers.activation import MLPActivationType
from moedist.layers.dense_lora import DenseMLPWithLoRA
from moedist.layers.sparse_lora import SparseMLPWithLoRA
from moedist.moe.lora import SeededDropout

__all__ = ["DenseMLPWithLoRA", "SparseMLPWithLoRA", "MLPActivationType", "SeededDropout"]
