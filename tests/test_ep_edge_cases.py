"""Expert parallelism at the edges: empty sends, empty receives, ranks with no
tokens (T=0) and every token on one expert. CPU/gloo, 2 and 4 processes.

Routing is forced through the router weights (tests/ep_helpers.py, `route`):
feature 0 of the forced ranks' tokens is large and positive, and column 0 of
the router weight sends it to experts [0, E/2) ("half") or to one expert
("one"). Forward and backward (three optimizer steps) must run and match the
single-process reference exactly as in test_ep_equivalence.py, and each test
first checks that the edge it is about really happened.
"""
import pytest

from tests.ep_helpers import EPConfig, run_and_check

CONFIGS = [
    # rank 0's tokens all go to experts [0, E/2): it sends nothing to the upper EP ranks
    EPConfig("r0_sends_none_up_k2_dropless", route="half", forced=(0,), K=2, cf=None, seed=101),
    EPConfig("r0_sends_none_up_k2_cf1.0_moelora", route="half", forced=(0,), K=2, cf=1.0, experts="moelora", seed=102),
    # every rank's tokens go to experts [0, E/2): the upper EP ranks receive nothing
    EPConfig("upper_ranks_receive_none_k2_cf1.25", route="half", forced=(0, 1, 2, 3), K=2, cf=1.25, shared=True, seed=103),
    EPConfig("upper_ranks_receive_none_k4_dropless_loraon", route="half", forced=(0, 1, 2, 3), K=4, cf=None,
             experts="loraon", seed=104),
    # odd ranks have no tokens at all (x is [2, 0, H])
    EPConfig("odd_ranks_T0_k2_cf1.0_shared", seq=(5, 0), K=2, cf=1.0, shared=True, seed=105),
    EPConfig("odd_ranks_T0_k1_dropless_loraon", seq=(5, 0), K=1, cf=None, experts="loraon", seed=106),
    EPConfig("odd_ranks_T0_k4_cf0.5_moelora", seq=(5, 0), K=4, cf=0.5, experts="moelora", shared=True, seed=107),
    # nobody has tokens
    EPConfig("all_ranks_T0_k2_dropless", seq=(0,), K=2, cf=None, shared=True, seed=108),
    EPConfig("all_ranks_T0_k2_cf1.0_moelora", seq=(0,), K=2, cf=1.0, experts="moelora", seed=109),
    # rank 1 has no tokens and rank 0 sends only to the lower experts: the upper EP rank gets nothing
    EPConfig("T0_and_receive_none_k2_cf1.0", seq=(3, 0), route="half", forced=(0, 2), K=2, cf=1.0, seed=110),
    # every token's first choice is the last expert (on the last EP rank)
    EPConfig("one_expert_k1_cf1.0", route="one", one_expert=7, K=1, cf=1.0, seed=111),
    EPConfig("one_expert_k1_dropless", route="one", one_expert=7, K=1, cf=None, shared=True, seed=112),
    EPConfig("one_expert_k2_dropless_loraon", route="one", one_expert=7, K=2, cf=None, experts="loraon", seed=113),
    EPConfig("one_expert_k2_cf0.5_moelora", route="one", one_expert=0, K=2, cf=0.5, experts="moelora", seed=114),
    # one local expert per rank at EP 4, one rank empty, everything to expert 0
    EPConfig("E4_one_expert_T0_k1_dropless", E=4, route="one", one_expert=0, K=1, cf=None, seq=(4, 3, 2, 0), seed=115),
]
EP_SIZES = {2: (1, 2), 4: (1, 2, 4)}
pytestmark = pytest.mark.timeout(240)  # a collective deadlock fails instead of hanging


def _run(world):
    return run_and_check(world, CONFIGS, EP_SIZES[world])


@pytest.fixture(scope="module")
def world2():
    return _run(2)


@pytest.fixture(scope="module")
def world4():
    return _run(4)


@pytest.fixture(params=[2, 4], ids=["world2", "world4"])
def run(request):
    return request.getfixturevalue(f"world{request.param}")


def _by_name(name):
    return next(c for c in CONFIGS if c.name == name)


