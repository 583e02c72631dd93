"""The implementations moedist is measured against, built on the same weights.

Every use of DeepSpeed and fairscale internals lives in this module (tested
with deepspeed 0.19.x and fairscale 0.4.x; internal names can change between
versions): process-group set-up, the gate's capacity, DeepSpeed's all-to-all.

Peers:
    deepspeed  `deepspeed.moe.layer.MoE` (GShard/Switch gating, [E, C, H] buffers).
    fairscale  `fairscale.nn.moe.MOELayer` + `Top2Gate` (capacity fixed at 2T/E,
               second expert sampled with Gumbel noise, dense one-hot [T, E, C] einsums).
    dense      one FFN of size K*F: the same active parameters and FLOPs per token.
    floor      only the per-expert FFN matmuls on tokens that are already sorted
               and split by expert: the compute no MoE layer can avoid.
    dense-lora a frozen FFN plus one LoRA adapter of rank r (the LoRA-MoE reference).

Expert and FFN forward passes here are written with plain torch ops (no moedist
code), so optimising moedist never changes a peer. Each takes `ffn_impl`
("plain" or "recompute", see ffns.py): the bench gives every impl the same one.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F_

from moedist.bench.ffns import _HiddenDown, ffn_forward
from moedist.moe.ffn import GATED, PLAIN


def _act(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return GATED[activation] if activation in GATED else PLAIN[activation]


def plain_ffn(x, w_gate, w_up, w_down, activation: str, ffn_impl: str = "plain") -> torch.Tensor:
    """(phi(x @ gate) * (x @ up)) @ down, or phi(x @ up) @ down; `ffn_impl` plain | recompute (ffns.py)."""
    return ffn_forward(x, w_gate, w_up, w_down, activation, ffn_impl)


# --------------------------------------------------------------------------- process groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device: torch.device) -> bool:
    """Initialise torch.distributed (world of 1 unless launched by torchrun) and
    DeepSpeed's communication backend, which its MoE layer needs even for EP=1.

    Returns True when this call created the group (pass it to `teardown_process_group`).
    """
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ or "MASTER_PORT" not in os.environ:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        created = True
    import deepspeed
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    return created


def teardown_process_group(created: bool) -> None:
    """Destroy a group made by `ensure_process_group` and forget DeepSpeed's cached groups."""
    import torch.distributed as dist

    _reset_deepspeed_groups()
    if created and dist.is_initialized():
        dist.destroy_process_group()
        try:  # DeepSpeed keeps its own handle on the backend
            import deepspeed.comm.comm as ds_cc

            ds_cc.cdb = None
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass


def _reset_deepspeed_groups() -> None:
    from deepspeed.utils import groups

    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        d = getattr(groups, name, None)
        if isinstance(d, dict):
            d.clear()
    # cached handles on the world group: stale once it is destroyed (a second bench run in one process)
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "mesh_device"):
        if getattr(groups, name, None) is not None:
            setattr(groups, name, None)


# --------------------------------------------------------------------------- experts


