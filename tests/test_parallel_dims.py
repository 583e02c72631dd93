"""ParallelDims rank lists, group building, the EP all-to-all and gradient sync / clipping.

The multi-process tests compare against independent references: a hand formula for the
all-to-all and its backward, and a single-process model that holds every expert and
sees the concatenated global batch for sync_gradients and clip_grad_norm_.
"""
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moedist.distributed import (ExpertParallelComm, ParallelDims, clip_grad_norm_, is_expert_param,
                                 mark_expert_param, sync_gradients)
from tests._dist import run_workers

# ---- pure rank lists --------------------------------------------------------------


def test_rank_lists_world4_ep2():
    d = ParallelDims(world_size=4, ep_size=2, rank=3)
    assert d.ep_group_ranks() == [[0, 1], [2, 3]]
    assert d.edp_group_ranks() == [[0, 2], [1, 3]]
    assert (d.dp_size, d.edp_size, d.ep_rank, d.edp_rank) == (4, 2, 1, 1)
    assert (d.my_ep_ranks, d.my_edp_ranks) == ([2, 3], [1, 3])
    assert d.ep_group_name == "ep_size_2"
    assert list(d.local_experts(6)) == [3, 4, 5]


def test_rank_lists_world8_ep4():
    d = ParallelDims(world_size=8, ep_size=4, rank=6)
    assert d.ep_group_ranks() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert d.edp_group_ranks() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert (d.dp_size, d.edp_size, d.ep_rank, d.edp_rank) == (8, 2, 2, 1)
    assert (d.my_ep_ranks, d.my_edp_ranks) == ([4, 5, 6, 7], [2, 6])
    assert d.validate_experts(8) == 2 and list(d.local_experts(8)) == [4, 5]


@pytest.mark.parametrize("world, ep", [(1, 1), (4, 1), (4, 4), (4, 2), (8, 2), (8, 4), (16, 8), (12, 3)])
def test_rank_lists_match_deepspeed_layout(world, ep):
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    ds_ep, ds_edp = _get_expert_parallel_ranks(world, 1, ep)
    d = ParallelDims(world, ep, 0)
    assert d.ep_group_ranks() == ds_ep
    assert sorted(d.edp_group_ranks()) == sorted(ds_edp)
    # every rank's own lists are the groups that contain it
    for r in range(world):
        dr = ParallelDims(world, ep, r)
        assert r in dr.my_ep_ranks and r in dr.my_edp_ranks
        assert dr.my_ep_ranks[dr.ep_rank] == r and dr.my_edp_ranks[dr.edp_rank] == r


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=6, ep_size=4, rank=0), r"ep_size=4 must divide world_size=6 \(allowed ep_size: \[1, 2, 3, 6\]\)"),
    (dict(world_size=4, ep_size=0, rank=0), "ep_size=0"),
    (dict(world_size=0, ep_size=1, rank=0), "world_size=0"),
    (dict(world_size=4, ep_size=2, rank=4), r"rank=4 must be in 0..3"),
    (dict(world_size=4, ep_size=2, rank=-1), "rank=-1"),
])
def test_bad_dims(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


@pytest.mark.parametrize("num_experts", [0, 3, 6])
def test_validate_experts_rejects(num_experts):
    with pytest.raises(ValueError, match=f"num_experts={num_experts} must be a positive multiple of ep_size=4"):
        ParallelDims(8, 4, 0).validate_experts(num_experts)


def test_groups_need_build_and_init():
    d = ParallelDims(2, 2, 0)
    assert not d.is_built
    with pytest.raises(ValueError, match="build"):
        d.ep_comm
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="init_distributed"):
            d.build()


# ---- a toy expert-parallel model --------------------------------------------------
# h = tanh(x @ w_in); top-1 router over E experts (gate = chosen softmax prob);
# tokens go to their expert's EP rank by all-to-all, expert e computes rows @ w_e,
# the results come back; out = h + gate * y; loss = mean((out - target)^2).
# The reference holds all E experts in one process (ep 1, comm single).

