"""Shared pieces of the expert-parallel (EP) equivalence checks.

One configuration (`EPConfig`) describes a tiny MoE layer and each rank's
micro-batch. The same layer is run two ways:

* `run_ep_rank`: in a real process group, rank r holds experts
  [ep_rank * L, (ep_rank + 1) * L) (`GroupedExperts(..., num_local=L,
  first_expert=ep_rank * L)`), runs its own micro-batch, calls the gradient
  sync hook (`moedist.distributed.sync_gradients`) and steps its optimizer.
* `run_reference`: ONE process holding all E experts runs the layer on each
  rank's micro-batch separately (so capacity is decided per rank, GShard-style),
  averages the per-rank losses and steps.

`compare_rank` then checks one rank's record against the reference: outputs,
losses, input gradients, synced gradients and weights after every step (its
expert shard against the reference's slice), per-expert token and drop counts,
and the bytes on the wire. Byte and token counts are recomputed here by a
naive Python loop over the routing (`naive_route`), not taken from the layer.

Steps: SGD (lr 0.1), then Adam (lr 0.01) twice (the second with Adam state).
Everything is fp32 on CPU unless a device is given; tolerance 1e-5.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from moedist.distributed.comm import ExpertParallelComm
from moedist.moe.dispatcher import TokenDispatcher
from moedist.distributed import is_expert_param
from moedist.moe.experts import GroupedExperts, LoRAOnExperts, MoELoRAExperts
from moedist.moe.layer import MoELayer
from moedist.moe.router import Router
from moedist.moe.shared import SharedExperts

ATOL = RTOL = 1e-5
SGD_LR, ADAM_LR = 0.1, 0.01
ROUTES = ("random", "half", "one")
EXPERT_KINDS = ("grouped", "moelora", "loraon")


@dataclass(frozen=True)
class EPConfig:
    """A tiny MoE layer and the micro-batch of every rank.

    seq: tokens per sequence for rank r is seq[r % len(seq)] (batch 2), so ranks
        get different token counts; 0 gives a rank no tokens at all.
    route: "random" (router as initialised), "half" (the ranks in `forced` send
        every token to experts [0, E/2)), "one" (every token's first choice is
        expert `one_expert`).
    """

    name: str
    E: int = 8
    H: int = 8
    F: int = 6
    K: int = 2
    cf: Optional[float] = 1.0  # None: dropless
    experts: str = "grouped"
    shared: bool = False
    shared_gated: bool = False
    drop_policy: str = "position"
    min_capacity: int = 0
    score_func: str = "softmax"
    aux_type: str = "switch"
    activation: str = "swiglu"
    lora_rank: int = 2
    shared_rank: int = 0  # moelora: rank of the shared LoRA expert (replicated, averaged over the world)
    batch: int = 2
    seq: Tuple[int, ...] = (4, 5, 6, 3)
    route: str = "random"
    forced: Tuple[int, ...] = ()
    one_expert: int = 0
    seed: int = 0
    steps: Tuple[str, ...] = ("sgd", "adam", "adam")
    router_type: str = "token_choice"  # expert_choice: set aux_type="none" (per-rank choice, like capacity)

    def tokens(self, rank: int) -> int:
        return self.batch * self.seq[rank % len(self.seq)]


# ---- building the layer and the data ------------------------------------------------


def build_layer(cfg: EPConfig, comm: ExpertParallelComm, ep_rank: int, ep_size: int) -> MoELayer:
    """The MoE layer of EP rank `ep_rank` out of `ep_size` (ep_size 1: all experts)."""
    if cfg.experts not in EXPERT_KINDS or cfg.route not in ROUTES:
        raise ValueError(f"bad config {cfg}")
    E, H, F = cfg.E, cfg.H, cfg.F
    L = E // ep_size
    first = ep_rank * L
    router = Router(H, E, cfg.K, score_func=cfg.score_func, init_std=1.0, seed=cfg.seed + 1)
    with torch.no_grad():
        w = router.weight  # [E, H]
        if cfg.route == "half":  # feature 0 > 0 pushes towards experts [0, E/2)
            w[:, 0] = torch.where(torch.arange(E) < E // 2, 6.0, -6.0)
        elif cfg.route == "one":
            w[:, 0] = -6.0
            w[cfg.one_expert, 0] = 6.0
    ekw = dict(num_local=L, first_expert=first, seed=cfg.seed + 2, init_std=0.3, activation=cfg.activation)
    if cfg.experts == "grouped":
        experts = GroupedExperts(E, H, F, **ekw)
    elif cfg.experts == "moelora":
        experts = MoELoRAExperts(E, H, F, lora_rank=cfg.lora_rank, lora_alpha=4.0, shared_rank=cfg.shared_rank, **ekw)
    else:
        experts = LoRAOnExperts(E, H, F, lora_rank=cfg.lora_rank, lora_alpha=4.0, **ekw)
    if cfg.experts != "grouped":
        _set_lora_B(experts, cfg.seed)
    shared = None
    if cfg.shared:
        shared = SharedExperts(H, 2 * F, activation=cfg.activation, gated=cfg.shared_gated, init_std=0.3, seed=cfg.seed + 3)
    return MoELayer(router, experts, shared, TokenDispatcher(E, comm), capacity_factor=cfg.cf,
                    min_capacity=cfg.min_capacity, drop_policy=cfg.drop_policy, aux_loss_type=cfg.aux_type,
                    aux_loss_coef=0.01, z_loss_coef=1e-3, router_type=cfg.router_type)


@torch.no_grad()
def _set_lora_B(experts, seed: int) -> None:
    """LoRA B starts at zero, which would hide the adapters from the first forward:
    give every expert a non-zero B drawn from a generator seeded by its global id."""
    for i, (name, stack) in enumerate(sorted(experts.lora.items())):
        for l in range(experts.num_local):
            g = torch.Generator().manual_seed(seed * 7919 + (experts.first_expert + l) * 31 + i)
            stack.lora_B[l].copy_(torch.randn(stack.lora_B.shape[1:], generator=g) * 0.3)
    shared = experts.lora_shared if isinstance(experts, MoELoRAExperts) else {}
    for i, (name, sh) in enumerate(sorted(shared.items())):  # the shared LoRA expert: replicated, same on every rank
        g = torch.Generator().manual_seed(seed * 7919 + 997 + i)
        sh.lora_B.copy_(torch.randn(sh.lora_B.shape, generator=g) * 0.3)


def make_batch(cfg: EPConfig, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank r's micro-batch x [B, S_r, H] and regression target, the same in every process."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    S = cfg.seq[rank % len(cfg.seq)]
    x = torch.randn(cfg.batch, S, cfg.H, generator=g)
    tgt = torch.randn(cfg.batch, S, cfg.H, generator=g)
    if cfg.route == "one" or (cfg.route == "half" and rank in cfg.forced):
        x[..., 0] = 3.0 + x[..., 0].abs()
    return x, tgt


def micro_loss(y: torch.Tensor, tgt: torch.Tensor, aux) -> torch.Tensor:
    """Mean squared error over this micro-batch's tokens (0 for no tokens) + aux loss."""
    T = y.shape[0] * y.shape[1]
    return ((y - tgt) ** 2).sum() / max(T, 1) + aux.loss


