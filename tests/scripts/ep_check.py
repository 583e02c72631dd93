"""Expert-parallel equivalence check under a real launcher.

    torchrun --standalone --nproc_per_node 2 tests/scripts/ep_check.py
    mpirun --allow-run-as-root --oversubscribe -n 2 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29511 \
        .venv/bin/python tests/scripts/ep_check.py
    torchrun --nproc_per_node 2 tests/scripts/ep_check.py --backend nccl --device cuda   # 2 GPUs

Joins the job with `moedist.distributed.init_distributed` (rank and size from
torchrun's or Open MPI's variables), builds EP = world size (or --ep) with
`ParallelDims`, trains a few tiny MoE layers for three steps (SGD, Adam, Adam)
with `sync_gradients`, and compares this rank's outputs, losses, gradients,
weights, token/drop counts and all-to-all bytes with a single-process
reference computed right here (tests/ep_helpers.py). Prints
`EP_CHECK_OK rank=<r> ...` and exits 0 when every rank matched; otherwise
prints the mismatches and `EP_CHECK_FAIL rank=<r>` and exits 1.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: moedist and tests

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moedist.distributed import ExpertParallelComm, ParallelDims, init_distributed  # noqa: E402
from tests.ep_helpers import EPConfig, build_layer, compare_rank, run_ep_rank, run_reference  # noqa: E402

CONFIGS = [
    EPConfig("grouped_k2_cf1.0_shared", K=2, cf=1.0, shared=True, seed=1),
    EPConfig("grouped_k1_cf0.5", K=1, cf=0.5, seed=2),
    EPConfig("moelora_k2_dropless", experts="moelora", K=2, cf=None, seed=3),
    EPConfig("loraon_k4_cf1.25", experts="loraon", K=4, cf=1.25, shared=True, shared_gated=True, seed=4),
    EPConfig("odd_ranks_no_tokens_k2_cf1.0", seq=(5, 0), K=2, cf=1.0, seed=5),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=0, help="expert-parallel size (default: the world size)")
    ap.add_argument("--backend", default=None, help="gloo, nccl, ... (default: nccl with CUDA, else gloo)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args, _ = ap.parse_known_args()  # the DeepSpeed launcher appends --local_rank=N
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    env = init_distributed(backend=backend, timeout_s=120)
    rank, world = env.rank, env.world_size
    if world < 2:
        print(f"EP_CHECK_FAIL rank={rank}: world size {world}; launch 2 or more processes", flush=True)
        return 2
    torch.set_num_threads(1)
    device = f"cuda:{env.local_rank}" if args.device == "cuda" else "cpu"
    dims = ParallelDims(world_size=world, ep_size=args.ep or world, rank=rank).build()

    errs, records = [], 0
    for cfg in CONFIGS:
        rec = run_ep_rank(cfg, dims, rank, device=device)
        ref = run_reference(cfg, world, device=device)  # every rank computes the whole reference itself
        errs += [m for _, m in compare_rank(cfg, world, rec, ref, build_layer(cfg, ExpertParallelComm.single(), 0, 1))]
        records += len(rec["steps"])

    failed = torch.tensor([1 if errs else 0], device=device)
    dist.all_reduce(failed)
    # one write per line: ranks share the launcher's pipe
    if errs:
        sys.stdout.write("\n".join(errs[:40]) + f"\nEP_CHECK_FAIL rank={rank} mismatches={len(errs)}\n")
    else:
        sys.stdout.write(f"EP_CHECK_OK rank={rank} world={world} ep={dims.ep_size} launcher={env.launcher} "
                         f"backend={env.backend} device={device} configs={len(CONFIGS)} steps={records}\n")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
    return 1 if int(failed.item()) else 0


if __name__ == "__main__":
    sys.exit(main())