H, E, B = 4, 6, 6        # hidden, experts, tokens per rank
NEVER, GROUP1_ONLY = 5, 4  # expert 5 gets no token; expert 4 only tokens of ranks >= 2


class ToyMoE(nn.Module):
    def __init__(self, ep_size: int, ep_rank: int, comm: ExpertParallelComm):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_in = nn.Parameter(torch.randn(H, H, generator=g) * 0.7)       # [H, H]
        self.w_router = nn.Parameter(torch.randn(H, E, generator=g))          # [H, E]
        all_experts = torch.randn(E, H, H, generator=g) * 0.5                 # [E, H, H], different per expert
        self.n_local = E // ep_size
        self.experts = nn.ParameterList(
            mark_expert_param(nn.Parameter(all_experts[ep_rank * self.n_local + l].clone()))
            for l in range(self.n_local))
        self.ep_size, self.comm = ep_size, comm

    def route(self, x_TH):
        h_TH = torch.tanh(x_TH @ self.w_in)                                   # [T, H]
        probs_TE = torch.softmax(h_TH @ self.w_router, dim=-1)                # [T, E]
        idx_T = probs_TE.argmax(-1)                                           # [T]
        return h_TH, probs_TE, idx_T

    def forward(self, x_TH, target_TH):
        h_TH, probs_TE, idx_T = self.route(x_TH)
        gate_T1 = probs_TE.gather(1, idx_T[:, None])                          # [T, 1]
        order_T = torch.argsort(idx_T, stable=True)
        h_sorted = h_TH[order_T]                                              # [T, H] grouped by expert
        counts_PL = torch.bincount(idx_T, minlength=E).view(self.ep_size, self.n_local)  # [P, L]
        recv_PL = self.comm.exchange_counts(counts_PL)                        # [P, L]
        in_splits, out_splits = counts_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        x_recv = self.comm.all_to_all(h_sorted, out_splits, in_splits)        # [M, H] by source, then expert
        chunks, off = [], 0
        for p in range(self.ep_size):
            for l in range(self.n_local):
                n = int(recv_PL[p, l])
                if n:  # an expert with no rows stays out of the graph (grad None)
                    chunks.append(x_recv[off:off + n] @ self.experts[l])
                off += n
        y_recv = torch.cat(chunks) if chunks else x_recv[:0]                  # [M, H]
        y_sorted = self.comm.all_to_all(y_recv, in_splits, out_splits)        # [T, H]
        y_TH = torch.zeros_like(h_TH).index_copy(0, order_T, y_sorted)        # [T, H]
        out_TH = h_TH + gate_T1 * y_TH
        return ((out_TH - target_TH) ** 2).mean(), in_splits


def make_batch(rank: int):
    """Rank's tokens: random, kept only if routed to an allowed expert (at init weights)."""
    ref = ToyMoE(1, 0, ExpertParallelComm.single())
    g = torch.Generator().manual_seed(1000 + rank)
    pool = torch.randn(400, H, generator=g)
    with torch.no_grad():
        idx = ref.route(pool)[2]
    allowed = torch.ones(E, dtype=torch.bool)
    allowed[NEVER] = False
    allowed[GROUP1_ONLY] = rank >= 2
    x = pool[allowed[idx]][:B]
    assert x.shape[0] == B
    target = torch.randn(B, H, generator=g)
    return x, target


def reference(world_size: int, max_norm: float = None, norm_type: float = 2.0):
    """Grads (and optionally clipped grads and total norm) of the one-process model."""
    model = ToyMoE(1, 0, ExpertParallelComm.single())
    batches = [make_batch(r) for r in range(world_size)]
    x = torch.cat([b[0] for b in batches])
    t = torch.cat([b[1] for b in batches])
    loss, _ = model(x, t)
    loss.backward()
    norm = None
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type).item()
    grads = {"w_in": model.w_in.grad, "w_router": model.w_router.grad}
    grads.update({f"expert{e}": model.experts[e].grad for e in range(E)})
    return grads, norm


