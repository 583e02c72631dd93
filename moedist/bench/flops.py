"""Useful FLOPs of one forward + backward step of each `bench layer` row (pure functions).

"Useful" = the expert-FFN matmuls the layer's math needs, counted once: the
T*K routed (token, expert) pairs for an MoE layer, never the padding of a
[E, C, H] buffer (DeepSpeed, fairscale) nor the router (2*T*H*E, small). A
matmul [m, k] @ [k, n] is 2*m*k*n FLOPs. In backward a trainable weight costs
an input-gradient and a weight-gradient matmul (2x its forward); a frozen
weight only the input-gradient matmul (1x), because autograd never computes
the gradient of a weight that does not require it. The input x requires grad
in the bench (as inside a model), so input gradients always run.

    moe / floor (all weights train)  (3 fwd+bwd) x 2*N*H*F per projection, N = T*K
    dense (one FFN of size K*F)      the same FLOPs as moe, on T rows
    dense-lora (frozen FFN + LoRA)   frozen: 2 x 2*T*H*F per projection; LoRA: 3 x 2*T*r*(d_in + d_out)
    moedist-lora fused               frozen FFN once per TOKEN (T rows), LoRA per PAIR (N rows)
    moedist-lora naive               frozen FFN once per PAIR (N rows), LoRA per pair
"""
from __future__ import annotations


def matmul_flops(m: int, k: int, n: int) -> float:
    """[m, k] @ [k, n]: one multiply and one add per term."""
    return 2.0 * m * k * n


def ffn_flops(rows: int, hidden: int, ffn: int, gated: bool, backward: bool, frozen: bool = False) -> float:
    """Matmul FLOPs of an FFN on `rows` rows: 2*rows*H*F per projection (3 gated, 2 plain).

    Backward adds the input-gradient matmuls (1x forward) and, unless `frozen`,
    the weight-gradient matmuls (another 1x).
    """
    fwd = matmul_flops(rows, hidden, ffn) * (3 if gated else 2)
    if not backward:
        return fwd
    return fwd * (2 if frozen else 3)


def lora_flops(rows: int, hidden: int, ffn: int, rank: int, gated: bool, backward: bool) -> float:
    """LoRA adapters (x A) B of rank r on every projection of an FFN, on `rows` rows.

    gate/up: [rows, H] @ [H, r] @ [r, F]; down: [rows, F] @ [F, r] @ [r, H]. A and B
    train: backward is input + weight gradients (2x forward).
    """
    per_proj = matmul_flops(rows, hidden, rank) + matmul_flops(rows, rank, ffn)  # same for down ([F, r], [r, H])
    fwd = per_proj * (3 if gated else 2)
    return fwd * 3 if backward else fwd


def useful_flops(impl: str, mode: str, tokens: int, topk: int, hidden: int, ffn: int, gated: bool, rank: int = 0,
                 backward: bool = True) -> float:
    """Useful FLOPs of one step of the bench row (impl, mode); see the module docstring."""
    T, N = tokens, tokens * topk
    if impl == "dense-lora":
        return ffn_flops(T, hidden, ffn, gated, backward, frozen=True) + lora_flops(T, hidden, ffn, rank, gated, backward)
    if impl == "moedist-lora":
        base_rows = T if mode == "fused" else N  # fused: frozen gate/up/down once per token
        return (ffn_flops(base_rows, hidden, ffn, gated, backward, frozen=True)
                + lora_flops(N, hidden, ffn, rank, gated, backward))
    if impl == "dense":
        return ffn_flops(T, hidden, topk * ffn, gated, backward)
    return ffn_flops(N, hidden, ffn, gated, backward)  # moedist, deepspeed, fairscale, floor: the routed pairs