def is_expert(p: torch.Tensor) -> bool:
    """Expert-sharded parameter (the tag `sync_gradients` reduces over the EDP group)."""
    return is_expert_param(p)


class _SGD:
    """p -= lr * g. (Hand-written like _Adam: `torch.optim` imports torch._dynamo on
    first use, about 8 s per process here, which every worker would pay.)"""

    def __init__(self, params, lr: float):
        self.params, self.lr = list(params), lr

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:  # like torch.optim: a parameter without a gradient is skipped
                p.add_(p.grad, alpha=-self.lr)


class _Adam:
    """Adam (Kingma & Ba 2015) with torch.optim.Adam's defaults: betas (0.9, 0.999), eps 1e-8."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))


def _optimizers(layer: torch.nn.Module) -> dict:
    params = [p for p in layer.parameters() if p.requires_grad]
    return {"sgd": _SGD(params, lr=SGD_LR), "adam": _Adam(params, lr=ADAM_LR)}


def _grad(p: torch.Tensor) -> torch.Tensor:
    """A copy of p's gradient; zeros for None (no token reached it), in both runs alike."""
    return p.grad.detach().cpu().clone() if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype)


def _snapshot(layer: torch.nn.Module) -> dict:
    return {n: p.detach().cpu().clone() for n, p in layer.named_parameters()}


