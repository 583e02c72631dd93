"""Host syncs of the MoE forward (issue 18: CUDA-graph safe with --no-stats).

`torch.cuda.set_sync_debug_mode` needs a GPU; `HostSyncCounter` (a TorchDispatchMode that
flags `aten._local_scalar_dense`, data-dependent output shapes and wraps `tolist`/`numpy`)
counts the same reads on CPU. Budgets per layer forward, EP size 1:
* grouped experts whose grouped kernel runs (bf16 on CPU, Hopper on GPU): 0, dropless and
  capacity, stats on or off (statistics are device tensors, read by the trainer once a step),
  and 0 in the backward;
* experts that loop over experts (fp32 grouped, MoE-LoRA fused): exactly 1 (the counts).
Before issue 18 the same forwards made 8 (dropless) and 11 (capacity) syncs.
"""
import pytest
import torch

from moedist.moe import GroupedExperts, MoELayer, MoELoRAExperts, Router
from moedist.moe.host_sync import HostSyncCounter
from moedist.train.metrics import StepStats

E, H, F, K, T = 8, 32, 64, 2, 48  # H, F: multiples of 16 bytes in bf16 (the grouped kernel's alignment)


class HostCountExperts(GroupedExperts):
    """The same experts, made to take host counts (the reference for the device-count path)."""

    def takes_device_counts(self, x_NH: torch.Tensor) -> bool:
        return False


def _layer(experts, cf, stats=True, router_type="token_choice", aux="switch"):
    torch.manual_seed(0)
    return MoELayer(Router(H, E, K, init_std=0.5, seed=1), experts, capacity_factor=cf, stats=stats,
                    router_type=router_type, aux_loss_type=aux, aux_loss_coef=0.01)


def _forward_syncs(layer, x):
    with HostSyncCounter() as syncs:
        y, aux = layer(x)
    return syncs.calls, y, aux


def test_counter_sees_every_kind_of_host_read():
    t = torch.arange(6)
    reads = [lambda: t.sum().item(), lambda: t.tolist(), lambda: int(t[0]), lambda: float(t[1]),
             lambda: bool(t[2]), lambda: t[t > 2], lambda: t.nonzero(), lambda: torch.bincount(t),
             lambda: torch.repeat_interleave(t, t), lambda: t.numpy()]
    for read in reads:
        with HostSyncCounter() as syncs:
            read()
        assert syncs.count == 1, syncs.calls
    with HostSyncCounter() as syncs:  # static shapes, no reads
        torch.zeros(6, dtype=torch.long).scatter_add_(0, t, t)
        torch.repeat_interleave(t, t, output_size=15)
        torch.argsort(t, stable=True)
    assert syncs.count == 0, syncs.calls
    assert torch.Tensor.tolist is not None and t.tolist() == list(range(6))  # restored after the block


@pytest.mark.parametrize("stats", [False, True], ids=["no_stats", "stats"])
@pytest.mark.parametrize("cf", [None, 1.0, 0.5], ids=["dropless", "cf1.0", "cf0.5"])
def test_grouped_kernel_forward_makes_no_host_sync(cf, stats):
    layer = _layer(GroupedExperts(E, H, F, dtype=torch.bfloat16, seed=3), cf, stats)
    x = torch.randn(2, T // 2, H, dtype=torch.bfloat16)
    calls, y, aux = _forward_syncs(layer, x)
    assert calls == []
    assert (aux.router_entropy is None) == (not stats) and (aux.dropped_frac is None) == (not stats)
    if stats:
        assert aux.router_entropy.dim() == 0 and aux.dropped_frac.dim() == 0
        assert float(aux.dropped_frac) == pytest.approx(int(aux.dropped_per_expert.sum()) / (T * K))
        assert (int(aux.dropped_per_expert.sum()) > 0) == (cf is not None)


@pytest.mark.parametrize("cf", [None, 1.0], ids=["dropless", "cf1.0"])
def test_grouped_kernel_backward_makes_no_host_sync(cf):
    layer = _layer(GroupedExperts(E, H, F, dtype=torch.bfloat16, seed=3), cf, stats=False)
    y, aux = layer(torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True))
    loss = y.float().square().sum() + aux.loss
    with HostSyncCounter() as syncs:
        loss.backward()
    assert syncs.calls == []


