"""Merging several fine-tunes (issue 14, Deliver 6): the math of moedist.merge.methods against hand
computations on small tensors (TIES cases where trimming and sign election change the result), LoraHub's
coordinate search, and `moedist merge --method ...` end to end on three tiny LoRA-expert runs."""
import re
from pathlib import Path

import pytest
import torch

from moedist.cli import main
from moedist.merge import methods
from moedist.merge.lorahub import coordinate_search

T = torch.tensor


def test_average_weighted_and_equal():
    a, b = {"x": T([1.0, 2.0])}, {"x": T([3.0, 6.0])}
    assert torch.equal(methods.average([a, b])["x"], T([2.0, 4.0]))
    assert torch.equal(methods.average([a, b], [1, 3])["x"], T([2.5, 5.0]))  # (1*1 + 3*3) / 4, (2 + 18) / 4
    with pytest.raises(ValueError, match="sum to 0"):
        methods.average([a, b], [1, -1])


def test_task_vectors_and_task_arithmetic():
    base, a, b = {"x": T([1.0, 1.0])}, {"x": T([2.0, 0.0])}, {"x": T([1.0, 3.0])}
    assert [t["x"].tolist() for t in methods.task_vectors(base, [a, b])] == [[1.0, -1.0], [0.0, 2.0]]
    # 1 + 0.5 * (1 + 0), 1 + 0.5 * (-1 + 2)
    assert torch.equal(methods.task_arithmetic(base, [a, b], 0.5)["x"], T([1.5, 1.5]))
    # weights per task vector: 1 + 1 * (2 * 1 + 1 * 0), 1 + (2 * -1 + 1 * 2)
    assert torch.equal(methods.task_arithmetic(base, [a, b], 1.0, [2, 1])["x"], T([3.0, 1.0]))


def test_trim_keeps_the_largest_magnitudes():
    t = T([0.5, -3.0, 2.0, -0.1, 1.0])
    assert methods.trim_top_density(t, 0.4).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0]   # ceil(0.4 * 5) = 2
    assert methods.trim_top_density(t, 0.5).tolist() == [0.0, -3.0, 2.0, 0.0, 1.0]   # ceil(2.5) = 3
    assert methods.trim_top_density(t, 1.0).tolist() == t.tolist()
    assert methods.trim_top_density(T([1.0, -1.0, 1.0]), 0.34).tolist() == [1.0, -1.0, 0.0]  # ties: lower index
    assert methods.trim_top_density(T([[4.0, -1.0], [0.0, -5.0]]), 0.5).tolist() == [[4.0, 0.0], [0.0, -5.0]]
    with pytest.raises(ValueError, match="density"):
        methods.trim_top_density(t, 0.0)


def test_sign_election_and_disjoint_mean_by_hand():
    taus = torch.stack([T([3.0, -1.0, 0.5, -2.0]), T([-1.0, 2.0, 0.4, 5.0]), T([-1.0, 2.0, 1.0, -4.0])])
    # summed magnitude per sign: entry 0: +3 vs -2 -> +; entry 3: +5 vs -6 -> -
    assert methods.elect_sign(taus).tolist() == [1.0, 1.0, 1.0, -1.0]
    got = methods.disjoint_mean(taus, methods.elect_sign(taus))
    # only the agreeing entries are averaged: [3], [2, 2], [0.5, 0.4, 1.0], [-2, -4]
    assert torch.allclose(got, T([3.0, 2.0, 1.9 / 3, -3.0]))
    assert methods.elect_sign(torch.stack([T([1.0]), T([-1.0])])).tolist() == [0.0]  # cancel: nothing kept
    assert methods.disjoint_mean(torch.stack([T([1.0]), T([-1.0])]), T([0.0])).tolist() == [0.0]


