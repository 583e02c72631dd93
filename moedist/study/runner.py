"""Running the study's jobs: train / grow / merge / eval as `moedist` subprocesses, cached on disk.

Every job writes into its own directory and is skipped when its result file exists (train:
``summary.json``, written by `moedist train` at the end; eval: ``study_eval_<split>.json``; grow and
merge: ``manifest.json``), so a table can be stopped and rerun, or spread over sessions. Jobs run one
at a time with OMP_NUM_THREADS=1 / MKL_NUM_THREADS=1 (one core each: the machine stays usable).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

STUDY_CACHE = Path(os.path.expanduser("~/.cache/moedist/study"))


class StudyError(Exception):
    """A job that failed or bad study input: one line for the user."""


def flow(value: object) -> str:
    """A YAML flow value for a key=value override, e.g. [{name: code, path: x, format: jsonl}]."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def sources(domains_dir: str, names: Sequence[str], split: str, weights: Optional[Dict[str, float]] = None
            ) -> List[Dict[str, object]]:
    """data.sources entries for the domains' `split` files (weight only where given)."""
    out: List[Dict[str, object]] = []
    for n in names:
        s: Dict[str, object] = {"name": n, "path": str(Path(domains_dir) / f"{n}.{split}.jsonl"), "format": "jsonl"}
        if weights and n in weights:
            s["weight"] = float(weights[n])
        out.append(s)
    return out


@dataclass
class Runner:
    """Runs moedist jobs for one table; `log` collects (job, seconds) for the CPU-time estimate."""

    domains_dir: str
    finetune_config: str
    eval_batches: int = 16
    eval_micro_batch: int = 8
    dry: bool = False
    log: List[Dict[str, object]] = field(default_factory=list)

    def _run(self, what: str, argv: List[str], out: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(out / f"study_{what}.log", "w") as fh:
            r = subprocess.run([sys.executable, "-m", "moedist", *argv], stdout=fh, stderr=subprocess.STDOUT, env=env)
        dt = time.perf_counter() - t0
        self.log.append({"job": what, "out": str(out), "seconds": round(dt, 2)})
        if r.returncode != 0:
            raise StudyError(f"`moedist {' '.join(argv[:2])} ...` failed (exit {r.returncode}): see {out}/study_{what}.log")

    @staticmethod
    def trained(out: Path) -> bool:
        """Whether the training job of OUT is finished (its summary.json: written last, and kept)."""
        return (out / "summary.json").exists()

    def train(self, out: Path, overrides: Sequence[str], config: Optional[str] = None) -> Dict[str, object]:
        """`moedist train CONFIG overrides train.output_dir=OUT` unless OUT/summary.json exists."""
        summary = out / "summary.json"
        if not self.trained(out):
            if out.exists():        # an interrupted run: start it again from scratch (no partial results kept)
                shutil.rmtree(out)
            argv = ["train", config or self.finetune_config, *overrides, f"train.output_dir={out}",
                    "train.resume=null", "train.plot=false"]
            (out.parent).mkdir(parents=True, exist_ok=True)
            self._run("train", argv, out)
        return json.loads(summary.read_text())

    def evaluate(self, model: Path, names: Sequence[str], split: str, cache_dir: Optional[Path] = None
                 ) -> Dict[str, float]:
        """Loss per domain of `model` on the domains' `split` files; cached as study_eval_<split>_<names>.json.

        The same sequences for every model: data.seed=0 fixes which 95% of the file's blocks are scored
        (a run's own data.seed would pick others), and eval_batches x eval_micro_batch of them are read.
        """
        path = self.eval_path(model, names, split, cache_dir)
        where = path.parent
        if not path.exists():
            argv = ["eval", str(model), "data.sources=" + flow(sources(self.domains_dir, names, split)),
                    "data.val_fraction=0.95", "data.seed=0", f"train.eval_batches={self.eval_batches}",
                    f"train.micro_batch_size={self.eval_micro_batch}", "--json"]
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "moedist", *argv], capture_output=True, text=True, env=env)
            self.log.append({"job": "eval", "out": str(where), "seconds": round(time.perf_counter() - t0, 2)})
            if r.returncode != 0:
                tail = (r.stderr.strip().splitlines() or ["?"])[-1]
                raise StudyError(f"moedist eval {model} failed (exit {r.returncode}): {tail}")
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1]
            row = json.loads(line)
            losses = {n: float(row[f"val_loss_{n}"]) for n in names}
            where.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"model": str(model), "split": split, "losses": losses}, indent=1) + "\n")
            os.replace(tmp, path)
        return dict(json.loads(path.read_text())["losses"])

    @staticmethod
    def eval_path(model: Path, names: Sequence[str], split: str, cache_dir: Optional[Path] = None) -> Path:
        """Where `evaluate` caches the losses of `model` (a kept result: `study keep` / restore)."""
        return (cache_dir or model) / f"study_eval_{split}_{'-'.join(names)}.json"

    def grow(self, ckpt: Path, add: int, group: str, out: Path) -> Path:
        if not (out / "manifest.json").exists():
            if out.exists():
                shutil.rmtree(out)
            self._run("grow", ["grow", str(ckpt), "--add-experts", str(add), "--group", group, str(out)], out.parent)
        return out

    def merge(self, method: str, models: Sequence[Path], out: Path, base: Optional[Path] = None,
              extra: Sequence[str] = ()) -> Path:
        if not (out / "manifest.json").exists():
            if out.exists():
                shutil.rmtree(out)
            argv = ["merge", "--method", method, *(["--base", str(base)] if base else []), *extra,
                    *map(str, models), str(out), "--no-eval"]
            self._run(f"merge_{method}", argv, out.parent)
        return out


def config_hash(path: str, domains_dir: str, extra: Sequence[str] = ()) -> str:
    """Key of a cached base model: the config text, the bytes of every {domains}/FILE it names, the overrides."""
    text = Path(path).read_text()
    h = hashlib.sha256(text.encode())
    for name in sorted(set(re.findall(r"\{domains\}/([\w.\-]+)", text))):
        f = Path(domains_dir) / name
        if not f.is_file():
            raise StudyError(f"{path}: names {{domains}}/{name}, which {domains_dir} lacks")
        h.update(name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    for e in extra:
        h.update(e.encode() + b"\0")
    return h.hexdigest()[:16]


def base_model(runner: Runner, base_config: str, overrides: Sequence[str] = (), cache: Path = STUDY_CACHE) -> Path:
    """The study's pretrained base: trained once per config hash under ~/.cache/moedist/study/base-<hash>/."""
    key = config_hash(base_config, runner.domains_dir, overrides)
    out = cache / f"base-{key}"
    text = Path(base_config).read_text().replace("{domains}", str(Path(runner.domains_dir).resolve()))
    cache.mkdir(parents=True, exist_ok=True)
    cfg = cache / f"base-{key}.yaml"
    cfg.write_text(text)
    runner.train(out, list(overrides), config=str(cfg))
    return out
