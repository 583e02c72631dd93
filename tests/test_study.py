"""The study machinery (moedist/study): statistics against hand computations, fixed domain splits, bad input,
and a tiny table (a) end to end whose report is recomputed by hand from the runs' eval files (~40 s)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from moedist.study import domains as dom
from moedist.study.report import continual_metrics, report_a
from moedist.study.stats import domain_mean, forgetting, paired, summarize, t975

ROOT = Path(__file__).resolve().parents[1]


def test_summarize_and_paired_by_hand():
    s = summarize([1.0, 2.0, 4.0])
    # mean 7/3; deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9; / (n-1) = 7/3
    assert s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(math.sqrt(7 / 3))
    assert s.ci95 == pytest.approx(4.303 * math.sqrt(7 / 3) / math.sqrt(3))
    # paired: only common seeds count; differences 0.5, -0.25 -> mean 0.125, std sqrt(2 * 0.375^2) = 0.53033
    d = paired({0: 2.0, 1: 1.0, 7: 9.0}, {0: 1.5, 1: 1.25, 3: 0.0})
    assert (d.n, d.mean) == (2, pytest.approx(0.125))
    assert d.std == pytest.approx(0.375 * math.sqrt(2))
    assert d.ci95 == pytest.approx(12.706 * 0.375 * math.sqrt(2) / math.sqrt(2))
    one = summarize([3.0])
    assert one.mean == 3.0 and math.isnan(one.std) and math.isnan(one.ci95)
    assert t975(30) == 2.042 and t975(200) == 1.960
    with pytest.raises(ValueError):
        paired({0: 1.0}, {1: 1.0})


def test_forgetting_and_continual_metrics_by_hand():
    names = ["a", "b", "c"]
    stages = [{"domain": "a", "losses": {"a": 1.0, "b": 3.0, "c": 3.0}},
              {"domain": "b", "losses": {"a": 1.5, "b": 2.0, "c": 3.0}},
              {"domain": "c", "losses": {"a": 1.25, "b": 2.5, "c": 2.0}}]
    m = continual_metrics({"kind": "plain", "stages": stages}, names)
    assert m["forgetting"] == pytest.approx(((1.25 - 1.0) + (2.5 - 2.0)) / 2)
    assert m["new"] == 2.0 and m["mean"] == pytest.approx((1.25 + 2.5 + 2.0) / 3)
    oracle = continual_metrics({"kind": "per_domain", "stages": stages}, names)
    assert oracle["forgetting"] == 0.0 and oracle["mean"] == pytest.approx((1.0 + 2.0 + 2.0) / 3)
    assert forgetting({"a": 1.0}, {"a": 2.0}, []) == 0.0
    with pytest.raises(KeyError):
        domain_mean({"a": 1.0}, ["a", "b"])


def test_report_a_flags_a_tuned_lr_on_the_grid_edge():
    def row(lr, grid):
        runs = {str(s): {"losses": {"x": 1.0 + s / 10}, "trainable_params": 7} for s in (0, 1)}
        return {"lr": lr, "dev_loss_by_lr": {f"{g:g}": 1.0 for g in grid}, "runs": runs}
    res = {"domains": ["x"], "methods": {"low": row(1e-3, [1e-3, 3e-3, 1e-2]), "mid": row(3e-3, [1e-3, 3e-3, 1e-2]),
                                         "high": row(1e-2, [1e-3, 3e-3, 1e-2]), "one": row(1e-2, [1e-2])}}
    lines, stats, _ = report_a(res)
    edge = {m: v["lr_at_grid_edge"] for m, v in stats["methods"].items()}
    assert edge == {"low": True, "mid": False, "high": True, "one": False}
    assert sum("(grid edge)" in ln for ln in lines) == 2


def test_domain_splits_fixed_and_disjoint(tmp_path):
    m = dom.build(tmp_path, ["code", "prose"], 20_000)
    for d in ("code", "prose"):
        docs = {s: m["domains"][d][s]["docs"] for s in dom.SPLITS}
        assert docs["train"] and docs["dev"] and docs["test"]
        assert not set(docs["train"]) & (set(docs["dev"]) | set(docs["test"]))
        assert all(dom.split_of(d, n) == s for s in dom.SPLITS for n in docs[s])
        texts = {s: {json.loads(x)["text"] for x in (tmp_path / f"{d}.{s}.jsonl").read_text().splitlines()}
                 for s in dom.SPLITS}
        assert not texts["train"] & texts["test"]
    again = dom.build(tmp_path / "again", ["code", "prose"], 20_000)
    assert again["domains"] == m["domains"]      # deterministic: same documents, same bytes


def _study(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "moedist.study", *args], cwd=cwd, capture_output=True, text=True)


def test_bad_input_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("table: a\nout: x\ndomains: [code]\nmethods: {m: {lrs: [1]}}\nseeds: [0]\nsteps: 1\nbogus: 1\n")
    r = _study("run", "a", "--config", str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "bogus" in r.stderr
    bad.write_text("table: d\nout: x\ndomains: [code]\nmethods: {m: {lrs: [1]}}\nseeds: [0]\nsteps: 1\n"
                   "merges: {s: {method: average, of: nope}}\n")
    r = _study("run", "d", "--config", str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "merges.s" in r.stderr
    r = _study("run", "a", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such study config" in r.stderr
    r = _study("domains", str(tmp_path / "d"), "--domains", "code,poetry")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def _tiny_table(tmp_path, table: str, keys: str, method: str) -> Path:
    """A tiny study config for `table` on code + prose (the tiny base below, 2 steps a run, eval 1 x 2)."""
    cfg = tmp_path / f"{table}.yaml"
    cfg.write_text(f"table: {table}\nout: {tmp_path}/{table}\ndomains_dir: {tmp_path}/domains\nmax_train_bytes: 20000\n"
                   f"base_config: {_tiny_base(tmp_path)}\ncache_dir: {tmp_path}/cache\neval_batches: 1\n"
                   f"eval_micro_batch: 2\ndomains: [code, prose]\nsteps: 2\n{keys}"
                   "common: [train.micro_batch_size=2, train.warmup_steps=0, data.seq_len=32]\n"
                   f"methods:\n  {method}\n")
    return cfg


def _tiny_base(tmp_path):
    """A 1-layer byte-level base config (2 steps on prose) for the tiny end-to-end tables."""
    base = tmp_path / "base.yaml"
    base.write_text("name: tb\nmodel: {vocab_size: 256, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 2,"
                    " ffn_size: 64, max_seq_len: 32, moe_every: 0}\n"
                    "train: {max_steps: 2, lr: 1.0e-3, warmup_steps: 0, micro_batch_size: 2, eval_batches: 1}\n"
                    "data: {tokenizer: bytes, seq_len: 32, sources: [{name: prose, path: '{domains}/prose.train.jsonl', "
                    "format: jsonl}]}\n")
    return base


def test_tiny_table_a_report_comes_from_runs(tmp_path):
    cfg = _tiny_table(tmp_path, "a", "seeds: [0, 1]\n", "lora_moe: {lrs: [1.0e-2], overrides: [lora.mode=moe_lora, "
                      "model.moe_every=1, moe.num_experts=2, moe.top_k=1, lora.rank=2]}")
    r = _study("run", "a", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "a"
    assert (out / "report.md").exists() and (out / "report.png").stat().st_size > 0
    assert len(list((tmp_path / "cache").glob("base-*/summary.json"))) == 1   # the base is cached by hash
    # recompute the reported mean from the two runs' eval files by hand
    scores = []
    for s in (0, 1):
        run = out / "lora_moe" / "lr0.01" / f"seed{s}"
        assert (run / "summary.json").exists()
        losses = json.loads((run / "study_eval_test_code-prose.json").read_text())["losses"]
        scores.append((losses["code"] + losses["prose"]) / 2)
    stats = json.loads((out / "report.json").read_text())["methods"]["lora_moe"]["mean"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(sum(scores) / 2, abs=1e-12)
    assert f"{sum(scores) / 2:.4f}" in (out / "report.md").read_text()
    # a rerun skips every finished run: no new jobs
    r = _study("run", "a", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["jobs_this_call"] == []
    # keep: the finished jobs' result files (no checkpoints) and the report go to `kept`; on a machine
    # without the run directory, `run` restores them and runs no job again, with the same report
    kept = tmp_path / "kept" / "a"
    with open(cfg, "a") as fh:
        fh.write(f"kept: {kept}\n")
    r = _study("keep", "a", "--config", str(cfg))
    assert r.returncode == 0 and "result files" in r.stdout, r.stderr[-2000:]
    assert (kept / "lora_moe" / "lr0.01" / "seed1" / "summary.json").exists()
    assert not list(kept.rglob("*.safetensors")) and (kept.parent / "report.md").exists()
    report = (out / "report.md").read_text()
    import shutil

    shutil.rmtree(out)
    r = _study("run", "a", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "restored" in r.stdout
    assert json.loads((out / "results.json").read_text())["jobs_this_call"] == []
    assert (out / "report.md").read_text() == report


def test_tiny_table_c_moe_replay_grows_freezes_and_replays(tmp_path):
    """moe_replay: stage 1 starts from the grown stage-0 model, freezes the old experts and trains on the new
    domain plus the old one at replay_weight; the frozen experts' weights equal the grown model's bitwise."""
    from safetensors.torch import load_file
    cfg = _tiny_table(tmp_path, "c", "seeds: [0]\nreplay_weight: 0.25\n",
                      "mr: {kind: moe_replay, lrs: [1.0e-2], experts: 2, add_experts: 1, overrides: [lora.mode=moe_lora, "
                      "model.moe_every=1, moe.num_experts=2, moe.top_k=2, lora.rank=2]}")
    r = _study("run", "c", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    root = tmp_path / "c" / "mr" / "seed0"
    import yaml
    used = yaml.safe_load((root / "stage1_prose" / "config.yaml").read_text())
    srcs = {s["name"]: s.get("weight", 1.0) for s in used["data"]["sources"]}
    assert srcs == {"prose": 1.0, "code": 0.25}
    assert used["moe"]["num_experts"] == 3 and used["moe"]["freeze_experts"] == [0, 1]
    assert used["model"]["init_from"] == str(root / "stage1_grown")

    def tensors(d):
        out = {}
        for f in sorted(Path(d).rglob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    grown, final = tensors(root / "stage1_grown"), tensors(root / "stage1_prose" / "final")
    frozen = [k for k in grown if ".experts.0." in k or ".experts.1." in k]
    assert frozen, sorted(grown)[:10]
    for k in frozen:
        assert k in final and (grown[k] == final[k]).all(), k
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    assert [st["domain"] for st in res["methods"]["mr"]["0"]["stages"]] == ["code", "prose"]


def _assert_resumes_from_kept(tmp_path, cfg: Path, table: str, derived: Path, extra: str = "") -> None:
    """Run `table`, keep it, delete its run directory, run it again: the second run restores the kept
    results, runs no job (so `derived`, a checkpoint made from others, is not made again) and writes the
    same report."""
    import shutil

    with open(cfg, "a") as fh:
        fh.write(f"{extra}kept: {tmp_path / 'kept' / table}\n")
    r = _study("run", table, "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / table
    assert (derived / "manifest.json").exists()
    report = (out / "report.md").read_text()
    r = _study("keep", table, "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.rmtree(out)
    r = _study("run", table, "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "restored" in r.stdout
    assert json.loads((out / "results.json").read_text())["jobs_this_call"] == []
    assert not derived.joinpath("manifest.json").exists()  # nothing was derived again
    assert (out / "report.md").read_text() == report


def test_tiny_table_d_resumes_from_kept_results_without_checkpoints(tmp_path):
    """Table (d) after `keep` on a machine without its run directory: the merges' kept evaluations
    stand for the merged weights, so `run` restores them and runs no job (no merge of fine-tunes whose
    checkpoints are gone), with the same report."""
    cfg = _tiny_table(tmp_path, "d", "seeds: [0]\n", "lora: {lrs: [1.0e-2], overrides: [lora.mode=moe_lora, "
                      "model.moe_every=1, moe.num_experts=1, moe.top_k=1, lora.rank=2]}")
    _assert_resumes_from_kept(tmp_path, cfg, "d", tmp_path / "d" / "merged" / "lora_soup" / "seed0",
                              extra="merges:\n  lora_soup: {method: average, of: lora}\n")


def test_tiny_table_c_resumes_from_kept_results_without_checkpoints(tmp_path):
    """A finished table (c) after `keep` on a machine without its run directory: every stage's kept
    summary and evaluation stand for its model, so `run` restores them and runs no job (no grow of a
    stage checkpoint that is gone), with the same report."""
    cfg = _tiny_table(tmp_path, "c", "seeds: [0]\nreplay_weight: 0.25\n",
                      "mf: {kind: moe_frozen, lrs: [1.0e-2], experts: 2, add_experts: 1, overrides: [lora.mode=moe_lora, "
                      "model.moe_every=1, moe.num_experts=2, moe.top_k=2, lora.rank=2]}")
    _assert_resumes_from_kept(tmp_path, cfg, "c", tmp_path / "c" / "mf" / "seed0" / "stage1_grown")
