"""What every rank must agree on: the resolved config and model structure (checked once, at start),
and per-step flags (preemption, non-finite values) decided together so all ranks act alike.

    check_same_config(cfg, model, device)        # ConfigError on every rank if any rank differs
    flags = agree_flags([preempt, bad], device)  # MAX over ranks: True if any rank set it
"""
from __future__ import annotations

import hashlib
import json
from typing import List

import torch
import torch.distributed as dist

from moedist.config import ConfigError, config_to_dict


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def config_fingerprint(cfg, model: torch.nn.Module) -> str:
    """JSON of the resolved config and the model's parameter names and shapes (built, not yet parallel)."""
    conf = config_to_dict(cfg)
    structure = [[n, list(p.shape)] for n, p in model.named_parameters()]
    return json.dumps({"config": conf, "params": structure}, sort_keys=True, default=str)


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    """The first dotted key whose value differs between two nested mappings ('' if none)."""
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            inner = _first_difference(va, vb, f"{prefix}{key}.")
            if inner:
                return inner
        elif va != vb:
            return f"{prefix}{key}: {json.dumps(va, default=str)} vs {json.dumps(vb, default=str)}"
    return ""


def _broadcast_text(text: str, src: int, device: torch.device) -> str:
    """Rank `src`'s text on every rank (length first, then UTF-8 bytes as uint8; no pickle)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8) if dist.get_rank() == src else None
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(n, src)
    buf = data.to(device) if data is not None else torch.empty(int(n), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src)
    return bytes(buf.cpu().tolist()).decode()


def check_same_config(cfg, model: torch.nn.Module, device: torch.device) -> None:
    """Every rank compares a SHA-256 of `config_fingerprint`; on a mismatch every rank raises the
    same one-line ConfigError naming the first rank that differs from rank 0 and the first key."""
    world = _world()
    if world == 1:
        return
    text = config_fingerprint(cfg, model)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")  # fits int64
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    hashes = [int(t) for t in every]
    odd = next((r for r, h in enumerate(hashes) if h != hashes[0]), None)
    if odd is None:
        return
    ref, other = json.loads(_broadcast_text(text, 0, device)), json.loads(_broadcast_text(text, odd, device))
    what = _first_difference(ref["config"], other["config"])
    if not what and ref["params"] != other["params"]:
        what = "model structure (parameter names or shapes)"
    raise ConfigError(f"config mismatch: rank {odd}'s resolved config differs from rank 0's ({what or 'unknown'}); "
                      "every rank must be launched with the same config and overrides")


def agree_flags(flags: List[bool], device: torch.device) -> List[bool]:
    """Each flag OR-ed over all ranks (one small MAX all-reduce; collective)."""
    if _world() == 1:
        return [bool(f) for f in flags]
    buf = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return [bool(v) for v in buf.cpu().tolist()]
