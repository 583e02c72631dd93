"""Learning-rate schedule: linear warm-up, then cosine, linear or constant (pure function)."""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr: float = 0.0,
          schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based: the step about to be taken).

    Warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps. After it,
    progress t = (step - warmup_steps) / (max_steps - warmup_steps) in [0, 1) and
    cosine: min_lr + (lr - min_lr) * (1 + cos(pi t)) / 2;
    linear: lr - (lr - min_lr) * t; constant: lr.
    """
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"train.lr_schedule={schedule!r}: allowed cosine, linear, constant")
    warmup_steps = min(warmup_steps, max_steps)  # more warm-up than steps: clamped (the trainer warns)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    t = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    t = min(max(t, 0.0), 1.0)
    if schedule == "linear":
        return lr - (lr - min_lr) * t
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_from_config(train_cfg, step: int) -> float:
    """`lr_at` with the keys of the `train` config section."""
    return lr_at(step, lr=train_cfg.lr, warmup_steps=train_cfg.warmup_steps, max_steps=train_cfg.max_steps,
                 min_lr=train_cfg.min_lr, schedule=train_cfg.lr_schedule)
