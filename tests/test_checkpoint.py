"""Layout-independent checkpoints: reshard 4 -> 2 -> 1 -> 4 with Adam state, atomic writes, no pickles."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moedist.checkpoint import (get_torch_optimizer_state, load_checkpoint, read_manifest, resolve_checkpoint,
                                save_checkpoint, set_torch_optimizer_state, verify_checkpoint)
from moedist.config import load_config
from moedist.models import build_model, parallelize
from tests._dist import run_workers

OVR = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "model.ffn_size=32",
       "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=null",
       "moe.num_shared_experts=1", "moe.aux_loss_coef=0.01", "train.seed=3"]


def _batch(step: int, world: int, rank: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 256, (8, 12), generator=g)  # global batch of 8 sequences
    per = 8 // world
    return ids[rank * per:(rank + 1) * per]


def _fresh(cfg, dims):
    model = build_model(cfg)
    parallelize(model, dims.ep_comm)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _train(model, opt, dims, steps):
    from moedist.distributed.grad_sync import sync_gradients
    import torch.distributed as dist
    losses = []
    for s in steps:
        ids = _batch(s, dims.world_size, dims.rank)
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        sync_gradients(model, dims)
        opt.step()
        l = out.loss.detach().clone()
        dist.all_reduce(l)
        losses.append(l.item() / dims.world_size)
    return losses


def _reshard_worker(rank, world, root):
    from moedist.distributed import ParallelDims
    cfg = load_config(None, OVR)
    dims = {ep: ParallelDims(world, ep, rank).build() for ep in (4, 2, 1)}
    model, opt = _fresh(cfg, dims[4])
    straight = _train(model, opt, dims[4], range(8))
    pieces = []
    plan = [(4, range(0, 2)), (2, range(2, 4)), (1, range(4, 6)), (4, range(6, 8))]
    model, opt = _fresh(cfg, dims[4])
    for i, (ep, steps) in enumerate(plan):
        if i > 0:
            model, opt = _fresh(cfg, dims[ep])
            ck = load_checkpoint(Path(root) / f"ck{i - 1}", model, dims=dims[ep])
            set_torch_optimizer_state(model, opt, ck.optim_state)
            assert ck.step == steps[0]
        pieces += _train(model, opt, dims[ep], steps)
        save_checkpoint(Path(root) / f"ck{i}", model, step=steps[-1] + 1, dims=dims[ep],
                        optim_state=get_torch_optimizer_state(model, opt), extra_state={"data_pos": steps[-1] + 1})
    return straight, pieces


def test_reshard_4_2_1_4_matches_uninterrupted(tmp_path):
    results = run_workers(_reshard_worker, 4, args=(str(tmp_path),))
    straight, pieces = results[0]
    assert len(straight) == len(pieces) == 8
    for a, b in zip(straight, pieces):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (straight, pieces)
    assert straight[-1] < straight[0]  # it trains
    m = read_manifest(tmp_path / "ck1")  # saved at EP=2: experts from ranks 0 and 1 only
    assert m["layout"] == {"world_size": 4, "ep_size": 2}
    assert sorted(f for f in m["files"] if f.startswith("model-experts")) == ["model-experts-ep0.safetensors", "model-experts-ep1.safetensors"]
    assert m["extra_state"] == {"data_pos": 4}


def _single_model():
    cfg = load_config(None, OVR)
    return cfg, build_model(cfg)


def test_keys_are_global_expert_ids_and_files_hashed(tmp_path):
    cfg, model = _single_model()
    save_checkpoint(tmp_path / "c", model, step=7)
    verify_checkpoint(tmp_path / "c")
    with safe_open(str(tmp_path / "c" / "model-experts-ep0.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"layers.0.mlp.experts.{e}.w_up" for e in range(8)} <= keys
    w = model.layers[0].mlp.experts.w_up.detach()
    with safe_open(str(tmp_path / "c" / "model-experts-ep0.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("layers.0.mlp.experts.5.w_up"), w[5])
    assert resolve_checkpoint(tmp_path) == tmp_path / "c"  # via the `latest` pointer
    # a flipped byte is caught by the manifest's SHA-256
    p = tmp_path / "c" / "model-dense.safetensors"
    data = bytearray(p.read_bytes()); data[-1] ^= 0xFF; p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        verify_checkpoint(tmp_path / "c")


def test_roundtrip_restores_weights_buffers_and_no_temp_left(tmp_path):
    cfg, model = _single_model()
    save_checkpoint(tmp_path / "c", model, step=1)
    _, other = _single_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    load_checkpoint(tmp_path / "c", other)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_adapter_only_checkpoint_is_small_and_loads(tmp_path):
    cfg = load_config(None, OVR + ["lora.mode=moe_lora", "lora.rank=4"])
    model = build_model(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    save_checkpoint(tmp_path / "a", model, step=3, adapter_only=True)
    save_checkpoint(tmp_path / "f", model, step=3)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors") if not f.name.startswith("rng"))
    assert size(tmp_path / "a") < 0.5 * size(tmp_path / "f")
    fresh = build_model(cfg)
    load_checkpoint(tmp_path / "a", fresh)
    ids = torch.randint(0, 256, (2, 8))
    assert torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-6)
    m = read_manifest(tmp_path / "a")
    assert all("lora" in k or "router" in k for k in m["index"])


def test_wrong_shape_is_one_clear_error(tmp_path):
    cfg, model = _single_model()
    save_checkpoint(tmp_path / "c", model, step=1)
    other = build_model(load_config(None, OVR + ["model.ffn_size=64"]))
    with pytest.raises(ValueError, match="shape"):
        load_checkpoint(tmp_path / "c", other)


def test_adapter_only_keeps_buffers_of_trained_modules(tmp_path):
    cfg = load_config(None, OVR + ["lora.mode=moe_lora", "lora.rank=4", "moe.expert_bias=true",
                                   "moe.score_func=sigmoid"])
    model = build_model(cfg)
    with torch.no_grad():
        model.layers[0].mlp.router.expert_bias.fill_(0.25)
    save_checkpoint(tmp_path / "a", model, step=1, adapter_only=True)
    fresh = build_model(cfg)
    load_checkpoint(tmp_path / "a", fresh)
    assert torch.equal(fresh.layers[0].mlp.router.expert_bias, model.layers[0].mlp.router.expert_bias)
    assert not any("rotary" in k or "norm" in k for k in read_manifest(tmp_path / "a")["index"])
