"""Two small named byte-level domains and a tiny grouped MoE config for the lifelong-learning tests."""
from __future__ import annotations

import copy
import sysconfig
from pathlib import Path

E = 8
GROUPS = {"prose": [0, 1, 2], "code": [4, 5, 6, 7]}   # expert 3 is in no group


def write_domains(folder: Path) -> dict:
    """prose = pydoc topics, code = a stdlib module; 6 KB each (> 16 windows of 32 bytes per split)."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    prose = "".join(topics[k] for k in sorted(topics))[:6000]
    code = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:6000]
    (folder / "prose.txt").write_text(prose)
    (folder / "code.txt").write_text(code)
    return {"prose": str(folder / "prose.txt"), "code": str(folder / "code.txt")}


def base_cfg(paths: dict, cache: str, **moe) -> dict:
    """A grouped 2-layer MoE (E=8, top-2, dropless) over the two domains, 2 steps of 8 sequences."""
    cfg = {
        "name": "lifelong",
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_size": 48,
                  "max_seq_len": 32},
        "moe": {"num_experts": E, "top_k": 2, "capacity_factor": None, "aux_loss_coef": 0.01,
                "expert_groups": copy.deepcopy(GROUPS), **moe},
        "train": {"max_steps": 2, "lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.1, "grad_clip": 1.0,
                  "micro_batch_size": 2, "grad_accum": 4, "seed": 3, "eval_batches": 2, "log_every": 100},
        "data": {"sources": [{"name": n, "path": p, "format": "text"} for n, p in paths.items()],
                 "tokenizer": "bytes", "seq_len": 32, "cache_dir": cache},
    }
    return cfg


def with_world(cfg: dict, world: int, ep: int) -> dict:
    """The same global batch (8 sequences) on `world` ranks at EP `ep`."""
    cfg = copy.deepcopy(cfg)
    cfg["train"]["grad_accum"] = 8 // (world * cfg["train"]["micro_batch_size"])
    cfg["parallel"] = {"ep_size": ep}
    return cfg
