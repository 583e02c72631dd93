"""Hand-written autograd kernels behind `moedist.moe.ffn` (one file per kernel).

Each kernel works on rows sorted by group (expert) and walks the groups' contiguous
row slices (`slices.py`); it exists because it keeps less for backward, or
materialises fewer temporaries, than plain autograd on the same ops:

    grouped_mm.py       GroupedMM        y[s_l] = x[s_l] @ w[l]
    gated_ffn.py        GroupedGatedFFN  y[s_l] = (phi(x Wg[l]) * (x Wu[l])) Wd[l]
    lora_proj.py        GatherLoRAProj   y_n = base[token_n] + s * x_n A[l] B[l]
    moe_lora_hidden.py  MoELoRAHidden    MixLoRA's per-pair hidden on a frozen gated FFN

Which one runs is decided in one place, `moedist.moe.ffn.choose_path` (its
docstring has the decision table); call the functions of `ffn.py`, not these
classes. Shapes: N rows, L groups, I/O in/out features, F FFN size, r LoRA rank.
"""