class PlainExpert(nn.Module):
    """One FFN expert in math orientation: w_gate/w_up [H, F], w_down [F, H]."""

    def __init__(self, w_gate: Optional[torch.Tensor], w_up: torch.Tensor, w_down: torch.Tensor, activation: str,
                 ffn_impl: str = "plain"):
        super().__init__()
        self.activation, self.ffn_impl = activation, ffn_impl
        self.w_gate = nn.Parameter(w_gate.detach().clone()) if w_gate is not None else None
        self.w_up = nn.Parameter(w_up.detach().clone())
        self.w_down = nn.Parameter(w_down.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_ffn(x, self.w_gate, self.w_up, self.w_down, self.activation, self.ffn_impl)


def expert_weights(experts, local: int):
    """(w_gate, w_up, w_down) of local expert `local` of a moedist GroupedExperts."""
    wg = experts.w_gate[local] if experts.w_gate is not None else None
    return wg, experts.w_up[local], experts.w_down[local]


# --------------------------------------------------------------------------- DeepSpeed


class DeepSpeedMoE(nn.Module):
    """`deepspeed.moe.layer.MoE` with moedist's router and expert weights copied in.

    forward(x [T, H]) -> y [T, H]. After a forward, `capacity` is the C that
    DeepSpeed used (for drop_tokens=False: the busiest expert's load), and
    `a2a_bytes()` the bytes of its [E, C, H] dispatch buffer (what its
    all-to-all sends; with EP=1 the buffer is built but not sent).
    """

    def __init__(self, router_weight_EH: torch.Tensor, experts, top_k: int, capacity_factor: Optional[float],
                 drop_tokens: bool, min_capacity: int = 4, ep_size: int = 1, ep_rank: int = 0, set_groups: bool = True,
                 ffn_impl: str = "plain"):
        super().__init__()
        from deepspeed.moe.layer import MoE

        E, H = router_weight_EH.shape
        L = E // ep_size
        template = PlainExpert(*expert_weights(experts, 0), activation=experts.activation, ffn_impl=ffn_impl)
        cf = capacity_factor or 1.0  # unused when drop_tokens=False
        self.moe = MoE(H, template, num_experts=E, ep_size=ep_size, k=top_k,
                       capacity_factor=cf, eval_capacity_factor=cf,
                       min_capacity=min_capacity, drop_tokens=drop_tokens, use_rts=False,
                       top2_2nd_expert_sampling=False)  # deterministic top-2, as moedist
        if set_groups:  # a DeepSpeed engine calls it itself (and refuses a second call)
            self.moe.set_deepspeed_parallelism()
        self.num_experts, self.hidden, self.capacity = E, H, None
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(router_weight_EH)
            ds_experts = self.moe.deepspeed_moe.experts.deepspeed_experts
            for l in range(L):
                g = ep_rank * L + l  # DeepSpeed places global expert g on rank g // L
                src = g - experts.first_expert  # its local slot (the `Experts` layout)
                if not 0 <= src < experts.num_local:
                    raise ValueError(f"DeepSpeedMoE: experts hold [{experts.first_expert}, "
                                     f"{experts.first_expert + experts.num_local}), not expert {g} of EP rank {ep_rank}")
                wg, wu, wd = expert_weights(experts, src)
                if wg is not None:
                    ds_experts[l].w_gate.copy_(wg)
                ds_experts[l].w_up.copy_(wu)
                ds_experts[l].w_down.copy_(wd)
        self.moe.deepspeed_moe.gate.register_forward_hook(self._capture_capacity)

    def _capture_capacity(self, _mod, _inp, out) -> None:
        self.capacity = int(out[1])  # (l_aux, C, E, indices, locations, gates, exp_counts)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        y, _l_aux, _counts = self.moe(x_TH)
        return y

    def forward_with_aux(self, x: torch.Tensor):
        """(y, l_aux, exp_counts) as DeepSpeed returns them (any leading shape)."""
        return self.moe(x)

    def a2a_bytes(self, element_size: int) -> int:
        return int(self.num_experts * (self.capacity or 0) * self.hidden * element_size)


@contextlib.contextmanager
def timed_deepspeed_all_to_all(record: Callable[[str, float, int], None]):
    """Time DeepSpeed's MoE all-to-all: `record(direction, seconds, bytes)` per call.

    Swaps `deepspeed.moe.sharded_moe._AllToAll` for a subclass while active.
    """
    from deepspeed.moe import sharded_moe

    base = sharded_moe._AllToAll

    class _Timed(base):
        @staticmethod
        def forward(ctx, group, inp):
            t0 = time.perf_counter()
            out = base.forward(ctx, group, inp)
            _sync(inp)
            record("fwd", time.perf_counter() - t0, inp.numel() * inp.element_size())
            return out

        @staticmethod
        def backward(ctx, grad):
            # the same exchange as base.backward, done here so that it is not recorded as a forward
            from deepspeed import comm as ds_dist

            t0 = time.perf_counter()
            grad = grad.contiguous()
            out = torch.empty_like(grad)
            ds_dist.all_to_all_single(out, grad, group=ctx.group)
            _sync(grad)
            record("bwd", time.perf_counter() - t0, grad.numel() * grad.element_size())
            return None, out

    sharded_moe._AllToAll = _Timed
    try:
        yield
    finally:
        sharded_moe._AllToAll = base


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


# --------------------------------------------------------------------------- fairscale


def fairscale_supports(num_tokens: int, num_experts: int, top_k: int, max_bytes: float = 2.0 * 2**30) -> Optional[str]:
    """None when fairscale's MOELayer can run this shape, else why not."""
    if top_k != 2:
        return "fairscale's Top2Gate is top-2 only"
    if num_tokens % num_experts:
        return f"Top2Gate needs tokens % experts == 0 ({num_tokens} % {num_experts})"
    sec_bytes = num_tokens * num_experts * (2 * num_tokens // num_experts) * 4
    if sec_bytes > max_bytes:
        return f"its dense [T, E, C] masks need {sec_bytes / 2**30:.1f} GiB each"
    return None


class FairscaleMoE(nn.Module):
    """`fairscale.nn.moe.MOELayer` with its `Top2Gate`; router and expert weights copied in.

    Top2Gate fixes capacity at 2T/E (capacity factor 1.0) and samples the second
    expert with Gumbel noise, so its routing differs from the others'.
    """

    def __init__(self, router_weight_EH: torch.Tensor, experts, ffn_impl: str = "plain"):
        super().__init__()
        import torch.distributed as dist
        from fairscale.nn.moe import MOELayer, Top2Gate

        E, H = router_weight_EH.shape
        gate = Top2Gate(H, E)
        with torch.no_grad():
            gate.wg.weight.copy_(router_weight_EH)
        mods = nn.ModuleList([PlainExpert(*expert_weights(experts, e), activation=experts.activation, ffn_impl=ffn_impl)
                              for e in range(E)])
        self.layer = MOELayer(gate, mods, group=dist.group.WORLD)
        self.num_experts, self.hidden = E, H

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        T, H = x_TH.shape
        y = self.layer(x_TH.reshape(self.num_experts, T // self.num_experts, H))  # [S, T/S, H], as it asks
        return y.reshape(T, H)

    def capacity(self, num_tokens: int) -> int:
        return 2 * num_tokens // self.num_experts

    def a2a_bytes(self, num_tokens: int, element_size: int) -> int:
        return int(self.num_experts * self.capacity(num_tokens) * self.hidden * element_size)


# --------------------------------------------------------------------------- dense, floor, dense-lora


class DenseFFN(nn.Module):
    """One FFN of size ffn_size (= K * F for the MoE of top-K experts of size F)."""

    def __init__(self, hidden: int, ffn_size: int, activation: str, init_std: float = 0.02, seed: int = 0,
                 dtype=torch.float32, device=None, ffn_impl: str = "plain"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.activation, self.ffn_impl = activation, ffn_impl

        def draw(*shape):
            return nn.Parameter((torch.randn(*shape, generator=g) * init_std).to(dtype=dtype, device=device))

        self.w_gate = draw(hidden, ffn_size) if activation in GATED else None
        self.w_up = draw(hidden, ffn_size)
        self.w_down = draw(ffn_size, hidden)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return plain_ffn(x_TH, self.w_gate, self.w_up, self.w_down, self.activation, self.ffn_impl)


class FloorExperts(nn.Module):
    """Per-expert FFN matmuls on inputs already split by expert, nothing else.

    The inputs are leaves prepared outside the step (`inputs`), one [n_e, H]
    tensor per expert; forward returns the list of per-expert outputs.
    """

    def __init__(self, experts, counts: Sequence[int], x_sorted_NH: torch.Tensor, ffn_impl: str = "plain"):
        super().__init__()
        self.activation = experts.activation
        self.blocks = nn.ModuleList([PlainExpert(*expert_weights(experts, e), activation=experts.activation,
                                                 ffn_impl=ffn_impl)
                                     for e in range(len(counts))])
        self.counts = [int(c) for c in counts]
        self.inputs: List[torch.Tensor] = [xs.detach().clone().requires_grad_(True)
                                           for xs in x_sorted_NH.split(self.counts)]

    def forward(self) -> List[torch.Tensor]:
        return [blk(xs) for blk, xs, c in zip(self.blocks, self.inputs, self.counts) if c > 0]

    def clear_input_grads(self) -> None:
        for xs in self.inputs:
            xs.grad = None


class DenseLoRA(nn.Module):
    """Frozen FFN (w_gate/w_up [H, F], w_down [F, H]) with one LoRA adapter of rank r
    on each projection: W x + (alpha / r) x A B. The LoRA-MoE cost reference."""

    def __init__(self, w_gate, w_up, w_down, rank: int, activation: str, alpha: Optional[float] = None, seed: int = 0,
                 ffn_impl: str = "plain"):
        super().__init__()
        self.activation, self.scaling = activation, float(rank if alpha is None else alpha) / rank
        self.ffn_impl = ffn_impl
        self.w_gate = nn.Parameter(w_gate.detach().clone(), requires_grad=False) if w_gate is not None else None
        self.w_up = nn.Parameter(w_up.detach().clone(), requires_grad=False)
        self.w_down = nn.Parameter(w_down.detach().clone(), requires_grad=False)
        g = torch.Generator().manual_seed(seed)
        H, F = w_up.shape
        dev, dt = w_up.device, w_up.dtype

        def pair(d_in, d_out):
            a = nn.Parameter(((torch.rand(d_in, rank, generator=g) * 2 - 1) * (3.0 / d_in) ** 0.5).to(dev, dt))
            b = nn.Parameter((torch.randn(rank, d_out, generator=g) * 0.01).to(dev, dt))
            return a, b

        self.lora_A_gate, self.lora_B_gate = pair(H, F) if w_gate is not None else (None, None)
        self.lora_A_up, self.lora_B_up = pair(H, F)
        self.lora_A_down, self.lora_B_down = pair(F, H)

    def _proj(self, x, w, a, b):
        return x @ w + self.scaling * ((x @ a) @ b)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        up = self._proj(x_TH, self.w_up, self.lora_A_up, self.lora_B_up)
        if self.ffn_impl == "recompute":  # h and the down projection (+ its LoRA) in one node that recomputes h
            gate = self._proj(x_TH, self.w_gate, self.lora_A_gate, self.lora_B_gate) if self.w_gate is not None else None
            return _HiddenDown.apply(gate, up, self.w_down, self.lora_A_down, self.lora_B_down, self.scaling,
                                     self.activation)
        if self.w_gate is not None:
            h = _act(self.activation)(self._proj(x_TH, self.w_gate, self.lora_A_gate, self.lora_B_gate)) * up
        else:
            h = _act(self.activation)(up)
        return self._proj(h, self.w_down, self.lora_A_down, self.lora_B_down)
