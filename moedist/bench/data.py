"""`moedist bench data`: training memory (RSS) and data-loading time as the prepared corpus grows.

    moedist bench data --sizes 1,10 --steps 200 --json benchmarks/data.json --plot benchmarks/data.png

For every size multiplier m it

1. writes a JSONL corpus of about ``m * --base-tokens`` tokens of real text: documents
   made of random paragraphs of ``pydoc_data.topics`` and the standard library's ``.py``
   sources (seeded; the smaller corpus is a prefix of the larger one);
2. prepares it with the real cache path (``build_data``: tokenize, memory-mapped shards)
   in a subprocess that reports its own peak RSS;
3. trains the same small model on it for ``--steps`` steps with the real ``Trainer``
   in a fresh subprocess (``python -m moedist.bench.data --worker train CONFIG OUT``), so
   each size's RSS is its own. The worker wraps ``trainer.data.train_micro`` with a timer
   that also records the process RSS at the start of every step (= after the previous
   one), and a thread samples RSS every 10 ms for the peak. The trainer is not changed.

RSS is read from ``/proc/self/status`` (VmRSS = RssAnon + RssFile + RssShmem) and split
into anonymous memory (heap: model, optimizer, index arrays) and file-backed pages
(the memory-mapped token shards that were touched, plus shared libraries). Without
``/proc`` psutil's ``rss`` is used and the split is absent.

Targets: **rss_flat**: peak training RSS at the largest corpus <= 1.10x that at the
smallest; **data_share_below_5pct**: the time inside ``train_micro`` < 5 % of the
step time (``step_time_s`` of the trainer's records, which includes it) at every size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

RSS_FLAT_LIMIT = 1.10       # peak RSS at the largest corpus / at the smallest
DATA_SHARE_LIMIT = 0.05     # train_micro time / step time
SAMPLE_S = 0.01             # RSS sampling period of the worker's thread
STDLIB_READ_MAX = 24 << 20  # bytes of stdlib sources read into the paragraph pool

# The model trained at every size: configs/tiny.yaml (2 MoE layers, 8 experts top-2) at H=128, S=128.
BASE_CONFIG = {
    "name": "bench-data",
    "model": dict(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, ffn_size=256,
                  max_seq_len=128, moe_every=1, dtype="float32"),
    "moe": dict(num_experts=8, top_k=2, capacity_factor=1.25),
    "train": dict(lr=1.0e-3, warmup_steps=1, micro_batch_size=8, grad_accum=1, seed=1234, log_every=10,
                  eval_every=0, eval_batches=2, save_every=0, plot=False),
    "data": dict(seq_len=128, val_fraction=0.01, seed=0, pack=True),
}


# ------------------------------------------------------------------ RSS

def read_rss_mb() -> Dict[str, float]:
    """{"rss", "anon", "file"} of this process in MiB ("anon"/"file" only where /proc has them)."""
    try:
        out = {}
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0]) / 1024.0      # kB
        return {"rss": out["VmRSS"], "anon": out.get("RssAnon"), "file": out.get("RssFile"), "hwm": out.get("VmHWM")}
    except (OSError, KeyError, ValueError):
        import psutil

        return {"rss": psutil.Process().memory_info().rss / 2**20, "anon": None, "file": None, "hwm": None}


def smaps_rss_mb() -> Dict[str, float]:
    """RSS of every mapped file (and [heap], [anon]) of this process in MiB, from /proc/self/smaps ({} without)."""
    out: Dict[str, float] = {}
    name = "[anon]"
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                head = line.split(None, 5)
                if len(head) >= 5 and "-" in head[0] and ":" in head[3]:       # a mapping's header line
                    name = head[5].strip() if len(head) > 5 and head[5].strip() else "[anon]"
                elif head and head[0] == "Rss:":
                    out[name] = out.get(name, 0.0) + int(head[1]) / 1024.0
    except OSError:
        return {}
    return out


def _top_growth(before: Dict[str, float], after: Dict[str, float], n: int = 8) -> List[list]:
    """The n mappings whose RSS grew most: [[name, MiB before, MiB after], ...]."""
    grown = sorted(after, key=lambda k: after[k] - before.get(k, 0.0), reverse=True)[:n]
    return [[k, round(before.get(k, 0.0), 2), round(after[k], 2)] for k in grown if after[k] > before.get(k, 0.0)]


class RssSampler:
    """A daemon thread that records the RSS every `period` seconds between start() and stop()."""

    def __init__(self, period: float = SAMPLE_S):
        self.period = period
        self.samples: List[Dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            s = read_rss_mb()
            s["t"] = time.perf_counter() - self._t0
            self.samples.append(s)
            self._stop.wait(self.period)

    def start(self) -> "RssSampler":
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, key: str = "rss") -> Optional[float]:
        vals = [s[key] for s in self.samples if s.get(key) is not None]
        return max(vals) if vals else None


# ------------------------------------------------------------------ corpus

def paragraph_pool(min_chars: int = 40) -> List[str]:
    """Paragraphs of real text that ships with Python: pydoc topics (prose) and stdlib sources (code)."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    root, read = sysconfig.get_paths()["stdlib"], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py") and read < STDLIB_READ_MAX:
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                        texts.append(fh.read())
                except (OSError, UnicodeDecodeError):
                    continue
                read += len(texts[-1])
    return [p for t in texts for p in t.split("\n\n") if len(p.strip()) >= min_chars]


