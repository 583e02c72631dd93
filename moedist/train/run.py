"""`moedist train CONFIG [key=value ...]`: the process-level wrapper around `Trainer`.

    moedist train configs/tiny.yaml                                   # one process
    torchrun --standalone --nproc_per_node 2 -m moedist train configs/tiny.yaml parallel.ep_size=2
    launch/deepspeed.sh train configs/tiny.yaml deepspeed.enabled=true deepspeed.zero_stage=2

Order matters for "a bad config writes nothing": the world size comes from
the launcher's environment (no process group yet), `preflight` checks
everything that depends on it, and only then the process group is joined and
the output directory created.
"""
from __future__ import annotations

import os


def _threads(local_world_size: int) -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:  # mpirun/srun do not set it; torchrun sets 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))


def main_train(cfg, args=None) -> int:
    """Entry of `moedist train` (registered in moedist.cli.COMMANDS); returns the exit code."""
    from moedist.train.signals import PreemptionSignals

    with PreemptionSignals() as signals:  # first: a SIGTERM/SIGUSR1 during start-up must not kill the job
        return _main_train(cfg, signals)


def _main_train(cfg, signals) -> int:
    from moedist.distributed.launch_env import detect_launch_env

    from moedist.config import ConfigError

    try:
        env = detect_launch_env(os.environ)
    except ValueError as err:  # a bad launcher variable: one line naming it, exit 2
        raise ConfigError(f"launcher environment: {err}") from None
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    from moedist.train.trainer import preflight

    try:
        preflight(cfg, env.world_size)  # ConfigError -> one line, exit 2, nothing written
    except ConfigError:
        if env.rank != 0:
            return 2  # every rank finds the same problem: rank 0 alone reports it
        raise

    import torch.distributed as dist

    from moedist.distributed import init_distributed
    from moedist.distributed.launch_env import collective_errors
    from moedist.train.trainer import Trainer

    env = init_distributed(timeout_s=cfg.parallel.timeout_s)
    _threads(env.local_world_size)
    try:
        with collective_errors(env, cfg.parallel.timeout_s):  # a stalled/dead peer: one line naming it
            Trainer(cfg, signals=signals).train()  # SIGTERM/SIGUSR1: saves and returns normally (exit 0)
    except ConfigError:
        if env.rank != 0:
            return 2  # corrupt checkpoint, config mismatch, non-finite stop: every rank raises, rank 0 reports
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