def test_expert_choice_on_device_makes_no_host_sync():
    layer = _layer(GroupedExperts(E, H, F, dtype=torch.bfloat16, seed=3), 1.0, stats=False,
                   router_type="expert_choice", aux="none")
    calls, _, _ = _forward_syncs(layer, torch.randn(T, H, dtype=torch.bfloat16))
    assert calls == []


@pytest.mark.parametrize("stats", [False, True], ids=["no_stats", "stats"])
@pytest.mark.parametrize("kind", ["grouped_fp32", "moelora_fused"])
@pytest.mark.parametrize("cf", [None, 1.0])
def test_per_expert_loops_read_the_counts_once(kind, cf, stats):
    experts = GroupedExperts(E, H, F, seed=3) if kind == "grouped_fp32" else MoELoRAExperts(E, H, F, 4, seed=3)
    calls, _, _ = _forward_syncs(_layer(experts, cf, stats), torch.randn(T, H))
    assert calls == ["tolist"]


@pytest.mark.parametrize("cf", [None, 1.0, 0.5], ids=["dropless", "cf1.0", "cf0.5"])
def test_device_counts_equal_host_counts(cf):
    """Padding rows (refused pairs) are masked: outputs and every gradient equal the host-count path."""
    results = []
    for cls in (GroupedExperts, HostCountExperts):
        layer = _layer(cls(E, H, F, dtype=torch.bfloat16, seed=3), cf)
        x = torch.randn(T, H, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(5)).requires_grad_()
        y, aux = layer(x)
        (y.float().square().sum() + aux.loss).backward()
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        results.append((y.detach(), grads, aux.tokens_per_expert))
    (y_dev, g_dev, n_dev), (y_host, g_host, n_host) = results
    assert torch.equal(n_dev, n_host)
    assert torch.equal(y_dev, y_host)
    for a, b in zip(g_dev, g_host):
        assert torch.isfinite(a.float()).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_stats_add_reads_nothing_and_reduce_matches_the_host_sums():
    class Out:  # the fields of CausalLMOutput that StepStats reads
        def __init__(self, auxes, lm_sum, n):
            self.moe_aux, self.lm_loss_sum, self.num_loss_tokens = auxes, torch.tensor(lm_sum), torch.tensor(n)
            self.aux_loss = torch.tensor(0.25)

    layers = [_layer(GroupedExperts(E, H, F, dtype=torch.bfloat16, seed=s), 0.5) for s in (3, 4)]
    stats = StepStats(len(layers), E)
    outs = []
    for m in range(2):
        x = torch.randn(T, H, dtype=torch.bfloat16)
        outs.append(Out([layer(x)[1] for layer in layers], 3.0 + m, 10))
        with HostSyncCounter() as syncs:
            stats.add(outs[-1], T)
        assert syncs.calls == []
    rec = stats.reduce()
    kept = sum(torch.stack([a.tokens_per_expert for a in o.moe_aux]) for o in outs)  # [L, E]
    dropped = sum(torch.stack([a.dropped_per_expert for a in o.moe_aux]) for o in outs)
    assert rec["expert_tokens"] == kept.tolist()
    assert rec["dropped_frac"] == pytest.approx(float(dropped.sum()) / float(kept.sum() + dropped.sum()))
    assert rec["lm_loss"] == pytest.approx(7.0 / 20) and rec["aux_loss"] == pytest.approx(0.25)
    ent = sum(float(a.router_entropy) for o in outs for a in o.moe_aux) / len(layers) / len(outs)
    assert rec["router_entropy"] == pytest.approx(ent)