def write_corpus(path: str, target_bytes: int, pool: Sequence[str], seed: int = 0) -> Dict[str, int]:
    """A JSONL file of documents {"text": ...}, each 1-12 random paragraphs, until the texts hold
    `target_bytes` UTF-8 bytes (= tokens with the byte tokenizer). Same seed: a smaller target gives a
    prefix of a larger one."""
    rng = random.Random(seed)
    docs = text_bytes = 0
    with open(path, "w", encoding="utf-8") as fh:
        while text_bytes < target_bytes:
            text = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(1, 12)))
            fh.write(json.dumps({"text": text}) + "\n")
            docs += 1
            text_bytes += len(text.encode("utf-8"))
    return {"documents": docs, "text_bytes": text_bytes, "file_bytes": os.path.getsize(path)}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ------------------------------------------------------------------ workers (subprocesses)

def _load_cfg(path: str):
    from moedist.config import load_config

    return load_config(path)


def worker_prepare(config_path: str) -> dict:
    """Tokenize the config's sources into the cache (the real `build_data` path); its peak RSS."""
    from moedist.data.dataset import build_data

    cfg = _load_cfg(config_path)
    sampler = RssSampler().start()
    t0 = time.perf_counter()
    data = build_data(cfg)
    dt = time.perf_counter() - t0
    sampler.stop()
    paths = list(data.cache_paths.values())
    return {"prepare_s": dt, "prepare_rss_peak_mb": read_rss_mb()["hwm"], "cache_paths": paths,
            "prepare_rss_anon_peak_mb": sampler.peak("anon"), "prepare_rss_file_peak_mb": sampler.peak("file"),
            "corpus_tokens": sum(s["tokens"] for s in data.stats.values()),
            "corpus_documents": sum(s["documents"] for s in data.stats.values()),
            "train_sequences": data.num_train, "corpus_bytes_on_disk": sum(_dir_bytes(p) for p in paths)}


def worker_train(config_path: str, threads: int) -> dict:
    """Train with the real Trainer; time every `train_micro` call and record the RSS at each step."""
    import torch
    import torch.distributed as dist

    from moedist.distributed import init_distributed
    from moedist.train.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    cfg = _load_cfg(config_path)
    init_distributed(timeout_s=cfg.parallel.timeout_s)      # as `moedist train`: a world-size-1 group
    try:
        return _train_measured(cfg, Trainer)
    finally:
        dist.destroy_process_group()


