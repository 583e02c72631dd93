"""Per-step training metrics: accumulate on each rank, reduce once, write JSON lines.

One line of ``metrics.jsonl`` per optimizer step (rank 0 writes):

    step, loss, lm_loss, aux_loss, lr, grad_norm, tokens, loss_tokens, tokens_per_s, step_time_s,
    dropped_frac, expert_load [layers][E], router_entropy, a2a_bytes, (val_loss, val_loss_<source>)

All values are global: lm_loss is the mean cross-entropy over every counted
token of the global batch (labels masked out of the loss, e.g. prompts and
padding, are excluded), aux_loss the mean over micro-batches, loss their sum;
tokens (input tokens), loss_tokens (counted ones) and per-expert counts are
sums over ranks. ``expert_load[l][e]`` is the share
of layer l's kept (token, slot) pairs that went to expert e (sums to 1).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch
import torch.distributed as dist


class StepStats:
    """What one rank saw in one optimizer step (all its micro-batches)."""

    def __init__(self, num_moe_layers: int, num_experts: int):
        self.L, self.E = num_moe_layers, num_experts
        self.lm_sum = self.aux_loss = self.entropy = 0.0  # lm_sum: cross-entropy summed over counted tokens
        self.micro = 0
        self.tokens = 0
        self.loss_tokens = 0
        self.a2a_bytes = 0
        self.kept = torch.zeros(num_moe_layers, max(1, num_experts), dtype=torch.float64)  # [L, E]
        self.dropped = torch.zeros_like(self.kept)  # [L, E]

    def add(self, out, num_tokens: int) -> None:
        """Record one micro-batch's `CausalLMOutput` (labels given)."""
        self.lm_sum += float(out.lm_loss_sum.detach())
        self.aux_loss += float(out.aux_loss.detach())
        self.micro += 1
        self.tokens += num_tokens
        self.loss_tokens += int(out.num_loss_tokens)
        for l, aux in enumerate(out.moe_aux):
            self.kept[l] += aux.tokens_per_expert.detach().to("cpu", torch.float64)
            self.dropped[l] += aux.dropped_per_expert.detach().to("cpu", torch.float64)
            self.entropy += aux.router_entropy / max(1, self.L)
            self.a2a_bytes += int(aux.a2a_bytes)

    def reduce(self, device=None) -> dict:
        """Global values over all ranks (collective when a process group exists)."""
        head = torch.tensor([self.lm_sum, self.loss_tokens, self.aux_loss, self.entropy, self.micro, self.tokens,
                             self.a2a_bytes], dtype=torch.float64)
        flat = torch.cat([head, self.kept.reshape(-1), self.dropped.reshape(-1)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            buf = flat.to(device) if device is not None else flat
            dist.all_reduce(buf)
            flat = buf.cpu()
        lm_sum, loss_tokens, aux, ent, micro, tokens, a2a = flat[:7].tolist()
        n = self.kept.numel()
        kept = flat[7:7 + n].view_as(self.kept)
        dropped = flat[7 + n:].view_as(self.dropped)
        routed = float(kept.sum() + dropped.sum())
        load = (kept / kept.sum(1, keepdim=True).clamp_min(1)).tolist() if self.L else []
        micro = max(1.0, micro)
        lm = lm_sum / max(1.0, loss_tokens)  # token-weighted over the global batch (masked tokens excluded)
        return dict(loss=lm + aux / micro, lm_loss=lm, aux_loss=aux / micro, router_entropy=ent / micro,
                    tokens=int(tokens), loss_tokens=int(loss_tokens), a2a_bytes=int(a2a),
                    dropped_frac=float(dropped.sum()) / routed if routed else 0.0,
                    expert_load=[[round(x, 6) for x in row] for row in load],
                    expert_tokens=kept.long().tolist() if self.L else [])


class MetricsWriter:
    """Append-only ``metrics.jsonl`` (+ optional TensorBoard) on the main rank; no-op elsewhere."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = False, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.records: List[dict] = []
        self._fh = None
        self._tb = None
        if not enabled:
            return
        kept = []
        if resume_step > 0 and os.path.exists(self.path):  # keep the lines of the steps already done
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        self.records = kept
        self._fh = open(self.path, "w", encoding="utf-8")
        for r in kept:
            self._fh.write(json.dumps(r) + "\n")
        self._fh.flush()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)
            for l, row in enumerate(record.get("expert_load", [])):
                for e, share in enumerate(row):
                    self._tb.add_scalar(f"expert_load/layer{l}/expert{e}", share, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str) -> List[dict]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def mean(values: List[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
