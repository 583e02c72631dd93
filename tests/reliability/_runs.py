"""Helpers for the reliability tests: small configs, real `moedist train` processes, run comparison."""
from __future__ import annotations

import copy
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]

# Every random stream on: LoRA dropout on the experts, noisy gating and jitter in the router.
RANDOM = {
    "name": "rel",
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "ffn_size": 48,
              "max_seq_len": 32},
    "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 1.25, "noisy_gating": True, "jitter_eps": 0.1},
    "lora": {"mode": "expert_lora", "rank": 4, "dropout": 0.2},
    "train": {"max_steps": 4, "lr": 3e-3, "warmup_steps": 1, "micro_batch_size": 2, "seed": 5,
              "log_every": 1, "eval_batches": 1, "plot": False},
    "data": {"source": "pydoc", "seq_len": 32},
}


def cfg_dict(out: Path, **sections) -> dict:
    d = copy.deepcopy(RANDOM)
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    d["train"]["output_dir"] = str(out)
    d["data"]["cache_dir"] = str(out.parent / "cache")
    return d


def overrides(d: dict) -> list:
    """A config dict as `key=value` CLI overrides (JSON values are YAML)."""
    return [f"{s}.{k}={json.dumps(v)}" for s, vals in d.items() if isinstance(vals, dict)
            for k, v in vals.items()] + [f"name={d['name']}"]


def train_in_process(d: dict):
    """Train `d` in this process (inside a worker's process group, or a 1-rank gloo group made here)."""
    import torch.distributed as dist

    from moedist.config import config_from_dict
    from moedist.train.trainer import Trainer

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return Trainer(config_from_dict(d), console=False).train()
    finally:
        if own:
            dist.destroy_process_group()


def losses(run_dir: Path) -> list:
    """(step, loss, grad_norm) of every metrics.jsonl line."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in lines]


def weights(ckpt: Path) -> dict:
    out = {}
    for f in sorted(Path(ckpt).glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical: every metrics line (loss, grad norm) and every final weight."""
    la, lb = losses(a), losses(b)
    assert la == lb, f"losses differ:\n{la}\n{lb}"
    wa, wb = weights(Path(a) / "final"), weights(Path(b) / "final")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"final weight {k} differs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list, rank: int = 0, world: int = 1, port: int = 0, env: dict | None = None) -> subprocess.Popen:
    """`python -m moedist <args>` as rank `rank` of `world` (env-var launch, no torchrun agent)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_", "TORCHELASTIC_"))}
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", COLUMNS="200")
    if world > 1:
        e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "moedist", *args], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    seen = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=1.0):
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no {needle!r} within {timeout}s; output:\n{''.join(seen)[-3000:]}")


def finish(proc: subprocess.Popen, head: str = "", timeout: float = 180) -> tuple:
    try:
        tail, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        tail, _ = proc.communicate()
        raise AssertionError(f"still running after {timeout}s:\n{(head + tail)[-3000:]}")
    return proc.returncode, head + tail
