"""Markdown tables of `bench` JSON files (what benchmarks/RESULTS.md is made of).

    moedist bench report benchmarks/layer_e8.json benchmarks/sweep.json
"""
from __future__ import annotations

import json
from typing import List


def _f(v, spec=".1f") -> str:
    return "–" if v is None else format(v, spec)


def _head(cols: List[str]) -> List[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]


def _span(r: dict, lo: str, hi: str) -> str:
    return "–" if r.get(lo) is None or r.get(hi) is None else f"{r[lo]:.0f}–{r[hi]:.0f}"


def layer_table(res: dict) -> str:
    """One row per (impl, mode, ffn); ratios are against the row of the same expert FFN (`ffn`)."""
    cols = ["impl", "mode", "fwd ms", "fwd+bwd ms (p10–p90)", "IQR", "min–max", "× dense", "× DS", "× floor",
            "CPU ms", "CPU × dense", "CPU × DS", "act MB", "peak MB", "a2a MB", "tokens/s", "useful TFLOP/s", "ffn"]
    lines = _head(cols)
    for r in res["results"]:
        rat = r.get("ratios", {})
        lines.append("| " + " | ".join([
            r["impl"], r["mode"], _f(r["fwd_ms"]),
            f"{r['fwd_bwd_ms']:.1f} ({r['fwd_bwd_ms_p10']:.0f}–{r['fwd_bwd_ms_p90']:.0f})",
            _span(r, "fwd_bwd_ms_q25", "fwd_bwd_ms_q75"), _span(r, "fwd_bwd_ms_min", "fwd_bwd_ms_max"),
            _f(rat.get("fwd_bwd_vs_dense", rat.get("fwd_bwd_vs_dense_lora")), ".2f"),
            _f(rat.get("fwd_bwd_vs_deepspeed"), ".2f"), _f(rat.get("fwd_bwd_vs_floor"), ".2f"),
            _f(r.get("fwd_bwd_cpu_ms")),
            _f(rat.get("cpu_fwd_bwd_vs_dense", rat.get("cpu_fwd_bwd_vs_dense_lora")), ".2f"),
            _f(rat.get("cpu_fwd_bwd_vs_deepspeed"), ".2f"), _f(r.get("act_mem_mb")), _f(r.get("peak_mem_mb")),
            _f(r["a2a_bytes"] / 2**20, ".2f"), f"{r['tokens_per_s']:.0f}", _f(r.get("useful_tflops"), ".4f"),
            r.get("ffn", "–")]) + " |")
    for name, why in (res.get("skipped") or {}).items():
        lines.append(f"\nskipped {name}: {why}")
    return "\n".join(lines)


def targets_table(res: dict) -> str:
    lines = _head(["target", "limit", "wall-clock / memory", "CPU time", "met"])
    for t in res.get("targets", []):
        cpu = t.get("cpu_value")
        met = "yes" if t["ok"] and t.get("cpu_ok", True) else ("no" if not t["ok"] and not t.get("cpu_ok", False)
                                                              else "wall only" if t["ok"] else "CPU only")
        lines.append(f"| {t['target']} | ≤ {t['limit']} | {t['value']:.3f} | {_f(cpu, '.3f')} | {met} |")
    return "\n".join(lines)


def profile_table(rows: List[dict]) -> str:
    lines = _head(["op", "self ms", "share", "calls"])
    for r in rows:
        lines.append(f"| `{r['op']}` | {r['self_ms']:.1f} | {100 * r['share']:.1f}% | {r['calls']} |")
    return "\n".join(lines)