def _train_measured(cfg, trainer_cls) -> dict:
    import torch

    rss_start = read_rss_mb()
    trainer = trainer_cls(cfg, console=False, save_checkpoints=False)
    rss_built, maps_built = read_rss_mb(), smaps_rss_mb()
    calls: List[dict] = []
    inner = trainer.data.train_micro

    def timed_train_micro(position: int, count: int):
        rss = read_rss_mb()                                  # before this step's data: after the previous step
        t0 = time.perf_counter()
        batch = inner(position, count)
        calls.append({"position": position, "count": count, "s": time.perf_counter() - t0, "rss": rss["rss"],
                      "anon": rss["anon"], "file": rss["file"]})
        return batch

    trainer.data.train_micro = timed_train_micro            # an instance attribute: the trainer is unchanged
    sampler = RssSampler().start()
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    sampler.stop()
    rss_end, maps_end = read_rss_mb(), smaps_rss_mb()
    steps = result.records
    shards = [p for p in maps_end if p.startswith(os.path.abspath(os.path.expanduser(cfg.data.cache_dir)))]
    return {"calls": calls, "step_time_s": [r["step_time_s"] for r in steps],
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"], "val_loss": result.val_loss,
            "train_wall_s": wall, "rss_start": rss_start, "rss_built": rss_built, "rss_end": rss_end,
            "rss_peak_mb": sampler.peak("rss"), "rss_anon_peak_mb": sampler.peak("anon"),
            "rss_file_peak_mb": sampler.peak("file"), "samples": len(sampler.samples),
            "torch_threads": torch.get_num_threads(),
            "rss_growth_by_mapping": _top_growth(maps_built, maps_end),    # from Trainer built to end of train()
            "rss_shards_mb": sum(maps_end[p] for p in shards)}