def _np(t):
    # Worker results travel as numpy arrays: tensors would be shared through file
    # descriptors that vanish when the worker exits.
    return None if t is None else t.detach().numpy().copy()


def _grads_of(model: ToyMoE, dims: ParallelDims):
    out = {"w_in": _np(model.w_in.grad), "w_router": _np(model.w_router.grad)}
    for l, e in enumerate(dims.local_experts(E)):
        out[f"expert{e}"] = _np(model.experts[l].grad)
    return out


def _worker_grad_sync(rank, world_size, ep_size, max_norm, norm_type):
    dims = ParallelDims(world_size, ep_size, rank).build()
    model = ToyMoE(ep_size, dims.ep_rank, dims.ep_comm)
    x, t = make_batch(rank)
    loss, in_splits = model(x, t)
    loss.backward()
    local_none = {k: v is None for k, v in _grads_of(model, dims).items()}
    sync_gradients(model, dims, bucket_size_mb=1e-4)  # ~100-byte buckets: several per group
    synced = _grads_of(model, dims)
    norm = clip_grad_norm_(model, max_norm, dims, norm_type=norm_type).item() if max_norm else None
    clipped = _grads_of(model, dims)
    return dict(synced=synced, clipped=clipped, norm=norm, in_splits=in_splits, local_none=local_none,
                groups=_group_ranks(dims))


def _group_ranks(dims):
    return dict(ep=dist.get_process_group_ranks(dims.ep_group), edp=dist.get_process_group_ranks(dims.edp_group),
                world=dist.get_process_group_ranks(dims.world_group), ep_comm=(dims.ep_comm.size, dims.ep_comm.rank))


def _assert_grads_equal(got: dict, want: dict, what: str):
    for k, g in got.items():
        w = want[k]
        assert (g is None) == (w is None), f"{what} {k}: None mismatch (got {g is None}, want {w is None})"
        if g is not None:
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {k}: {m}")


def _check_grad_sync(world_size, ep_size, max_norm_frac, norm_type):
    ref_grads, _ = reference(world_size)
    total = reference(world_size, max_norm=1e9, norm_type=norm_type)[1]
    max_norm = max_norm_frac * total  # clipping active
    ref_clipped, ref_norm = reference(world_size, max_norm=max_norm, norm_type=norm_type)
    out = run_workers(_worker_grad_sync, world_size, args=(ep_size, max_norm, norm_type))
    dims0 = ParallelDims(world_size, ep_size, 0)
    for rank, o in enumerate(out):
        dims = ParallelDims(world_size, ep_size, rank)
        assert o["groups"]["ep"] == dims.my_ep_ranks and o["groups"]["edp"] == dims.my_edp_ranks
        assert o["groups"]["world"] == list(range(world_size))
        assert o["groups"]["ep_comm"] == (ep_size, dims.ep_rank)
        _assert_grads_equal(o["synced"], ref_grads, f"rank {rank} synced")
        _assert_grads_equal(o["clipped"], ref_clipped, f"rank {rank} clipped")
        assert o["norm"] == pytest.approx(ref_norm, rel=1e-5)
    return out, dims0


def test_grad_sync_and_clip_world4_ep2_match_single_process():
    out, _ = _check_grad_sync(world_size=4, ep_size=2, max_norm_frac=0.3, norm_type=2.0)
    # the data exercise what they should: uneven splits, an expert with tokens only
    # in EP group 1 (None locally on rank 1, a gradient on rank 3), one with none at all
    assert len({tuple(o["in_splits"]) for o in out}) > 1
    assert out[1]["local_none"]["expert4"] and not out[3]["local_none"]["expert4"]
    assert all(o["local_none"]["expert5"] for o in (out[1], out[3]))