def sweep_table(res: dict, which: str) -> str:
    key = "tokens" if which == "tokens" else "experts"
    rows = [r for r in res["results"] if r.get("sweep") == which]

    def name(r: dict) -> str:  # impl/mode, plus the expert FFN when the sweep ran more than one
        base = f"{r['impl']}/{r['mode']}" if r["mode"] != "-" else r["impl"]
        return f"{base} ({r['ffn']})" if len({q.get('ffn') for q in rows}) > 1 else base

    impls = []
    for r in rows:
        if name(r) not in impls:
            impls.append(name(r))
    xs = sorted({r[key] for r in rows})
    lines = _head([key] + [f"{k} ms" for k in impls] + [f"{k} × dense" for k in impls if not k.startswith("dense")]
                  + ["moedist act MB", "DS act MB"])
    for x in xs:
        at = {name(r): r for r in rows if r[key] == x}

        def dense_of(k: str):  # the dense row of the same FFN
            r = at[k]
            return next((q for q in at.values() if q["impl"] == "dense" and q.get("ffn") == r.get("ffn")), None)

        cells = [str(x)] + [_f(at[k]["fwd_bwd_ms"]) if k in at else "–" for k in impls]
        cells += [_f(at[k]["fwd_bwd_ms"] / dense_of(k)["fwd_bwd_ms"], ".2f") if k in at and dense_of(k) else "–"
                  for k in impls if not k.startswith("dense")]
        md = next((r for k, r in at.items() if k.startswith("moedist")), None)
        ds = next((r for k, r in at.items() if k.startswith("deepspeed")), None)
        cells += [_f(md and md.get("act_mem_mb")), _f(ds and ds.get("act_mem_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fits_table(res: dict) -> str:
    lines = _head(["impl/mode", "ms per 1k tokens", "intercept ms", "R²", "points"])
    for k, f in res.get("fits", {}).items():
        lines.append(f"| {k} | {f['ms_per_1k_tokens']:.1f} | {f['intercept_ms']:.1f} | {f['r2']:.4f} | {f['points']} |")
    return "\n".join(lines)


def ep_table(res: dict) -> str:
    lines = _head(["impl", "mode", "fwd ms", "fwd+bwd ms", "a2a ms (fwd+bwd)", "a2a MB (dispatch, all ranks)",
                   "leaves ranks MB", "rows recv max/mean", "step max/mean", "tokens/s"])
    for r in res["results"]:
        lines.append(f"| {r['impl']} | {r['mode']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['a2a_ms']:.1f} | "
                     f"{r['a2a_bytes'] / 2**20:.2f} | {r['a2a_bytes_remote'] / 2**20:.2f} | "
                     f"{_f(r['rows_recv_imbalance'], '.2f')} | {r['step_imbalance']:.2f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def train_table(res: dict) -> str:
    """`bench train` rows: against DeepSpeed native MoE (default) or AutoEP (--peer autoep, with peak memory)."""
    if res.get("config", {}).get("peer") == "autoep":
        lines = _head(["impl", "step ms (IQR)", "min–max", "tokens/s", "peak MB", "× AutoEP", "loss first → last"])
        for r in res["results"]:
            lines.append(f"| {r['impl']} | {r['step_ms']:.1f} ({_span(r, 'step_ms_q25', 'step_ms_q75')}) | "
                         f"{_span(r, 'step_ms_min', 'step_ms_max')} | {r['tokens_per_s']:.0f} | "
                         f"{_f(r.get('peak_mem_mb'))} | {_f(r.get('step_time_vs_autoep'), '.2f')} | "
                         f"{r['loss_first']:.3f} → {r['loss_last']:.3f} |")
        lines += [f"\nskipped {k}: {v}" for k, v in res.get("skipped", {}).items()]
        return "\n".join(lines)
    lines = _head(["impl", "step ms (p10–p90)", "tokens/s", "× DeepSpeed", "loss first → last"])
    for r in res["results"]:
        lines.append(f"| {r['impl']} | {r['step_ms']:.1f} ({r['step_ms_p10']:.0f}–{r['step_ms_p90']:.0f}) | "
                     f"{r['tokens_per_s']:.0f} | {r['step_time_vs_deepspeed']:.2f} | "
                     f"{r['loss_first']:.3f} → {r['loss_last']:.3f} |")
    return "\n".join(lines)


def render(path: str) -> str:
    """Markdown for one JSON file, whichever bench wrote it."""
    with open(path, encoding="utf-8") as fh:
        res = json.load(fh)
    env = res.get("environment", {})
    out = [f"`{path}` — {env.get('date')}, {env.get('device')}, torch {env.get('torch')}, "
           f"{env.get('torch_threads')} thread(s), allocator {env.get('cpu_allocator', 'default')}, "
           f"load {_f(env.get('loadavg_1m'), '.1f')}"
           + (f", moedist expert grads {res['config']['expert_grads']}" if "expert_grads" in res.get("config", {}) else "")]
    results = res.get("results", [])
    if results and "step_ms" in results[0]:
        out.append(train_table(res))
        if res.get("targets"):
            out += [targets_table(res)]
        out += _profile_sections(res, "one training step of {name} (rank 0, self time per op)")  # --profile
    elif results and "per_rank" in results[0]:
        out.append(ep_table(res))
    elif "fits" in res:
        out += ["tokens sweep:", sweep_table(res, "tokens"), "experts sweep:", sweep_table(res, "experts"),
                "fit of fwd+bwd time against tokens:", fits_table(res)]
    else:
        out.append(layer_table(res))
        if res.get("targets"):
            out += [targets_table(res)]
        out += _profile_sections(res, "one fwd+bwd step of {name} (self time per op)")
        out += _memory_sections(res)
    return "\n\n".join(out)


def _memory_sections(res: dict) -> List[str]:
    """Per case, what was live at its peak memory, by the op that allocated it (`memory_at_peak`)."""
    out = []
    for name, m in (res.get("memory_at_peak") or {}).items():
        lines = _head(["allocated by", "MB live at the peak"])
        lines += [f"| `{op}` | {mb:.1f} |" for op, mb in m["live_mb"].items()]
        out += [f"memory at the peak of {name} ({sum(m['live_mb'].values()):.1f} MB, reached in `{m['op']}`):",
                "\n".join(lines)]
    return out


def _profile_sections(res: dict, caption: str) -> List[str]:
    """A title ("profile of " + caption, {name} filled in) and a table per profile in `res`."""
    out = []
    for name, rows in (res.get("profiles") or {}).items():
        out += [f"profile of {caption.format(name=name)}:", profile_table(rows)]
    return out


def profile_lines(profiles: dict, per: str) -> List[str]:
    """Printed lines of op-by-op profiles ({name: rows of `timing.profile_ops`}), self time per `per`."""
    lines = []
    for name, rows in profiles.items():
        lines.append(f"profile {name} (self time per {per}):")
        lines += [f"  {r['op'][:48]:<48} {r['self_ms']:8.1f} ms {100 * r['share']:5.1f}%  x{r['calls']}" for r in rows]
    return lines
