"""Smoke test for a launcher: join the group, all-reduce, uneven all-to-all, print one JSON line.

    launch/torchrun.sh  with MOEDIST_ENTRY=tests/scripts/dist_smoke.py NPROC=2
    python tests/scripts/dist_smoke.py            # single process

Every rank prints `{"script": "dist_smoke", "rank": ..., ...}` on one line. The
values sent are a hand formula so the caller can check what arrived:
* all_reduce: rank r contributes r + 1 -> every rank gets W (W + 1) / 2.
* all_to_all_single: rank r sends `split(r, j) = r + 2 j + 1` rows to rank j (uneven,
  different per pair); row i of that block holds `1000 r + 100 j + i`.
Extra arguments (the DeepSpeed launcher appends `--local_rank=N`) are reported, not parsed.
"""
import json
import sys

import torch
import torch.distributed as dist

from moedist.distributed import init_distributed


def split(src: int, dst: int) -> int:
    return src + 2 * dst + 1


def main() -> None:
    env = init_distributed(backend="gloo", timeout_s=60)
    r, w = env.rank, env.world_size

    total = torch.tensor([float(r + 1)])
    dist.all_reduce(total)

    in_splits = [split(r, j) for j in range(w)]
    out_splits = [split(j, r) for j in range(w)]
    send = torch.cat([1000.0 * r + 100.0 * j + torch.arange(split(r, j), dtype=torch.float32) for j in range(w)])
    recv = torch.empty(sum(out_splits))
    dist.all_to_all_single(recv, send, out_splits, in_splits)

    # one write() per line: ranks share the launcher's pipe, and print() may split a line in two
    sys.stdout.write(json.dumps({
        "script": "dist_smoke", "rank": r, "world_size": w, "local_rank": env.local_rank,
        "local_world_size": env.local_world_size, "launcher": env.launcher, "backend": env.backend,
        "master_addr": env.master_addr, "master_port": env.master_port,
        "all_reduce": total.item(), "recv": recv.tolist(), "argv": sys.argv[1:],
    }) + "\n")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