def test_grad_sync_and_clip_world2_ep2_inf_norm():
    _check_grad_sync(world_size=2, ep_size=2, max_norm_frac=0.5, norm_type=math.inf)


def test_grad_sync_and_clip_world2_ep1():
    _check_grad_sync(world_size=2, ep_size=1, max_norm_frac=0.5, norm_type=2.0)


def test_expert_marking():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    assert mark_expert_param(p) is p
    assert is_expert_param(p) and not is_expert_param(q)


# ---- the EP all-to-all, forward and backward, against a hand computation ------------

# rows rank r sends to rank j: uneven, with an empty block (rank 1 -> rank 0)
SPLITS = [[1, 3], [0, 2]]


def _rows(src: int) -> torch.Tensor:
    n = sum(SPLITS[src])
    k = torch.arange(n, dtype=torch.float32)
    return torch.stack([100.0 * src + k, -(100.0 * src + k) - 0.5], dim=1)  # [N, 2]


def _worker_all_to_all(rank, world_size):
    dims = ParallelDims(world_size, world_size, rank).build()
    comm = dims.ep_comm
    x = _rows(rank).requires_grad_(True)
    in_splits = SPLITS[rank]
    out_splits = [SPLITS[j][rank] for j in range(world_size)]
    y = comm.all_to_all(x, out_splits, in_splits)
    coef = (rank + 1.0) * torch.arange(1, y.shape[0] + 1, dtype=torch.float32)[:, None]  # [M, 1]
    (y * coef).sum().backward()
    counts = comm.exchange_counts(torch.tensor([[rank * 10 + j, rank * 10 + j + 5] for j in range(world_size)]))
    return _np(y), _np(x.grad), _np(counts), _group_ranks(dims)


def test_ep_all_to_all_uneven_and_backward_by_hand():
    world = 2
    out = run_workers(_worker_all_to_all, world)
    for r, (y, grad, counts, groups) in enumerate(out):
        y, grad, counts = torch.from_numpy(y), torch.from_numpy(grad), torch.from_numpy(counts)
        # forward: blocks from every source in rank order, each the rows that source addressed to r
        want = torch.cat([_rows(j)[sum(SPLITS[j][:r]):sum(SPLITS[j][:r + 1])] for j in range(world)])
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        # backward: row i of my block for rank j sits at position m = (rows j got from
        # ranks < r) + i on rank j, whose loss weight there is (j + 1) * (m + 1)
        want_grad = []
        for j in range(world):
            before = sum(SPLITS[s][j] for s in range(r))
            for i in range(SPLITS[r][j]):
                want_grad.append([(j + 1.0) * (before + i + 1)] * 2)
        torch.testing.assert_close(grad, torch.tensor(want_grad).reshape(-1, 2), rtol=0, atol=0)
        # counts: row p = what rank p addressed to me
        torch.testing.assert_close(counts, torch.tensor([[p * 10 + r, p * 10 + r + 5] for p in range(world)]))
        assert groups["ep"] == [0, 1] and groups["edp"] == [r] and groups["ep_comm"] == (2, r)


# ---- DeepSpeed's own groups -------------------------------------------------------


def _worker_from_deepspeed(rank, world_size, ep_size):
    ours = ParallelDims(world_size, ep_size, rank).build()
    from moedist.train.deepspeed_setup import init_expert_groups

    theirs = init_expert_groups(ep_size)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=theirs.edp_group)  # the group really works
    return _group_ranks(ours), _group_ranks(theirs), t.item(), theirs.edp_size


def test_from_deepspeed_uses_the_same_layout():
    world, ep = 4, 2
    out = run_workers(_worker_from_deepspeed, world, args=(ep,))
    for rank, (ours, theirs, edp_sum, edp_size) in enumerate(out):
        assert ours == theirs
        assert theirs["ep"] == [rank - rank % ep + i for i in range(ep)]
        assert edp_sum == sum(theirs["edp"]) and edp_size == world // ep
