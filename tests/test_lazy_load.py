"""Lazy sharded loading (issue 11 item 2): at EP=2 each rank reads only the expert tensors it holds.

`safetensors.safe_open` is wrapped so every `get_tensor`/`get_slice` records the tensor name. Two
gloo processes take the trainer's path (config -> meta build -> this rank's shard -> load):
  * `model.from_hf`: a transformers Mixtral saved in two safetensors shards (read through the index)
    and a Qwen3-MoE in one file;
  * a moedist checkpoint saved by one process holding every expert.
Each rank must read exactly its experts' tensors (and each once), and end with the values of the
single-process reference's slice.
"""
from __future__ import annotations

import re

import torch

from tests._dist import run_workers

EXPERT = re.compile(r"experts\.(\d+)\.")


class _Spy:
    """A safe_open handle recording the names of the tensors read through it."""

    reads: list = []
    real = None

    def __init__(self, filename, framework="pt", device="cpu"):
        self._h = _Spy.real(filename, framework=framework, device=device)

    def __enter__(self):
        self._h.__enter__()
        return self

    def __exit__(self, *exc):
        return self._h.__exit__(*exc)

    def keys(self):
        return self._h.keys()

    def metadata(self):
        return self._h.metadata()

    def get_tensor(self, name):
        _Spy.reads.append(name)
        return self._h.get_tensor(name)

    def get_slice(self, name):
        _Spy.reads.append(name)
        return self._h.get_slice(name)


def _install_spy():
    import safetensors

    import moedist.checkpoint.io as cio

    if _Spy.real is None:
        _Spy.real = safetensors.safe_open
    safetensors.safe_open = _Spy  # hf_import imports it at call time
    cio.safe_open = _Spy


def _experts_read() -> list:
    return sorted(int(m.group(1)) for n in _Spy.reads if (m := EXPERT.search(n)))


def _worker(rank, world, hf_dirs, ckpt):
    from moedist.checkpoint import load_checkpoint
    from moedist.config import load_config
    from moedist.models import apply_hf_config, build_local_model, load_hf_weights_into

    _install_spy()
    out = {}
    for arch, path in hf_dirs.items():
        cfg = apply_hf_config(load_config(None, [f"model.from_hf={path}", "data.seq_len=16"]))
        model = build_local_model(cfg, rank, world)
        _Spy.reads.clear()
        load_hf_weights_into(model, path)
        out[arch] = (_experts_read(), list(_Spy.reads), {k: v.clone() for k, v in model.state_dict().items()})
    cfg_ovr, path = ckpt
    cfg = load_config(None, cfg_ovr)
    model = build_local_model(cfg, rank, world)
    _Spy.reads.clear()
    load_checkpoint(path, model, verify=False)
    out["ckpt"] = (_experts_read(), list(_Spy.reads), {k: v.clone() for k, v in model.state_dict().items()})
    return out


def test_each_rank_reads_only_its_experts(tmp_path):
    import types

    from moedist.checkpoint import save_checkpoint
    from moedist.config import load_config
    from moedist.models import apply_hf_config, build_model, load_hf_weights_into, moe_layers, parallelize
    from tests.test_hf_import import make_hf

    hf_dirs = {}
    for arch, shard in (("mixtral", "40KB"), ("qwen3_moe", None)):
        hf = make_hf(arch)
        kw = {"max_shard_size": shard} if shard else {}
        hf.save_pretrained(tmp_path / arch, **kw)
        hf_dirs[arch] = str(tmp_path / arch)
    assert (tmp_path / "mixtral" / "model.safetensors.index.json").exists()  # sharded: read through the index

    ovr = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_size=48", "model.num_heads=4",
           "moe.num_experts=8", "model.vocab_size=256", "lora.mode=expert_lora"]
    cfg = load_config(None, ovr)

    def perturbed():  # not the init values: loading must really happen
        m = build_model(cfg)
        with torch.no_grad():
            for i, p in enumerate(m.parameters()):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        return m

    save_checkpoint(tmp_path / "ckpt", perturbed(), step=1)

    results = run_workers(_worker, 2, args=(hf_dirs, (ovr, str(tmp_path / "ckpt"))), timeout=300)

    def hf_ref(arch, rank):  # one process, every expert, sliced afterwards
        hcfg = apply_hf_config(load_config(None, [f"model.from_hf={hf_dirs[arch]}", "data.seq_len=16"]))
        model = load_hf_weights_into(build_model(hcfg), hf_dirs[arch])
        return hcfg, len(moe_layers(model)), parallelize(model, types.SimpleNamespace(size=2, rank=rank)).state_dict()

    for rank, res in enumerate(results):
        for arch in hf_dirs:
            experts, reads, state = res[arch]
            hcfg, layers, ref = hf_ref(arch, rank)  # layers: the MoE ones
            E = hcfg.moe.num_experts
            mine = list(range(rank * E // 2, (rank + 1) * E // 2))
            # 3 tensors (gate, up, down) per local expert per layer, nothing of the other rank's
            assert experts == sorted(mine * 3 * layers), (arch, rank, experts)
            assert len(reads) == len(set(reads)), (arch, rank, "a tensor was read twice")
            for k, v in ref.items():
                assert torch.equal(state[k], v), (arch, rank, k)
        experts, reads, state = res["ckpt"]
        # per expert: w_gate, w_up, w_down and the LoRA A/B of each of the 3 projections, in 2 layers
        assert experts == sorted(list(range(rank * 4, rank * 4 + 4)) * 9 * 2), (rank, experts)
        assert len(reads) == len(set(reads))
        ref = parallelize(perturbed(), types.SimpleNamespace(size=2, rank=rank)).state_dict()
        for k, v in ref.items():
            assert torch.equal(state[k], v), ("ckpt", rank, k)