def test_ties_by_hand_where_trimming_and_election_matter():
    base = {"x": T([1.0, 1.0, 1.0, 1.0])}
    states = [{"x": base["x"] + T([3.0, -1.0, 0.5, -2.0])},
              {"x": base["x"] + T([-1.0, 2.0, 0.4, 5.0])},
              {"x": base["x"] + T([-1.0, 2.0, 1.0, -4.0])}]
    # density 0.5 keeps 2 of 4 per task vector: [3, 0, 0, -2], [0, 2, 0, 5], [0, 2, 0, -4]
    # elected signs of the sums [3, 4, 0, -1]: +, +, 0, -; disjoint means 3, 2, 0, -3 (the +5 disagrees)
    got = methods.ties(base, states, density=0.5, scale=0.5)["x"]
    assert torch.allclose(got, T([1 + 1.5, 1 + 1.0, 1.0, 1 - 1.5]))
    # plain task arithmetic of the same vectors (mean) differs in every entry: what TIES changes
    ta = methods.task_arithmetic(base, states, 0.5 / 3)["x"]
    assert not torch.isclose(got, ta).any()
    # density 1: no trimming; the signs [+, +, +, -] keep entry 2 (mean 1.9/3) and drop the +5 of entry 3
    assert torch.allclose(methods.ties(base, states, 1.0, 1.0)["x"], T([4.0, 3.0, 1 + 1.9 / 3, -2.0]))
    # weights scale each task vector before the election: 4 * [-1] outweighs [3] in entry 0
    w = methods.ties(base, states[:2], 1.0, 1.0, weights=[1, 4])["x"]
    assert torch.allclose(w, T([1 - 4.0, 1 + 8.0, 1 + (0.5 + 1.6) / 2, 1 + 20.0]))
    # equal and opposite (3 vs 3 * -1): the election is a tie and the entry stays at base
    assert methods.ties(base, states[:2], 1.0, 1.0, weights=[1, 3])["x"][0] == 1.0


def test_linear_combination_touches_only_the_given_keys():
    a = {"lora": T([1.0, 2.0]), "frozen": T([5.0])}
    b = {"lora": T([3.0, -2.0]), "frozen": T([5.0])}
    got = methods.linear_combination([a, b], [0.5, -1.0], ["lora"])
    assert got["lora"].tolist() == [0.5 - 3.0, 1.0 + 2.0] and got["frozen"].tolist() == [5.0]


def test_coordinate_search_finds_a_grid_minimum_within_budget():
    target = [0.75, -0.5, 1.25]
    calls = []

    def f(w):
        calls.append(list(w))
        return sum((x - t) ** 2 for x, t in zip(w, target))

    w, best, used = coordinate_search(f, 3, budget=200, init=[0.0, 0.0, 0.0])
    assert w == target and best == 0.0 and used == len(calls) <= 200
    calls.clear()
    w, best, used = coordinate_search(f, 3, budget=7)
    assert used == len(calls) == 7 and best == min(f(c) for c in calls[:7])
    assert all(-1.5 <= x <= 1.5 for c in calls for x in c)


# ------------------------------------------------------------------ the command

