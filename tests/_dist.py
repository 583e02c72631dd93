"""Run a function in N real gloo processes on CPU and collect what each returns.

    results = run_workers(my_fn, world_size=2, args=(cfg,))   # list, index = rank

`my_fn(rank, world_size, *args)` must be a module-level (picklable) function;
the process group is initialised before it runs and destroyed after. Any
exception in a worker is re-raised here with its traceback text.
"""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # plain pickle copies tensor data; the multiprocessing pickler would pass
        # shared-memory handles that vanish when this worker exits first
        queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world_size: int, args: tuple = (), timeout: float = 300.0) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        if not queue.empty():
            rank, status, payload = queue.get()
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
            continue
        dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
        if dead and queue.empty():
            errors.append(f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]}) without a result")
        elif time.monotonic() > deadline:
            errors.append(f"timed out after {timeout:.0f} s (a rank is stuck, e.g. in a collective)")
        else:
            time.sleep(0.02)
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
