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
import sys


def _threads(local_world_size: int) -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:  # mpirun/srun do not set it; torchrun sets 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))


def main_train(cfg, args=None) -> int:
    """Entry of `moedist train` (registered in moedist.cli.COMMANDS); returns the exit code."""
    from moedist.train.signals import PreemptionSignals

    # first: a SIGTERM/SIGUSR1/SIGINT during start-up must not kill the job
    with PreemptionSignals(interrupt=True) as signals:
        try:
            return _main_train(cfg, signals, args)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            print(f"moedist: interrupted again: stopped without saving; resume from the last checkpoint with: "
                  f"{resume_command(cfg, args)}", file=sys.stderr, flush=True)
            return 130


def resume_command(cfg, args) -> str:
    """The `moedist train` command line that continues this run (train.resume=auto)."""
    import shlex

    if args is None:  # called from Python: name the run directory
        items = [f"train.output_dir={cfg.train.output_dir}"]
    else:
        items = [args.config] if getattr(args, "config", None) else []
        items += [o for o in getattr(args, "overrides", None) or [] if not o.startswith("train.resume=")]
    return " ".join(["moedist", "train", *map(shlex.quote, items), "train.resume=auto"])


def _main_train(cfg, signals, args=None) -> int:
    from moedist.distributed.launch_env import detect_launch_env

    from moedist.config import ConfigError

    try:
        env = detect_launch_env(os.environ)
    except ValueError as err:  # a bad launcher variable: one line naming it, exit 2
        raise ConfigError(f"launcher environment: {err}") from None
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    from moedist.train.preflight import preflight

    from moedist.checkpoint.outdir import clear_dir, run_dir_conflict

    overwrite = bool(getattr(args, "overwrite", False))
    try:
        data = preflight(cfg, env.world_size)  # ConfigError -> one line, exit 2, nothing written
        conflict = run_dir_conflict(cfg.train.output_dir, cfg.train.resume)
        if conflict is not None and not overwrite:
            raise ConfigError(conflict)
    except ConfigError:
        if env.rank != 0:
            return 2  # every rank finds the same problem: rank 0 alone reports it
        raise
    if conflict is not None and env.rank == 0:  # --overwrite: before the process group, so no rank has written yet
        clear_dir(cfg.train.output_dir)
        print(f"moedist: --overwrite: deleted the previous run in {cfg.train.output_dir}", file=sys.stderr, flush=True)

    import torch.distributed as dist

    from moedist.distributed import init_distributed
    from moedist.distributed.launch_env import collective_errors
    from moedist.train.trainer import Trainer

    env = init_distributed(timeout_s=cfg.parallel.timeout_s)
    _threads(env.local_world_size)
    try:
        with collective_errors(env, cfg.parallel.timeout_s):  # a stalled/dead peer: one line naming it
            result = Trainer(cfg, signals=signals, data=data).train()  # SIGTERM/SIGUSR1: saves and returns normally (exit 0)
        if result.summary.get("interrupted"):  # Ctrl-C: one line, exit 130 (what a shell reports for SIGINT)
            if env.rank == 0:
                ckpt = result.summary.get("checkpoint")
                saved = f"saved checkpoint {ckpt}" if ckpt else "no checkpoint saved"
                print(f"moedist: interrupted at step {result.final_step}/{cfg.train.max_steps}; {saved}; resume "
                      f"with: {resume_command(cfg, args)}", file=sys.stderr, flush=True)
            return 130
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