def _rows(run, name, ep, rank):
    """Per step: (rows sent to each EP rank, rows received from each) in the dispatch all-to-all."""
    rec = run["results"][rank][(name, ep)]
    out = []
    for s in rec["steps"]:
        fwd = [w for w in s["wire"] if w["in_splits"] is not None][0]
        out.append((fwd["in_splits"], fwd["out_splits"]))
    return out


def _kept(run, name, rank):
    """Per step: kept pairs per expert of `rank`'s tokens in the reference."""
    return [s["tpe"][rank].tolist() for s in run["refs"][name]["steps"]]


def test_edge_cases_match_reference_forward_and_backward(run):
    assert run["n"] == sum(run["world"] * sum(1 for ep in EP_SIZES[run["world"]] if c.E % ep == 0) for c in CONFIGS)
    msgs = [m for _, m in run["errs"]]
    assert not msgs, f"{len(msgs)} mismatches, e.g.:\n" + "\n".join(msgs[:25])


def test_a_rank_sends_zero_tokens_to_some_expert(run):
    world = run["world"]
    for name in ("r0_sends_none_up_k2_dropless", "r0_sends_none_up_k2_cf1.0_moelora"):
        E = _by_name(name).E
        for kept in _kept(run, name, 0):
            assert sum(kept[: E // 2]) > 0 and sum(kept[E // 2:]) == 0, kept
        for ep in EP_SIZES[world][1:]:
            for send, _ in _rows(run, name, ep, 0):
                assert send[0] > 0 and all(n == 0 for n in send[ep // 2:]), (ep, send)
            for send, _ in _rows(run, name, ep, 1):  # rank 1 is not forced: it does send upwards
                assert sum(send[ep // 2:]) > 0, (ep, send)


def test_a_rank_receives_zero_tokens(run):
    world = run["world"]
    for name in ("upper_ranks_receive_none_k2_cf1.25", "upper_ranks_receive_none_k4_dropless_loraon",
                 "T0_and_receive_none_k2_cf1.0"):
        for ep in EP_SIZES[world][1:]:
            for r in range(world):
                for _, recv in _rows(run, name, ep, r):
                    if r % ep >= ep // 2:
                        assert recv == [0] * ep, (name, ep, r, recv)
                    else:
                        assert sum(recv) > 0, (name, ep, r, recv)


def test_a_rank_with_no_tokens(run):
    world = run["world"]
    for name in ("odd_ranks_T0_k2_cf1.0_shared", "odd_ranks_T0_k1_dropless_loraon", "odd_ranks_T0_k4_cf0.5_moelora",
                 "all_ranks_T0_k2_dropless", "all_ranks_T0_k2_cf1.0_moelora", "T0_and_receive_none_k2_cf1.0"):
        cfg = _by_name(name)
        empty = [r for r in range(world) if cfg.tokens(r) == 0]
        assert empty, name
        for r in empty:
            rec = run["results"][r][(name, 1)]
            assert all(tuple(s["y"].shape) == (cfg.batch, 0, cfg.H) for s in rec["steps"])
            for ep in EP_SIZES[world][1:]:
                for send, _ in _rows(run, name, ep, r):
                    assert send == [0] * ep, (name, ep, r, send)


def test_all_tokens_to_one_expert(run):
    world = run["world"]
    for name in ("one_expert_k1_cf1.0", "one_expert_k1_dropless", "one_expert_k2_dropless_loraon",
                 "one_expert_k2_cf0.5_moelora", "E4_one_expert_T0_k1_dropless"):
        cfg = _by_name(name)
        for r in range(world):
            T = cfg.tokens(r)
            for s, kept in enumerate(_kept(run, name, r)):
                dropped = run["refs"][name]["steps"][s]["dropped"][r].tolist()
                routed = [k + d for k, d in zip(kept, dropped)]
                assert routed[cfg.one_expert] == T, (name, r, routed)  # every token's first choice
                if cfg.K == 1:
                    assert sum(routed) == T
                if cfg.cf is not None and T:
                    assert dropped[cfg.one_expert] > 0, (name, r, dropped)
