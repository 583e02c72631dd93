"""Turn a dense model's FFNs into MoE layers that start out computing the dense model.

Three methods (all in place on a built `CausalLM` whose FFNs are `DenseFFN`):

* ``"sparse"`` — sparse upcycling (Komatsuzaki et al. 2022): every expert is a
  copy of the FFN, plus a new router (normal init). The layer outputs
  ``sum_k w_k * FFN(x) = FFN(x) * sum_k w_k``, which is the dense output when
  the kept weights sum to 1 (``moe.renormalize=true``, or softmax with
  ``top_k = num_experts``).
* ``"moefication"`` — MoEfication (Zhang et al. 2022), the `SparseMLPWithLoRA`
  layout: the FFN's hidden dimension F is cut into ``num_experts`` shards of
  ``F / E`` units; expert e owns rows/columns ``[e*F/E, (e+1)*F/E)`` of
  gate/up/down. The dense FFN is the *unweighted* sum of its shards, but a MoE
  layer weights expert e by its routing weight w_e. So the router starts at
  zero (every expert gets the same weight w0, computed by the router's own
  routing function on zero logits: 1/E for softmax without renormalisation,
  1/K with renormalisation, 1/2 for sigmoid) and each shard's down projection
  is multiplied by 1/w0, making w_e * (1/w0) = 1 exactly at init. With
  ``top_k = num_experts`` every shard is used and the layer equals the dense
  FFN; with ``top_k < num_experts`` it is the sparse approximation that the
  router then learns (the start is a tie, so which shards are kept is
  arbitrary until it trains).
* ``"lora_moe"`` — LoRA-MoE / MixLoRA: the FFN is frozen and shared by all
  experts, expert e is a LoRA adapter on it (`MoELoRAExperts.load_base`) with
  B = 0, plus a new router. At init every expert equals the FFN, so (as for
  ``"sparse"``) the layer is the dense FFN when the kept weights sum to 1.
  With ``freeze=True`` only adapters (and router, per ``lora.train_router``)
  train afterwards.

`upcycled_config(cfg, ...)` gives the config whose `build_model` builds the
same structure with the same router/adapter initialisation (same seeds), so a
checkpoint of an upcycled model loads into `build_model(upcycled_config(...))`.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch

from moedist.choices import UPCYCLE_METHODS
from moedist.config import MoedistConfig
from moedist.models.build import apply_lora_freezing, build_moe_layer, is_moe_layer
from moedist.models.llama import CausalLM, DenseFFN

METHODS = UPCYCLE_METHODS


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed {', '.join(METHODS)}")


def _dense_ffns(model: CausalLM, moe_every: int):
    """(layer index, DenseFFN) for every layer that will become MoE."""
    out = []
    for i, layer in enumerate(model.layers):
        if not is_moe_layer(i, moe_every):
            continue
        if type(layer.mlp) is not DenseFFN:
            raise ValueError(f"upcycle: layer {i} FFN is {type(layer.mlp).__name__}; only plain DenseFFN "
                             "layers can be upcycled (merge LoRA first, or upcycle before adding it)")
        out.append((i, layer.mlp))
    if not out:
        raise ValueError(f"upcycle: moe_every={moe_every} selects no layer of this {len(model.layers)}-layer model")
    return out


def _config_for_model(model: CausalLM) -> MoedistConfig:
    """Default config whose model section describes `model` (used when no cfg is given)."""
    cfg = MoedistConfig()
    cfg.model.hidden_size = model.embed_tokens.weight.shape[1]
    cfg.model.vocab_size = model.embed_tokens.weight.shape[0]
    cfg.model.num_layers = len(model.layers)
    cfg.model.moe_every = 0
    dense = next(l.mlp for l in model.layers if isinstance(l.mlp, DenseFFN))
    cfg.model.ffn_size = dense.w_up.shape[1]
    cfg.moe.activation = dense.activation
    return cfg


def upcycled_config(cfg: MoedistConfig, method: str, num_experts: int, top_k: int, *, lora_rank: Optional[int] = None,
                    lora_alpha: Optional[float] = None, moe_every: int = 1):
    """The config of the upcycled model (a deep copy of the dense `cfg`).

    Sets model.moe_every, moe.num_experts, moe.top_k and, by method:
    sparse: lora.mode=none; moefication: lora.mode=none, moe.expert_ffn_size=F/E;
    lora_moe: lora.mode=moe_lora, lora.rank/alpha when given.

    Raises:
        ValueError: unknown method, shared experts configured, F not divisible by E,
            or a dense model with lora.mode other than none.
    """
    _check_method(method)
    if cfg.lora.mode != "none":
        raise ValueError(f"lora.mode={cfg.lora.mode!r}: upcycling starts from a dense model without "
                         "adapters (lora.mode=none); merge the adapters first")
    if cfg.moe.num_shared_experts:
        raise ValueError(f"moe.num_shared_experts={cfg.moe.num_shared_experts}: must be 0 for upcycling "
                         "(a new shared expert would change the dense model's output)")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k}: must be between 1 and num_experts ({num_experts})")
    out = copy.deepcopy(cfg)
    out.model.moe_every = moe_every
    out.moe.num_experts, out.moe.top_k = num_experts, top_k
    out.moe.expert_ffn_size = None
    if method == "moefication":
        F = cfg.model.ffn_size
        if F % num_experts:
            raise ValueError(f"num_experts={num_experts}: must divide the FFN size ({F}) for moefication")
        out.moe.expert_ffn_size = F // num_experts
    if method == "lora_moe":
        out.lora.mode = "moe_lora"
        if lora_rank is not None:
            out.lora.rank = lora_rank
        if lora_alpha is not None:
            out.lora.alpha = lora_alpha
        if out.lora.rank < 1:
            raise ValueError(f"lora_rank={out.lora.rank}: must be >= 1 for lora_moe")
    return out


def _weights_sum_to_one(router) -> bool:
    if router.score_func == "softmax":
        return router.renormalize or router.top_k == router.num_experts
    return router.renormalize


@torch.no_grad()
def _zero_logit_weight(router) -> float:
    """The combine weight each expert gets when all router logits are 0 (ties everywhere)."""
    w_K = router(torch.zeros(1, router.weight.shape[1])).weight_TK[0]  # [K]
    if not torch.allclose(w_K, w_K[0].expand_as(w_K)):
        raise ValueError("moefication: the router does not give equal weights at zero logits")
    return float(w_K[0])


@torch.no_grad()
def _moefy(moe, dense: DenseFFN, num_experts: int) -> None:
    """Expert e = shard e of the dense FFN's hidden units; down scaled by 1/w0; router zeroed."""
    moe.router.weight.zero_()
    scale = 1.0 / _zero_logit_weight(moe.router)
    Fe = dense.w_up.shape[1] // num_experts
    for e in range(num_experts):
        cols = slice(e * Fe, (e + 1) * Fe)
        gate = dense.w_gate[:, cols] if dense.w_gate is not None else None  # [H, F/E]
        moe.experts.load_expert(e, gate, dense.w_up[:, cols], dense.w_down[cols, :] * scale)


