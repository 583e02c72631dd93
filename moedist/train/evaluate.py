"""`moedist eval CONFIG [key=value ...]`: validation loss of a run's latest checkpoint.

    moedist eval configs/tiny.yaml                      # latest checkpoint in train.output_dir
    moedist eval configs/tiny.yaml train.resume=runs/tiny/checkpoints/step_000005 train.eval_batches=16

Run it with the layout the checkpoint was saved with (same launcher, world size,
parallel.ep_size and engine). Prints one JSON line on rank 0:
``{"step": ..., "val_loss": ..., "checkpoint": ...}``; writes nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os

from moedist.config import ConfigError


def main_eval(cfg, args=None) -> int:
    """Entry of `moedist eval` (registered in moedist.cli.COMMANDS)."""
    from moedist.distributed.launch_env import detect_launch_env
    from moedist.train.trainer import preflight

    env = detect_launch_env(os.environ)
    if cfg.train.resume is None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto"))
    preflight(cfg, env.world_size)
    latest = os.path.join(cfg.train.output_dir, "checkpoints", "latest")
    if cfg.train.resume == "auto" and not os.path.exists(latest):
        raise ConfigError(f"train.output_dir={cfg.train.output_dir!r}: no checkpoint found (no {latest}); "
                          "train first or set train.resume=<checkpoint directory>")

    import torch.distributed as dist

    from moedist.distributed import init_distributed
    from moedist.train.trainer import Trainer

    init_distributed()
    try:
        trainer = Trainer(cfg, write_outputs=False, console=False, save_checkpoints=False)
        if not trainer.resume():
            raise ConfigError(f"train.resume={cfg.train.resume!r}: no checkpoint loaded")
        vals = trainer.evaluate_all()
        if trainer.is_main:
            print(json.dumps({"step": trainer.step, **vals, "checkpoint": cfg.train.resume}), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