def _state(ckpt: Path) -> dict:
    from moedist.merge.cli import read_state

    return read_state("x", str(ckpt))[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 2-step LoRA-expert runs of one frozen base (same seed): prose only, code only, both."""
    from moedist.config import config_from_dict, save_config
    from tests._lifelong import base_cfg, write_domains

    tmp = tmp_path_factory.mktemp("merge")
    paths = write_domains(tmp / "data")
    out = {}
    for name, srcs in (("prose", ["prose"]), ("code", ["code"]), ("both", ["prose", "code"])):
        cfg = base_cfg({k: paths[k] for k in srcs}, str(tmp / "cache"))
        del cfg["moe"]["expert_groups"]
        cfg["lora"] = {"mode": "expert_lora", "rank": 4}
        cfg["train"].update(output_dir=str(tmp / name), lr=3e-2)
        save_config(config_from_dict(cfg), tmp / f"{name}.yaml")
        assert main(["train", str(tmp / f"{name}.yaml")]) == 0
        out[name] = tmp / name
    return out


def test_merge_average_and_task_arithmetic_by_hand(runs, tmp_path, capsys):
    a, b, base = (_state(runs[k] / "final") for k in ("prose", "code", "both"))
    assert main(["merge", "--method", "average", "--weights", "1,3", str(runs["prose"]), str(runs["code"]),
                 str(tmp_path / "avg"), "--no-eval"]) == 0
    got = _state(tmp_path / "avg")
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert len(moved) >= 4  # LoRA factors and routers differ; frozen weights do not
    for k in a:
        assert torch.allclose(got[k], (a[k] + 3 * b[k]) / 4, atol=1e-6, rtol=0), k
    capsys.readouterr()
    assert main(["merge", "--method", "task_arithmetic", "--base", str(runs["both"]), "--scale", "0.5",
                 str(runs["prose"]), str(runs["code"]), str(tmp_path / "ta")]) == 0
    got = _state(tmp_path / "ta")
    for k in a:
        assert torch.allclose(got[k], base[k] + 0.5 * ((a[k] - base[k]) + (b[k] - base[k])), atol=1e-6, rtol=0), k
    # evaluated per domain beside its inputs
    text = capsys.readouterr().out
    assert "| model | overall | prose |" in text and re.search(rf"\| {re.escape(str(tmp_path / 'ta'))} \| [0-9.]+", text)


def test_merge_ties_keeps_the_plumbing(runs, tmp_path):
    a, b, base = (_state(runs[k] / "final") for k in ("prose", "code", "both"))
    assert main(["merge", "--method", "ties", "--base", str(runs["both"]), "--density", "0.3",
                 str(runs["prose"]), str(runs["code"]), str(tmp_path / "ties"), "--no-eval"]) == 0
    got, want = _state(tmp_path / "ties"), methods.ties(base, [a, b], 0.3, 1.0)
    for k in a:  # keys (expert tensors by global id) land where they came from
        assert torch.equal(got[k], want[k]), k


def test_lorahub_searches_within_budget(runs, tmp_path, capsys):
    a, b = _state(runs["code"] / "final"), _state(runs["prose"] / "final")
    capsys.readouterr()
    # the search runs on the first model's data (code)
    assert main(["merge", "--method", "lorahub", "--budget", "5", "--domain", "code", str(runs["code"]),
                 str(runs["prose"]), str(tmp_path / "hub"), "--table", str(tmp_path / "hub.md")]) == 0
    text = capsys.readouterr().out
    m = re.search(r"lorahub \(coordinate search, (\d+) evaluations\): w = \[([^\]]*)\]", text)
    assert m and int(m.group(1)) == 5 and text.count("lorahub ") >= 5
    w = [float(x) for x in m.group(2).split(",")]
    got = _state(tmp_path / "hub")
    kinds = set()
    for k in a:
        if torch.equal(a[k], b[k]):  # frozen
            want, kind = a[k], "frozen"
        elif k.endswith((".lora_A", ".lora_B")):  # LoraHub's weighted sum of each factor
            want, kind = w[0] * a[k] + w[1] * b[k], "lora"
        else:  # the router, also trained: the equal average
            want, kind = (a[k] + b[k]) / 2, "other"
        kinds.add(kind)
        assert torch.allclose(got[k], want, atol=1e-4), k
    assert kinds == {"frozen", "lora", "other"}
    assert (tmp_path / "hub.md").read_text().startswith("| model | overall | code | prose |")


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    from moedist.config import load_config, save_config

    other = tmp_path / "other"  # 4 experts instead of 8: another architecture
    cfg = load_config(str(runs["prose"] / "config.yaml"), ["moe.num_experts=4", f"train.output_dir={other}"])
    save_config(cfg, tmp_path / "other.yaml")
    assert main(["train", str(tmp_path / "other.yaml")]) == 0
    cases = [
        (["--method", "average", str(runs["prose"]), str(other)], "lacks layers.0.mlp.experts.4."),
        (["--method", "ties", str(runs["prose"]), str(runs["code"])], "--base"),
        (["--method", "average", "--weights", "1,2,3", str(runs["prose"]), str(runs["code"])], "--weights"),
        (["--method", "ties", "--base", str(runs["both"]), "--density", "1.5", str(runs["prose"]),
          str(runs["code"])], "--density"),
        (["--method", "average", str(runs["prose"])], "two or more"),
        (["--method", "average", str(runs["prose"]), str(tmp_path / "nope")], "nope"),
    ]
    for args, word in cases:
        capsys.readouterr()
        assert main(["merge", *args, str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], (args, err)
        assert not (tmp_path / "out").exists()


def test_method_help_shows_the_defaults(capsys):
    assert main(["merge", "--method", "ties", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--density DENSITY", "(default: 0.2)", "(default: 40)", "(default: 1.0)", "(default: 0.05)",
                 "MODEL [MODEL ...] OUT"):
        assert text in out, text
    assert main(["merge", "--help"]) == 0  # the adapter merge, which names the methods
    out = " ".join(capsys.readouterr().out.split())
    assert "ADAPTER_CKPT" in out and "average,task_arithmetic,ties,lorahub" in out