def upcycle(model: CausalLM, method: str, num_experts: int, top_k: int, *, lora_rank: Optional[int] = None,
            lora_alpha: Optional[float] = None, seed: Optional[int] = None, cfg: Optional[MoedistConfig] = None, moe_every: int = 1,
            freeze: bool = True) -> CausalLM:
    """Replace the dense FFNs of `model` by MoE layers, in place; returns `model`.

    Args:
        model: a dense `CausalLM` (e.g. from `from_hf` on a Llama); run before `parallelize`.
        method: "sparse", "moefication" or "lora_moe" (see the module docstring).
        num_experts, top_k: E and K of the new layers.
        lora_rank, lora_alpha: LoRA size for lora_moe (default cfg.lora.rank/alpha).
        seed: seed of the new routers/adapters (default cfg.train.seed); the same seed
            and config give the same weights as `build_model(upcycled_config(cfg, ...))`.
        cfg: the dense model's MoedistConfig; its moe/lora sections supply the other
            MoE settings (aux loss, capacity, router). Default: config defaults with
            the model's dimensions.
        moe_every: which layers become MoE (1 = all; layer i when (i + 1) % moe_every == 0).
        freeze: for lora_moe, freeze everything but adapters/router (`apply_lora_freezing`).

    Raises:
        ValueError: bad method/sizes, or an FFN that is not a plain `DenseFFN`.
    """
    _check_method(method)
    cfg = _config_for_model(model) if cfg is None else cfg
    ucfg = upcycled_config(cfg, method, num_experts, top_k, lora_rank=lora_rank, lora_alpha=lora_alpha, moe_every=moe_every)
    seed = cfg.train.seed if seed is None else seed
    for i, dense in _dense_ffns(model, moe_every):
        if dense.activation != ucfg.moe.activation:
            raise ValueError(f"moe.activation={ucfg.moe.activation!r}: the dense FFN of layer {i} uses {dense.activation!r}")
        if dense.w_up.shape[1] != ucfg.model.ffn_size:
            raise ValueError(f"model.ffn_size={ucfg.model.ffn_size}: layer {i} FFN has {dense.w_up.shape[1]} hidden units")
        moe = build_moe_layer(i, ucfg.model, ucfg.moe, ucfg.lora, seed,
                              dense_ffn=dense if method == "lora_moe" else None)
        if method == "sparse":
            for e in range(num_experts):
                moe.experts.load_expert(e, dense.w_gate, dense.w_up, dense.w_down)
        elif method == "moefication":
            _moefy(moe, dense, num_experts)
        if method != "moefication" and not _weights_sum_to_one(moe.router):
            warnings.warn(f"upcycle: layer {i} router weights do not sum to 1 (renormalize=false, top_k < "
                          "num_experts): the upcycled model does not start equal to the dense one")
        p = dense.w_up
        moe.experts.to(device=p.device, dtype=p.dtype)
        moe.router.to(device=p.device)  # router stays float32
        model.layers[i].mlp = moe
    if method == "lora_moe" and freeze:
        apply_lora_freezing(model, ucfg.lora)
    return model