def _run_worker(what: str, config_path: str, out_path: str, threads: int, log: Callable[[str], None]) -> dict:
    cmd = [sys.executable, "-m", "moedist.bench.data", "--worker", what, config_path, out_path,
           "--threads", str(threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench data worker {what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    with open(out_path, encoding="utf-8") as fh:
        return json.load(fh)


# ------------------------------------------------------------------ the benchmark

def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def summarize_size(mult: int, corpus: dict, prep: dict, tr: dict) -> dict:
    """One row of the JSON from the workers' raw records."""
    calls = tr["calls"]
    rss = [c["rss"] for c in calls] + [tr["rss_end"]["rss"]]     # rss[i]: after step i (rss[0]: before step 1)
    anon = [c["anon"] for c in calls] + [tr["rss_end"]["anon"]]
    file_ = [c["file"] for c in calls] + [tr["rss_end"]["file"]]
    after1 = rss[1] if len(rss) > 1 else rss[0]
    half = rss[len(rss) // 2:]
    data_s, step_s = sum(c["s"] for c in calls), sum(tr["step_time_s"])
    return {
        "size": mult, "corpus_tokens": prep["corpus_tokens"], "corpus_documents": prep["corpus_documents"],
        "corpus_jsonl_bytes": corpus["file_bytes"], "corpus_bytes_on_disk": prep["corpus_bytes_on_disk"],
        "train_sequences": prep["train_sequences"], "prepare_s": prep["prepare_s"],
        "prepare_rss_peak_mb": prep["prepare_rss_peak_mb"], "prepare_rss_anon_peak_mb": prep["prepare_rss_anon_peak_mb"],
        "prepare_rss_file_peak_mb": prep["prepare_rss_file_peak_mb"],
        "steps": len(tr["step_time_s"]), "sequences_read": sum(c["count"] for c in calls),
        "rss_before_train_mb": tr["rss_built"]["rss"], "rss_peak_mb": tr["rss_peak_mb"],
        "rss_after_first_step_mb": after1, "rss_last_step_mb": rss[-1], "rss_steady_mb": _median(half),
        "rss_growth_mb": rss[-1] - after1,
        "rss_anon_peak_mb": tr["rss_anon_peak_mb"], "rss_file_peak_mb": tr["rss_file_peak_mb"],
        "rss_anon_growth_mb": None if anon[1] is None else anon[-1] - anon[1],
        "rss_file_growth_mb": None if file_[1] is None else file_[-1] - file_[1],
        "data_time_s": data_s, "step_time_s": step_s, "data_share": data_s / step_s if step_s > 0 else None,
        "data_ms_per_step_median": 1e3 * _median([c["s"] for c in calls]),
        "data_ms_per_step_max": 1e3 * max(c["s"] for c in calls),
        "step_ms_median": 1e3 * _median(tr["step_time_s"]),
        "loss_first": tr["loss_first"], "loss_last": tr["loss_last"], "val_loss": tr["val_loss"],
        "train_wall_s": tr["train_wall_s"], "rss_samples": tr["samples"], "rss_shards_end_mb": tr["rss_shards_mb"],
        "rss_growth_by_mapping": tr["rss_growth_by_mapping"],
        "series": {"rss_mb": rss, "rss_anon_mb": anon, "rss_file_mb": file_,
                   "data_ms": [1e3 * c["s"] for c in calls], "step_ms": [1e3 * s for s in tr["step_time_s"]]},
    }


def run_data_bench(sizes: Sequence[int], steps: int, base_tokens: int, workdir: Optional[str] = None,
                   overrides: Sequence[str] = (), tokenizer: str = "bytes", threads: int = 1, seed: int = 0,
                   keep: bool = False, log: Callable[[str], None] = lambda s: None) -> dict:
    """Build, prepare and train on every corpus size; returns the JSON-ready dict (see the module docstring)."""
    from moedist.config import _set_dotted, config_from_dict, config_to_dict, save_config

    if not sizes or min(sizes) < 1 or steps < 2 or base_tokens < 1:
        raise ValueError(f"--sizes={list(sizes)} must be >= 1, --steps={steps} >= 2, --base-tokens={base_tokens} >= 1")
    sizes = sorted(set(sizes))
    own = workdir is None
    root = tempfile.mkdtemp(prefix="moedist-bench-data-") if own else os.path.abspath(workdir)
    os.makedirs(root, exist_ok=True)
    try:
        pool = paragraph_pool()
        log(f"{len(pool)} paragraphs in the pool; work dir {root}")
        rows, trained = [], None
        for m in sizes:
            raw = json.loads(json.dumps(BASE_CONFIG))
            d = os.path.join(root, f"x{m}")
            os.makedirs(d, exist_ok=True)
            corpus_path = os.path.join(d, "corpus.jsonl")
            t0 = time.perf_counter()
            corpus = write_corpus(corpus_path, m * base_tokens, pool, seed)
            log(f"x{m}: corpus {corpus['text_bytes'] / 1e6:.1f} MB of text, {corpus['documents']} documents "
                f"({time.perf_counter() - t0:.1f} s)")
            raw["data"].update(tokenizer=tokenizer, cache_dir=os.path.join(root, "cache"),
                               sources=[{"name": "corpus", "path": corpus_path, "format": "jsonl"}])
            raw["train"].update(max_steps=steps, output_dir=os.path.join(d, "run"))
            if tokenizer != "bytes":
                from moedist.data.tokenizer import load_tokenizer

                raw["model"]["vocab_size"] = load_tokenizer(tokenizer).vocab_size
            for item in overrides:
                _set_dotted(raw, item)
            cfg_path = os.path.join(d, "config.yaml")
            cfg = config_from_dict(raw)
            save_config(cfg, cfg_path)
            trained = trained or config_to_dict(cfg)
            prep = _run_worker("prepare", cfg_path, os.path.join(d, "prepare.json"), threads, log)
            log(f"x{m}: prepared {prep['corpus_tokens']:,} tokens, {prep['corpus_bytes_on_disk'] / 2**20:.1f} MiB "
                f"on disk in {prep['prepare_s']:.1f} s (peak RSS {prep['prepare_rss_peak_mb']:.0f} MiB)")
            tr = _run_worker("train", cfg_path, os.path.join(d, "train.json"), threads, log)
            row = summarize_size(m, corpus, prep, tr)
            rows.append(row)
            log(f"x{m}: {row['steps']} steps, RSS peak {row['rss_peak_mb']:.0f} MiB (after step 1 "
                f"{row['rss_after_first_step_mb']:.0f}, growth {row['rss_growth_mb']:+.1f}), data "
                f"{100 * row['data_share']:.2f} % of step time")
        lo, hi = rows[0], rows[-1]
        ratio = hi["rss_peak_mb"] / lo["rss_peak_mb"]
        anon_ratio = (hi["rss_anon_peak_mb"] / lo["rss_anon_peak_mb"]) if lo["rss_anon_peak_mb"] else None
        env = _environment(threads)
        return {
            "bench": "data",
            "config": {"sizes": list(sizes), "steps": steps, "base_tokens": base_tokens, "tokenizer": tokenizer,
                       "threads": threads, "seed": seed, "overrides": list(overrides),
                       "micro_batch_size": trained["train"]["micro_batch_size"],
                       "seq_len": trained["data"]["seq_len"], "rss_flat_limit": RSS_FLAT_LIMIT,
                       "data_share_limit": DATA_SHARE_LIMIT,
                       "trained": {k: trained[k] for k in ("model", "moe", "train", "data")}},
            "sizes": rows,
            "rss_ratio_10x": ratio, "rss_anon_ratio_10x": anon_ratio,
            "corpus_ratio": hi["corpus_tokens"] / lo["corpus_tokens"],
            "targets": {"rss_flat": ratio <= RSS_FLAT_LIMIT,
                        "data_share_below_5pct": all(r["data_share"] < DATA_SHARE_LIMIT for r in rows)},
            "environment": env,
        }
    finally:
        if own and not keep:
            shutil.rmtree(root, ignore_errors=True)


def _environment(threads: int) -> dict:
    """What `bench layer` records, without importing the peer libraries (DeepSpeed takes seconds to import)."""
    import datetime
    import platform

    import numpy
    import torch

    env = dict(torch=torch.__version__, numpy=numpy.__version__, python=platform.python_version(),
               platform=platform.platform(), cpu_count=os.cpu_count(), torch_threads=threads, device="cpu",
               date=datetime.date.today().isoformat())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
        with open("/proc/meminfo", encoding="ascii") as fh:
            env["mem_total_mb"] = int(fh.readline().split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        env["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return env


# ------------------------------------------------------------------ output

def _f(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(res: dict) -> str:
    """The table RESULTS.md shows."""
    cols = ["corpus", "tokens", "on disk MiB", "prepare s (peak RSS MiB)", "RSS after step 1 MiB",
            "RSS peak MiB (anon / file)", "growth MiB (anon / file)", "shard pages mapped MiB", "data ms/step",
            "step ms", "data share"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in res["sizes"]:
        ag, fg = r["rss_anon_growth_mb"], r["rss_file_growth_mb"]
        split = "" if ag is None else f" ({ag:+.1f} / {fg:+.1f})"
        lines.append(f"| {r['size']}x | {r['corpus_tokens']:,} | {r['corpus_bytes_on_disk'] / 2**20:.1f} | "
                     f"{r['prepare_s']:.1f} ({r['prepare_rss_peak_mb']:.0f}) | {r['rss_after_first_step_mb']:.1f} | "
                     f"{r['rss_peak_mb']:.1f} ({_f(r['rss_anon_peak_mb'])} / {_f(r['rss_file_peak_mb'])}) | "
                     f"{r['rss_growth_mb']:+.1f}{split} | {r['rss_shards_end_mb']:.1f} | "
                     f"{r['data_ms_per_step_median']:.2f} | {r['step_ms_median']:.1f} | "
                     f"{100 * r['data_share']:.2f} % |")
    t = res["targets"]
    anon = res.get("rss_anon_ratio_10x")
    lines += ["", f"anonymous RSS peak ratio: {_f(anon, '.3f')}", f"RSS peak ratio, {res['sizes'][-1]['size']}x / {res['sizes'][0]['size']}x corpus: "
                  f"{res['rss_ratio_10x']:.3f} (limit {RSS_FLAT_LIMIT}) -> {'met' if t['rss_flat'] else 'MISSED'}; "
              f"data share < {100 * DATA_SHARE_LIMIT:.0f} % -> {'met' if t['data_share_below_5pct'] else 'MISSED'}"]
    return "\n".join(lines)


def plot_data(res: dict, path: str) -> str:
    """RSS after every step (total solid, anonymous dashed, file-backed dotted) and data time per step."""
    from moedist.bench.plot import _pyplot

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in res["sizes"]:
        s = r["series"]
        line, = ax1.plot(range(len(s["rss_mb"])), s["rss_mb"], label=f"{r['size']}x ({r['corpus_tokens'] / 1e6:.1f}M tok) RSS")
        if s["rss_anon_mb"][0] is not None:
            ax1.plot(range(len(s["rss_anon_mb"])), s["rss_anon_mb"], "--", color=line.get_color(),
                     label=f"{r['size']}x anonymous")
            ax1.plot(range(len(s["rss_file_mb"])), s["rss_file_mb"], ":", color=line.get_color(),
                     label=f"{r['size']}x file-backed")
        ax2.plot(range(1, len(s["data_ms"]) + 1), s["data_ms"], color=line.get_color(), label=f"{r['size']}x data")
        ax2.plot(range(1, len(s["step_ms"]) + 1), s["step_ms"], ":", color=line.get_color(), label=f"{r['size']}x step")
    ax1.set(xlabel="step", ylabel="MiB", title="process RSS after each training step")
    ax1.set_ylim(bottom=0)
    ax2.set(xlabel="step", ylabel="ms", yscale="log", title="train_micro time vs step time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `moedist bench data` (cli.py registers the subcommand)."""
    p.add_argument("--sizes", default="1,10", help="corpus size multipliers of --base-tokens, comma list")
    p.add_argument("--steps", type=int, default=200, help="training steps per size")
    p.add_argument("--base-tokens", type=int, default=2_000_000,
                   help="tokens of the 1x corpus (UTF-8 bytes of text; = tokens with the byte tokenizer)")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or a Hugging Face tokenizer directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override of the trained config, repeatable")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training worker")
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument("--workdir", help="where corpora, caches and runs go (default: a temp dir, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the temp work dir")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH", help="PNG: RSS and data time per step")


def run_data_from_args(args) -> dict:
    log = lambda s: print(f"[bench data] {s}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        sizes = [int(v) for v in str(args.sizes).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sizes={args.sizes!r}: expected comma-separated integers") from None
    res = run_data_bench(sizes, args.steps, args.base_tokens, workdir=args.workdir, overrides=args.set or [],
                         tokenizer=args.tokenizer, threads=args.threads, seed=args.seed, keep=args.keep, log=log)
    print(markdown_table(res))
    if args.plot:
        plot_data(res, args.plot)
    return res


def _worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m moedist.bench.data --worker")
    p.add_argument("what", choices=("prepare", "train"))
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    res = worker_prepare(a.config) if a.what == "prepare" else worker_train(a.config, a.threads)
    with open(a.out, "w", encoding="utf-8") as fh:
        json.dump(res, fh)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    from moedist.bench.cli import main

    sys.exit(main(["data"] + sys.argv[1:]))
