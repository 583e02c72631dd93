"""Capacity formula and token dropping (both policies) against hand cases and
the naive loop reference."""
import itertools
import math

import pytest
import torch

from moedist.moe.capacity import compute_capacity, select_tokens
from tests.moe_reference import ref_capacity, ref_keep


@pytest.mark.parametrize("T, E, K, cf, expect", [
    (16, 8, 2, 1.25, 5),     # 1.25 * 16 * 2 / 8 = 5 exactly
    (16, 8, 2, 1.0, 4),
    (16, 8, 2, 0.5, 2),
    (7, 3, 2, 0.5, 3),       # 7/3 = 2.33 -> 3
    (10, 4, 1, 1.0, 3),      # 2.5 -> 3
    (12, 8, 4, 1.25, 8),     # 7.5 -> 8
    (100, 10, 1, 1.1, 11),   # exactly 11 (a float product would say 11.000000000000002 -> 12)
    (25, 1, 2, 1.1, 55),     # exactly 55 (55.00000000000001 in floats)
    (1, 8, 1, 0.5, 1),       # 1/16 -> 1
    (0, 4, 2, 1.0, 0),
])
def test_capacity_formula_hand(T, E, K, cf, expect):
    assert compute_capacity(T, E, K, cf) == expect


def test_capacity_formula_grid_and_min_capacity():
    for T, E, K, cf in itertools.product(range(1, 14), (1, 2, 3, 4, 8), (1, 2, 4), (0.3, 0.5, 1.0, 1.1, 1.25, 2.0)):
        if K > E:
            continue
        exact = cf * T * K / E
        c = compute_capacity(T, E, K, cf)
        assert c == ref_capacity(T, E, K, cf)
        assert c - 1 < exact + 1e-9 and c >= exact - 1e-9  # the smallest integer >= cf*T*K/E
        assert compute_capacity(T, E, K, cf, min_capacity=c + 3) == c + 3
        assert compute_capacity(T, E, K, cf, min_capacity=max(0, c - 1)) == c
    assert compute_capacity(8, 4, 2, 0.01, min_capacity=4) == 4
    assert math.ceil(0.01 * 8 * 2 / 4) == 1 == compute_capacity(8, 4, 2, 0.01)


def test_capacity_dropless_and_bad_values():
    assert compute_capacity(10, 4, 2, None) is None
    assert compute_capacity(10, 4, 2, 0) is None
    assert compute_capacity(10, 4, 2, 0.0) is None
    for bad in (-0.5, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="capacity_factor"):
            compute_capacity(10, 4, 2, bad)
    with pytest.raises(ValueError, match="min_capacity"):
        compute_capacity(10, 4, 2, 1.0, min_capacity=-1)
    with pytest.raises(ValueError, match="drop_policy"):
        select_tokens(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 2, 1, "random")


def test_position_policy_is_slot_major():
    # Expert 0 receives the 2nd choice of tokens 0, 1, 2 and the 1st choice of token 3.
    # Slot-major first-come: token 3's first choice wins although it is the last token.
    idx = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    res = select_tokens(idx, w, 2, capacity=1, policy="position")
    assert res.keep_TK.tolist() == [[True, False], [False, False], [False, False], [True, False]]
    assert res.dropped_E.tolist() == [3, 3]  # expert 0: 4 routed, 1 kept; expert 1: 4 routed, 1 kept
    assert res.capacity == 1
    res2 = select_tokens(idx, w, 2, capacity=2, policy="position")
    # expert 1: slot 0 of tokens 0, 1 (token 2 dropped); expert 0: token 3 slot 0, then token 0 slot 1
    assert res2.keep_TK.tolist() == [[True, True], [True, False], [False, False], [True, False]]
    assert res2.dropped_E.tolist() == [2, 2]


def test_probs_policy_keeps_highest_weights():
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    w = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5], [0.7, 0.3]])
    res = select_tokens(idx, w, 2, capacity=2, policy="probs")
    # expert 0 weights (0.2, 0.9, 0.5, 0.7) -> keeps tokens 1, 3; expert 1 (0.8, 0.1, 0.5, 0.3) -> tokens 0, 2
    assert res.keep_TK.tolist() == [[False, True], [True, False], [False, True], [True, False]]
    assert res.dropped_E.tolist() == [2, 2]
    # position policy would keep tokens 0, 1 for both experts instead
    pos = select_tokens(idx, w, 2, capacity=2, policy="position")
    assert pos.keep_TK.tolist() == [[True, True], [True, True], [False, False], [False, False]]


def test_probs_policy_ties_by_position():
    idx = torch.tensor([[0], [0], [0]])
    w = torch.tensor([[0.5], [0.5], [0.5]])
    res = select_tokens(idx, w, 1, capacity=2, policy="probs")
    assert res.keep_TK.squeeze(1).tolist() == [True, True, False]


def test_dropless_keeps_everything():
    idx = torch.tensor([[0, 1], [0, 1], [0, 2]])
    res = select_tokens(idx, torch.rand(3, 2), 4, None, "position")
    assert res.keep_TK.all() and res.dropped_E.tolist() == [0, 0, 0, 0] and res.capacity is None


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("K, E", [(1, 4), (2, 4), (4, 8)])
def test_select_tokens_matches_reference(policy, K, E):
    T = 13
    for seed in range(6):
        g = torch.Generator().manual_seed(seed * 7 + K)
        logits = torch.randn(T, E, generator=g) * 2
        w, idx = torch.softmax(logits, -1).topk(K, -1)
        for cap in (1, 2, 3, 5, T * K):
            res = select_tokens(idx, w, E, cap, policy)
            keep, dropped = ref_keep(idx.tolist(), w.tolist(), E, cap, policy)
            assert res.keep_TK.tolist() == keep
            assert res.dropped_E.tolist() == dropped
            kept_E = torch.bincount(idx[res.keep_TK], minlength=E)
            routed_E = torch.bincount(idx.reshape(-1), minlength=E)
            assert (kept_E <= cap).all()
            assert torch.equal(kept_E + res.dropped_E, routed_E)
            assert torch.equal(kept_E, torch.minimum(routed_E, torch.tensor(cap)))  # an expert fills up before dropping
