"""Imported HF models at EP=2: each rank passes its own batch and gets transformers' logits.

One `run_workers` call (2 gloo processes) checks every architecture through two
paths: `from_hf` then `parallelize`, and the trainer's path (config ->
build_model -> parallelize -> load_hf_weights_into, each rank reading only its
own experts). It also runs an upcycled LoRA-MoE model (non-zero adapters) at
EP=2 against the same model at EP=1. References are computed here, in one process.
"""
import torch

from tests._dist import run_workers
from tests.test_hf_export import perturb
from tests.test_hf_import import ARCHS, hf_logits, make_hf, our_logits

BATCH = {0: (2, 12, 10), 1: (1, 9, 11)}  # rank -> (batch, seq, seed): ranks route different token counts
DATA = {"data": {"seq_len": 16}}


def rank_ids(rank):
    b, s, seed = BATCH[rank]
    return torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(seed))


def upcycled_lora_moe(path):
    from moedist.models import from_hf, upcycle

    model, cfg = from_hf(path, **DATA)
    upcycle(model, "lora_moe", 4, 2, cfg=cfg, lora_rank=4, seed=5)
    perturb(model, seed=3)
    return model


def _worker(rank, world, dirs):
    import torch.distributed as dist

    from moedist.config import load_config
    from moedist.distributed.comm import ExpertParallelComm
    from moedist.models import apply_hf_config, build_model, from_hf, load_hf_weights_into, moe_layers, parallelize

    comm = ExpertParallelComm(dist.group.WORLD)
    ids = rank_ids(rank)
    out = {}
    for arch, path in dirs.items():
        if arch == "upcycled":
            out[arch] = our_logits(parallelize(upcycled_lora_moe(path), comm), ids)
            continue
        model, _ = from_hf(path, **DATA)
        a = our_logits(parallelize(model, comm), ids)
        cfg = apply_hf_config(load_config(None, [f"model.from_hf={path}", "data.seq_len=16"]))
        model = parallelize(build_model(cfg), comm)
        local = [m.experts.num_local for m in moe_layers(model)]
        b = our_logits(load_hf_weights_into(model, path), ids)
        out[arch] = (a, b, local)
    return out


def test_hf_models_at_ep2_match_transformers(tmp_path):
    dirs, refs = {}, {}
    for arch in ARCHS:
        hf = make_hf(arch)
        hf.save_pretrained(tmp_path / arch)
        dirs[arch] = str(tmp_path / arch)
        refs[arch] = [hf_logits(hf, rank_ids(r)) for r in range(2)]
    dirs["upcycled"] = dirs["llama"]
    up = upcycled_lora_moe(dirs["llama"])
    refs["upcycled"] = [our_logits(up, rank_ids(r)) for r in range(2)]   # EP=1 reference
    results = run_workers(_worker, world_size=2, args=(dirs,))
    for rank, res in enumerate(results):
        for arch in ARCHS:
            a, b, local = res[arch]
            assert all(n == 2 for n in local), (arch, local)             # 4 experts, 2 per rank
            torch.testing.assert_close(a, refs[arch][rank], atol=1e-4, rtol=0, msg=f"{arch} rank {rank} from_hf")
            torch.testing.assert_close(b, refs[arch][rank], atol=1e-4, rtol=0, msg=f"{arch} rank {rank} load")
        torch.testing.assert_close(res["upcycled"], refs["upcycled"][rank], atol=1e-4, rtol=0)
