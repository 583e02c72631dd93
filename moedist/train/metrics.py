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
    """What one rank saw in one optimizer step (all its micro-batches).

    `add` only adds tensors on the device (no host sync per micro-batch); `reduce` reads them to
    the host once, at the end of the step, with one all-reduce.
    """

    _HEAD = 7  # lm_sum, loss_tokens, aux_loss, entropy, micro, tokens, a2a_bytes

    def __init__(self, num_moe_layers: int, num_experts: int):
        self.L, self.E = num_moe_layers, num_experts
        self.micro = 0
        self.tokens = 0
        self.a2a_bytes = 0  # host ints already (split sizes the all-to-all read)
        self._dev: Optional[torch.Tensor] = None  # [3 + 2 * L * E] fp64 on the device: lm_sum, loss_tokens, aux, kept, dropped
        self._entropy: Optional[torch.Tensor] = None  # 0-d fp64, mean router entropy over layers, summed over micro-batches

    def add(self, out, num_tokens: int) -> None:
        """Record one micro-batch's `CausalLMOutput` (labels given). Nothing is read to the host."""
        self.micro += 1
        self.tokens += num_tokens
        f64 = torch.float64
        dev = out.lm_loss_sum.device
        parts = [out.lm_loss_sum.detach().to(f64).reshape(1), torch.as_tensor(out.num_loss_tokens, device=dev).to(f64).reshape(1),
                 out.aux_loss.detach().to(f64).reshape(1)]
        for aux in out.moe_aux:
            parts.append(aux.tokens_per_expert.detach().to(dev, f64))
        for aux in out.moe_aux:
            parts.append(aux.dropped_per_expert.detach().to(dev, f64))
        for aux in out.moe_aux:
            self.a2a_bytes += int(aux.a2a_bytes)
            if aux.router_entropy is not None:
                e = aux.router_entropy.detach().to(dev, f64) / max(1, self.L)
                self._entropy = e if self._entropy is None else self._entropy + e
        flat = torch.cat(parts)
        self._dev = flat if self._dev is None else self._dev + flat

    def reduce(self, device=None) -> dict:
        """Global values over all ranks (collective when a process group exists): the one host read of the step."""
        n = self.L * max(1, self.E)
        body = self._dev if self._dev is not None else torch.zeros(3 + 2 * n, dtype=torch.float64)
        ent = self._entropy if self._entropy is not None else body.new_zeros(())
        host = torch.tensor([self.micro, self.tokens, self.a2a_bytes], dtype=torch.float64, device=body.device)
        flat = torch.cat([body[:3], ent.reshape(1).to(body.device), host, body[3:]])
        if dist.is_initialized() and dist.get_world_size() > 1:
            buf = flat.to(device) if device is not None else flat
            dist.all_reduce(buf)
            flat = buf
        flat = flat.cpu()
        lm_sum, loss_tokens, aux, ent, micro, tokens, a2a = flat[:self._HEAD].tolist()
        kept = flat[self._HEAD:self._HEAD + n].view(self.L, max(1, self.E))
        dropped = flat[self._HEAD + n:].view_as(kept)
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
