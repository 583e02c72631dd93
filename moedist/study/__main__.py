"""python -m moedist.study domains OUT_DIR | run|report|keep TABLE [--config C] [--set k=v ...]

    python -m moedist.study run a          # configs/study/a.yaml: domains, cached base, every run, report
    python -m moedist.study report a       # only the report, from <out>/results.json
    python -m moedist.study keep a         # finished jobs' result files -> its kept: dir (docs/study/a/kept);
                                           # `run` restores them first, so a table resumes on a new machine

Bad input: one line on stderr, exit 2. A failed job: one line naming its log, exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from moedist.study import domains as dom
from moedist.study import keep as kept
from moedist.study.report import write_report
from moedist.study.runner import Runner, StudyError, base_model
from moedist.study.spec import TABLES, SpecError, load_spec
from moedist.study.tables import TABLES as RUNNERS


def _spec(a):
    return load_spec(a.config or f"configs/study/{a.table}.yaml", a.set)


def run_table(spec) -> Path:
    """Domains, base model, every run of the table (cached), results.json, report; returns the report path."""
    wanted = set(spec.domains) | {"prose"}           # prose: the base model's domain
    dom.build(Path(spec.domains_dir), [d for d in dom.DOMAINS if d in wanted], spec.max_train_bytes)
    restored = kept.restore(Path(spec.kept), Path(spec.out)) if spec.kept else 0
    if restored:
        print(f"moedist.study: {restored} finished job results restored from {spec.kept}", flush=True)
    r = Runner(spec.domains_dir, spec.finetune_config, spec.eval_batches, spec.eval_micro_batch)
    t0 = time.perf_counter()
    base = base_model(r, spec.base_config, spec.base_overrides, Path(spec.cache_dir).expanduser())
    res = RUNNERS[spec.table](spec, r, base)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    res["wall_s_this_call"] = round(time.perf_counter() - t0, 1)
    res["jobs_this_call"] = r.log
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    return write_report(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["domains"]:
        return dom.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m moedist.study", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("domains", help="write the domains' splits (see python -m moedist.study domains -h)")
    for name in ("run", "report", "keep"):
        p = sub.add_parser(name)
        p.add_argument("table", choices=TABLES)
        p.add_argument("--config", help="study config (default configs/study/TABLE.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a study key (YAML value)")
    a = ap.parse_args(argv)
    try:
        spec = _spec(a)
        if a.cmd == "keep":
            if not spec.kept:
                raise SpecError(f"table {a.table}: no kept: directory in its study config")
            if not Path(spec.out).is_dir():
                raise SpecError(f"{spec.out}: no runs of table {a.table} here; run `python -m moedist.study run {a.table}`")
            n = kept.keep(Path(spec.out), Path(spec.kept))
            print(f"{n} result files of {spec.out} kept in {spec.kept}")
        elif a.cmd == "report":
            if not (Path(spec.out) / "results.json").exists():
                raise SpecError(f"{spec.out}/results.json: not there yet; run `python -m moedist.study run {a.table}`")
            print(write_report(Path(spec.out)))
        else:
            print(run_table(spec))
    except SpecError as err:
        print(f"moedist.study: {err}", file=sys.stderr)
        return 2
    except StudyError as err:
        print(f"moedist.study: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
