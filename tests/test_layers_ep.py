"""SparseMLPWithLoRA in expert-parallel mode (process_group given), 2 and 4 gloo processes.

Each rank passes its OWN tokens (different counts, one rank with none). The
reference is a world_size=1 layer in the same process: every rank's output and
input gradient must equal the reference applied to that rank's tokens, each
local expert's gradient must equal the reference expert's gradient from all
ranks' tokens together, and the router gradients summed over ranks must equal
the reference router gradient.
"""
import torch
import torch.distributed as dist

from moedist.layers import MLPActivationType, SparseMLPWithLoRA
from tests._dist import run_workers

H = 6

# (name, layer kwargs, tokens per rank for ws=2, tokens per rank for ws=4, input shape kind)
CASES = [
    ("silu_k2_lora", dict(ffh_size=32, num_experts=4, moe_topk=2, lora_rank=2, lora_alpha=4.0),
     [7, 0], [5, 0, 9, 2], "flat"),
    ("gelu_k1_8experts", dict(ffh_size=32, num_experts=8, moe_topk=1, activation_type=MLPActivationType.GELU),
     [3, 11], [1, 6, 0, 4], "3d"),
    ("bilinear_k3_lora", dict(ffh_size=24, num_experts=4, moe_topk=3, lora_rank=1, init_std=0.5, init_base_seed=7),
     [0, 5], [3, 3, 3, 0], "flat"),
    ("all_empty", dict(ffh_size=16, num_experts=4, moe_topk=2), [0, 0], [0, 0, 0, 0], "flat"),
]


def _inputs(counts, kind, seed):
    """Every rank's input and output-gradient, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    xs, gs = [], []
    for n in counts:
        shape = (1, n, H) if kind == "3d" else (n, H)
        xs.append(torch.randn(shape, generator=g))
        gs.append(torch.randn(shape, generator=g))
    return xs, gs


def _max_err(a, b):
    return 0.0 if a.numel() == 0 else (a - b).abs().max().item()


def _worker(rank, world_size, cases):
    torch.manual_seed(1234 + rank)  # EP must not depend on the global RNG
    report = []
    for name, kw, counts_2, counts_4, kind in cases:
        counts = counts_2 if world_size == 2 else counts_4
        xs, gs = _inputs(counts, kind, seed=len(name))

        ep = SparseMLPWithLoRA(H, rank=rank, world_size=world_size, process_group=dist.group.WORLD, **kw)
        ref = SparseMLPWithLoRA(H, **kw)
        nle = ep.num_local_experts

        x = xs[rank].clone().requires_grad_(True)
        out = ep(x)
        (out * gs[rank]).sum().backward()

        ref_xs = [t.clone().requires_grad_(True) for t in xs]
        ref_outs = [ref(t) for t in ref_xs]
        sum((o * g).sum() for o, g in zip(ref_outs, gs)).backward()

        errs = {"out": _max_err(out, ref_outs[rank]), "x_grad": _max_err(x.grad, ref_xs[rank].grad)}
        assert out.shape == xs[rank].shape and out.dtype == xs[rank].dtype
        for j, expert in enumerate(ep.experts):
            ref_expert = ref.experts[rank * nle + j]
            for (pname, p), q in zip(expert.named_parameters(), ref_expert.parameters()):
                assert torch.equal(p.detach(), q.detach()), (name, j, pname)  # same weights by global index
                gp = torch.zeros_like(p) if p.grad is None else p.grad
                gq = torch.zeros_like(q) if q.grad is None else q.grad
                errs[f"expert{j}.{pname}.grad"] = _max_err(gp, gq)
        # Own-token router gradient; the ranks' sum is checked against the reference in the parent.
        gate_grad = torch.zeros_like(ep.gate) if ep.gate.grad is None else ep.gate.grad.clone()
        ref_gate = torch.zeros_like(ref.gate) if ref.gate.grad is None else ref.gate.grad.clone()
        # Plain lists, not tensors: a tensor result travels as a shared-memory fd that
        # can vanish when the worker exits before the parent reads it.
        report.append((name, errs, gate_grad.tolist(), ref_gate.tolist()))
    return report


def _check(world_size):
    results = run_workers(_worker, world_size, args=(CASES,))
    for c, case in enumerate(CASES):
        name = case[0]
        for rank, rep in enumerate(results):
            rname, errs, _, _ = rep[c]
            assert rname == name
            bad = {k: v for k, v in errs.items() if not v <= 1e-5}
            assert not bad, f"ws={world_size} rank={rank} case={name}: {bad}"
        gate_sum = sum(torch.tensor(rep[c][2]) for rep in results)
        ref_gate = torch.tensor(results[0][c][3])
        torch.testing.assert_close(gate_sum, ref_gate, rtol=1e-5, atol=1e-5, msg=f"ws={world_size} {name} router grad")


def test_expert_parallel_two_ranks():
    _check(2)


def test_expert_parallel_four_ranks():
    _check(4)


def _error_worker(rank, world_size):
    msgs = []
    for kw in (dict(world_size=world_size + 2, rank=rank), dict(world_size=world_size, rank=(rank + 1) % world_size)):
        try:
            SparseMLPWithLoRA(H, 16, num_experts=4, process_group=dist.group.WORLD, **kw)
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def test_process_group_must_match_world_size_and_rank():
    msgs = run_workers(_error_worker, 2)[0]
    assert len(msgs) == 2 and "world_size" in msgs[0] and "rank" in msgs[1]