# ---- recording the bytes that really go on the wire -----------------------------------


@contextlib.contextmanager
def record_all_to_all(log: list):
    """Log every `torch.distributed.all_to_all_single` call (the layer's only
    collective that moves activations): tensor shapes, dtypes and splits."""
    orig = dist.all_to_all_single

    def spy(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        log.append(dict(in_shape=tuple(input.shape), out_shape=tuple(output.shape), dtype=str(input.dtype),
                        elem=input.element_size(),
                        in_splits=None if input_split_sizes is None else [int(s) for s in input_split_sizes],
                        out_splits=None if output_split_sizes is None else [int(s) for s in output_split_sizes]))
        return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = spy
    try:
        yield log
    finally:
        dist.all_to_all_single = orig


# ---- the two runs ----------------------------------------------------------------------


def run_ep_rank(cfg: EPConfig, dims, rank: int, device: str = "cpu") -> dict:
    """Train this rank's shard for cfg.steps; return what compare_rank checks.

    dims: a built `ParallelDims` (ep_size, ep_rank, ep_comm, world_size).
    """
    from moedist.distributed import sync_gradients

    layer = build_layer(cfg, dims.ep_comm, dims.ep_rank, dims.ep_size).to(device)
    opts = _optimizers(layer)
    x, tgt = (t.to(device) for t in make_batch(cfg, rank))
    rec = dict(rank=rank, ep=dims.ep_size, ep_rank=dims.ep_rank, steps=[], init=_snapshot(layer),
               expert_params=sorted(n for n, p in layer.named_parameters() if is_expert(p)))
    for opt_name in cfg.steps:
        xl = x.clone().requires_grad_(True)
        wire: list = []
        with record_all_to_all(wire):
            y, aux = layer(xl)
            loss = micro_loss(y, tgt, aux)
            layer.zero_grad(set_to_none=True)
            loss.backward()
        sync_gradients(layer, dims)
        grads = {n: _grad(p) for n, p in layer.named_parameters() if p.requires_grad}
        opts[opt_name].step()
        rec["steps"].append(dict(
            y=y.detach().cpu(), loss=float(loss.detach()), aux_loss=float(aux.loss.detach()), xgrad=xl.grad.detach().cpu(),
            grads=grads, weights=_snapshot(layer), stats=dict(layer.dispatcher.last_stats),
            aux_a2a_bytes=aux.a2a_bytes, tpe=aux.tokens_per_expert.cpu(), dropped=aux.dropped_per_expert.cpu(),
            dropped_ep_sum=dims.ep_comm.all_reduce_sum(aux.dropped_per_expert).cpu(), wire=wire))
    return rec


def run_reference(cfg: EPConfig, world: int, device: str = "cpu") -> dict:
    """One process, all experts, every rank's micro-batch run separately; mean loss."""
    layer = build_layer(cfg, ExpertParallelComm.single(), 0, 1).to(device)
    opts = _optimizers(layer)
    batches = [tuple(t.to(device) for t in make_batch(cfg, r)) for r in range(world)]
    rec = dict(steps=[], init=_snapshot(layer))
    for opt_name in cfg.steps:
        naive = [naive_route(cfg, layer.router.weight.detach().cpu(), x.cpu()) for x, _ in batches]
        xs = [x.clone().requires_grad_(True) for x, _ in batches]
        outs = [layer(x) for x in xs]
        losses = [micro_loss(y, t, aux) for (y, aux), (_, t) in zip(outs, batches)]
        layer.zero_grad(set_to_none=True)
        (sum(losses) / world).backward()
        grads = {n: _grad(p) for n, p in layer.named_parameters() if p.requires_grad}
        opts[opt_name].step()
        rec["steps"].append(dict(
            y=[y.detach().cpu() for y, _ in outs], loss=[float(l.detach()) for l in losses],
            aux_loss=[float(a.loss.detach()) for _, a in outs], xgrad=[x.grad.detach().cpu() for x in xs],
            grads=grads, weights=_snapshot(layer), tpe=[a.tokens_per_expert.cpu() for _, a in outs],
            dropped=[a.dropped_per_expert.cpu() for _, a in outs], naive=naive))
    return rec


def naive_route(cfg: EPConfig, router_w_EH: torch.Tensor, x_BSH: torch.Tensor) -> dict:
    """Kept and dropped (token, slot) pairs per expert by a plain loop.

    Top-k of softmax (or sigmoid) of x W^T; capacity max(min_capacity,
    ceil(cf * T * K / E)) per expert, from this rank's own T tokens. (Which pairs are kept depends on the drop policy; how many
    does not.)
    """
    E, K = cfg.E, cfg.K
    x = x_BSH.reshape(-1, cfg.H).float()
    T = x.shape[0]
    logits = x @ router_w_EH.float().t()  # [T, E]
    scores = torch.softmax(logits, dim=-1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
    idx = scores.topk(K, dim=-1).indices  # [T, K]
    routed = [0] * E
    for e in idx.reshape(-1).tolist():
        routed[e] += 1
    if cfg.cf is None:
        return dict(kept=routed, dropped=[0] * E, T=T)
    cap = max(cfg.min_capacity, math.ceil(Fraction(str(cfg.cf)) * T * K / E))
    # whichever pairs the policy picks, an expert keeps min(capacity, routed) of them
    kept = [min(cap, n) for n in routed]
    return dict(kept=kept, dropped=[r - k for r, k in zip(routed, kept)], T=T)


# ---- comparison ------------------------------------------------------------------------


def _close(errs: list, kind: str, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.detach().cpu().float(), want.detach().cpu().float()
    if got.shape != want.shape:
        errs.append((kind, f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"))
        return
    if got.numel() == 0:
        return
    # 1e-5 relative to the tensor's scale: an element-wise rtol on a gradient whose entries span
    # six orders of magnitude (one hot expert: |ref| max ~3e3) measures fp32 cancellation noise,
    # which differs between CPU kernels (AVX2 vs AVX-512 accumulation order), not correctness.
    scale = max(1.0, float(want.abs().max()))
    if not torch.allclose(got, want, atol=ATOL * scale, rtol=RTOL) or not torch.isfinite(got).all():
        errs.append((kind, f"{what}: max |diff| {float((got - want).abs().max()):.3g} "
                           f"(|ref| max {float(want.abs().max()):.3g})"))


def compare_rank(cfg: EPConfig, world: int, rec: dict, ref: dict, tags: Optional[torch.nn.Module] = None) -> List[Tuple[str, str]]:
    """Every difference between one rank's record and the reference.

    Returns (kind, message) pairs; kind is one of "forward" (outputs, losses),
    "grad" (input and synced parameter gradients), "weights" (initial shard and
    after each step), "counts" (tokens/drops per expert), "dropped_sum"
    (all_reduce_sum of drops over the EP group) and "wire" (all-to-all bytes).
    """
    errs: List[Tuple[str, str]] = []
    r, ep, ep_rank = rec["rank"], rec["ep"], rec["ep_rank"]
    E = cfg.E
    L = E // ep
    first = ep_rank * L
    group = [r - ep_rank + q for q in range(ep)]  # my EP group: consecutive ranks
    tags = tags or build_layer(cfg, ExpertParallelComm.single(), 0, 1)
    experts = {n for n, p in tags.named_parameters() if is_expert(p)}

    def want_of(name: str, t: torch.Tensor) -> torch.Tensor:  # a rank holds rows [first, first + L) of an expert param
        return t[first:first + L] if name in experts else t

    tag = f"[{cfg.name} world={world} ep={ep} rank={r}]"
    for name, t in rec["init"].items():
        _close(errs, "weights", f"{tag} initial {name}", t, want_of(name, ref["init"][name]))
    for s, (got, want) in enumerate(zip(rec["steps"], ref["steps"])):
        st = f"{tag} step {s} ({cfg.steps[s]})"
        _close(errs, "forward", f"{st} output", got["y"], want["y"][r])
        _close(errs, "forward", f"{st} loss", torch.tensor(got["loss"]), torch.tensor(want["loss"][r]))
        _close(errs, "forward", f"{st} aux loss", torch.tensor(got["aux_loss"]), torch.tensor(want["aux_loss"][r]))
        # the reference differentiates the mean of `world` losses, a rank only its own
        _close(errs, "grad", f"{st} input grad", got["xgrad"] / world, want["xgrad"][r])
        if set(got["grads"]) != set(want["grads"]):
            errs.append(("grad", f"{st} trainable parameters {sorted(got['grads'])} != {sorted(want['grads'])}"))
        for name, g in got["grads"].items():
            if name in want["grads"]:
                _close(errs, "grad", f"{st} grad {name}", g, want_of(name, want["grads"][name]))
        for name, p in got["weights"].items():
            _close(errs, "weights", f"{st} weight after step {name}", p, want_of(name, want["weights"][name]))
        naive = want["naive"]
        for what, key, got_key in (("tokens_per_expert", "kept", "tpe"), ("dropped_per_expert", "dropped", "dropped")):
            if got[got_key].tolist() != naive[r][key]:
                errs.append(("counts", f"{st} {what} {got[got_key].tolist()} != naive count {naive[r][key]}"))
            if want[got_key][r].tolist() != naive[r][key]:
                errs.append(("counts", f"{st} reference {what} {want[got_key][r].tolist()} != naive count {naive[r][key]}"))
        drop_sum = [sum(naive[q]["dropped"][e] for q in group) for e in range(E)]
        if got["dropped_ep_sum"].tolist() != drop_sum:
            errs.append(("dropped_sum", f"{st} all_reduce_sum(dropped_per_expert) {got['dropped_ep_sum'].tolist()} "
                                        f"!= reference total over ranks {group}: {drop_sum}"))
        errs += [("wire", m) for m in _check_wire(cfg, st, got, naive, r, ep, ep_rank, group, L)]
    return errs


def _check_wire(cfg: EPConfig, st: str, got: dict, naive: list, r: int, ep: int, ep_rank: int, group: List[int], L: int) -> List[str]:
    """Bytes per all-to-all = kept routed rows x H x 4 (fp32) each way, split per destination; no padding."""
    errs: List[str] = []
    H, elem = cfg.H, 4
    kept = naive[r]["kept"]
    send = [sum(kept[q * L:(q + 1) * L]) for q in range(ep)]  # rows I send to EP rank q
    recv = [sum(naive[s]["kept"][ep_rank * L:(ep_rank + 1) * L]) for s in group]  # rows EP rank q sends me
    stats, wire = got["stats"], got["wire"]
    if ep == 1:
        if wire or any(stats.get(k, 0) for k in ("a2a_rows", "a2a_bytes", "a2a_bytes_remote")):
            errs.append(f"{st} EP size 1 must not communicate: stats {stats}, calls {wire}")
        return errs
    want_stats = dict(a2a_rows=sum(send), a2a_bytes=sum(send) * H * elem,
                      a2a_bytes_remote=(sum(send) - send[ep_rank]) * H * elem)
    if {k: stats.get(k) for k in want_stats} != want_stats:
        errs.append(f"{st} dispatcher last_stats {stats} != expected {want_stats}")
    if got["aux_a2a_bytes"] != want_stats["a2a_bytes"]:
        errs.append(f"{st} aux.a2a_bytes {got['aux_a2a_bytes']} != {want_stats['a2a_bytes']}")
    # forward: counts exchange, tokens out, results back; backward: results' grads out, tokens' grads back
    rows = [w for w in wire if w["in_splits"] is not None]
    counts = [w for w in wire if w["in_splits"] is None]
    if len(counts) != 1 or counts[0]["in_shape"] != (ep, L) or counts[0]["dtype"] != "torch.int64":
        errs.append(f"{st} expected one [ep, L] int64 count exchange, got {counts}")
    expect = [(send, recv), (recv, send), (send, recv), (recv, send)]  # (in_splits, out_splits) per call
    if len(rows) != len(expect):
        errs.append(f"{st} expected {len(expect)} row all-to-alls (2 forward, 2 backward), got {len(rows)}: {rows}")
        return errs
    for i, (w, (ins, outs)) in enumerate(zip(rows, expect)):
        if w["in_splits"] != ins or w["out_splits"] != outs:
            errs.append(f"{st} all-to-all #{i} splits in={w['in_splits']} out={w['out_splits']}, expected in={ins} out={outs}")
        if w["in_shape"] != (sum(ins), H) or w["out_shape"] != (sum(outs), H) or w["elem"] != elem:
            errs.append(f"{st} all-to-all #{i} buffers {w['in_shape']} -> {w['out_shape']} x{w['elem']}B, "
                        f"expected ({sum(ins)}, {H}) -> ({sum(outs)}, {H}) x{elem}B (padding?)")
    return errs


# ---- process groups --------------------------------------------------------------------


def make_dims(world: int, ep: int, rank: int):
    """A built `ParallelDims` (EP groups consecutive, EDP groups strided). Collective."""
    from moedist.distributed import ParallelDims

    return ParallelDims(world_size=world, ep_size=ep, rank=rank).build()


def pack(obj) -> bytes:
    """Serialise worker results to bytes: tensors returned through the multiprocessing
    queue would travel as shared-memory file descriptors that die with the worker."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def ep_worker(rank: int, world: int, configs: Sequence[EPConfig], ep_sizes: Sequence[int]) -> bytes:
    """run_workers target: every (config, EP size) on this rank; pack({(name, ep): record}).
    """
    torch.manual_seed(1234 + rank)  # nothing may depend on the global RNG; make it differ per rank
    dims = {ep: make_dims(world, ep, rank) for ep in ep_sizes}
    out = {}
    for cfg in configs:
        for ep in ep_sizes:
            if cfg.E % ep == 0:
                out[(cfg.name, ep)] = run_ep_rank(cfg, dims[ep], rank)
    return pack(out)


def run_and_check(world: int, configs: Sequence[EPConfig], ep_sizes: Sequence[int], timeout: float = 240.0) -> dict:
    """`run_workers(ep_worker, ...)` then `check_all`; returns dict(world, results, errs, n, refs).

    If the run is interrupted (pytest-timeout after a collective deadlock), the
    worker processes are killed, or the interpreter would wait for them at exit.
    """
    import multiprocessing as mp

    from tests._dist import run_workers

    try:
        raw = run_workers(ep_worker, world, args=(list(configs), tuple(ep_sizes)), timeout=timeout)
    except BaseException:
        for p in mp.active_children():
            p.kill()
        raise
    results = [unpack(r) for r in raw]
    errs, n, refs = check_all(results, configs, world, ep_sizes)
    return dict(world=world, results=results, errs=errs, n=n, refs=refs)


def check_all(results: list, configs: Sequence[EPConfig], world: int, ep_sizes: Sequence[int]):
    """Compare every rank's records with the reference.

    Returns (errors as (kind, message) pairs, records checked, references by config name).
    """
    results = [unpack(r) if isinstance(r, bytes) else r for r in results]
    errs: List[Tuple[str, str]] = []
    refs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: a second thread only spins on a loaded machine
    try:
        for cfg in configs:
            ref = refs[cfg.name] = run_reference(cfg, world)
            tags = build_layer(cfg, ExpertParallelComm.single(), 0, 1)
            for ep in ep_sizes:
                if cfg.E % ep == 0:
                    for r in range(world):
                        errs += compare_rank(cfg, world, results[r][(cfg.name, ep)], ref, tags)
    finally:
        torch.set_num_threads(threads)
    n = sum(world for cfg in configs for ep in ep_sizes if cfg.E % ep == 0)
    return errs, n, refs
