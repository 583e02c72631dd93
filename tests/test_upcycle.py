"""Upcycling a dense model into MoE: each method starts equal to the dense model.

Reference: the dense model's own logits before upcycling (fp32). Perturbation
checks make sure the identities are not vacuous (the new parts are really used).
"""
import pytest
import torch

from moedist.config import load_config
from moedist.models import build_model
from moedist.models.upcycle import upcycle, upcycled_config
from moedist.moe import GroupedExperts, MoELayer, MoELoRAExperts

DENSE = ["model.moe_every=0", "model.hidden_size=32", "model.ffn_size=48", "model.num_heads=4",
         "model.num_kv_heads=2", "model.num_layers=2", "train.seed=3"]


def dense_cfg(*extra):
    return load_config(None, DENSE + list(extra))


def ids(seed=0):
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("method,E,K,cls", [
    ("lora_moe", 4, 2, MoELoRAExperts),
    ("sparse", 4, 2, GroupedExperts),
    ("moefication", 4, 4, GroupedExperts),
    ("moefication", 3, 3, GroupedExperts),     # 1/w0 = 3 is not a power of two
])
def test_upcycle_starts_equal_to_dense(method, E, K, cls):
    cfg = dense_cfg()
    model = build_model(cfg).eval()
    x = ids()
    ref = _logits(model, x)
    upcycle(model, method, E, K, cfg=cfg, lora_rank=4)
    layers = [l.mlp for l in model.layers]
    assert all(isinstance(m, MoELayer) and isinstance(m.experts, cls) for m in layers)
    assert layers[0].num_experts == E and layers[0].router.top_k == K
    torch.testing.assert_close(_logits(model, x), ref, atol=1e-5, rtol=0)


def test_moefication_with_renormalised_weights_and_sigmoid_router():
    for extra in (["moe.renormalize=true"], ["moe.score_func=sigmoid", "moe.renormalize=false"]):
        cfg = dense_cfg(*extra)
        model = build_model(cfg).eval()
        x = ids(1)
        ref = _logits(model, x)
        upcycle(model, "moefication", 4, 4, cfg=cfg)
        torch.testing.assert_close(_logits(model, x), ref, atol=1e-5, rtol=0)


def test_moefication_shards_are_weighted_one_and_need_every_expert():
    cfg = dense_cfg("moe.renormalize=false")
    model = build_model(cfg).eval()
    x = ids(2)
    ref = _logits(model, x)
    dense = model.layers[0].mlp
    upcycle(model, "moefication", 4, 4, cfg=cfg)
    moe = model.layers[0].mlp
    # expert 0 = first F/E hidden units; its down is scaled by 1/w0 = E
    torch.testing.assert_close(moe.experts.w_up[0], dense.w_up[:, :12])
    torch.testing.assert_close(moe.experts.w_down[0], dense.w_down[:12] * 4)
    assert torch.count_nonzero(moe.router.weight) == 0
    with torch.no_grad():            # dropping a shard changes the output: the shards are all used
        moe.experts.w_down[3].zero_()
    assert (_logits(model, x) - ref).abs().max() > 1e-3


def test_lora_moe_freezes_base_and_adapters_change_output():
    cfg = dense_cfg()
    model = build_model(cfg).eval()
    x = ids(3)
    ref = _logits(model, x)
    upcycle(model, "lora_moe", 4, 2, cfg=cfg, lora_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".router." in n for n in trainable)
    assert any("lora_B" in n for n in trainable) and any("router" in n for n in trainable)
    with torch.no_grad():
        model.layers[1].mlp.experts.lora["up"].lora_B.add_(0.5)
    assert (_logits(model, x) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["lora_moe", "sparse", "moefication"])
def test_upcycle_equals_build_model_of_upcycled_config(method):
    """Same seed: upcycle(build_model(dense)) == build_model(upcycled_config) up to the expert weights,
    which come from the dense FFN (for lora_moe the frozen base is seeded like the dense FFN, so all match)."""
    cfg = dense_cfg()
    E, K = 4, (4 if method == "moefication" else 2)
    model = upcycle(build_model(cfg), method, E, K, cfg=cfg, lora_rank=4)
    ucfg = upcycled_config(cfg, method, E, K, lora_rank=4)
    fresh = build_model(ucfg)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        same_init = method == "lora_moe" or not (".experts." in k or (method == "moefication" and ".router." in k))
        if same_init:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_upcycle_only_selected_layers_and_bad_input():
    cfg = dense_cfg()
    model = upcycle(build_model(cfg), "sparse", 2, 1, cfg=cfg, moe_every=2)
    assert not isinstance(model.layers[0].mlp, MoELayer) and isinstance(model.layers[1].mlp, MoELayer)
    with pytest.raises(ValueError, match="method"):
        upcycle(build_model(cfg), "densify", 4, 2, cfg=cfg)
    with pytest.raises(ValueError, match="num_experts=5"):
        upcycle(build_model(cfg), "moefication", 5, 5, cfg=cfg)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(build_model(cfg), "sparse", 4, 5, cfg=cfg)
    with pytest.raises(ValueError, match="DenseFFN"):          # already MoE: nothing dense to upcycle
        upcycle(model, "sparse", 2, 1, cfg=cfg)


def test_upcycle_without_cfg_uses_model_dimensions():
    cfg = dense_cfg()
    model = build_model(cfg).eval()
    x = ids(4)
    ref = _logits(model, x)
    upcycle(model, "lora_moe", 4, 2, lora_rank=2, seed=0)
    assert model.layers[0].mlp.experts.lora_rank == 2
    torch.testing.assert_close(_logits(model, x), ref, atol=1e-5, rtol=0)
