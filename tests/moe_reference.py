"""A naive, independent reference for `moedist.moe` (tests only).

Everything here is written from the papers' formulas with Python loops over
tokens, slots and experts; it imports nothing from `moedist`. It is slow on
purpose and only meant for tiny shapes. Tensors keep autograd so gradients
can be compared too. Computations run in float64 by default (the reference is
the "truth"; the implementation in float32 must agree to 1e-5).

Shape legend: T tokens, E experts, K top-k, H hidden, F ffn, r LoRA rank.

Parameters are passed as plain dicts of tensors:

router:  {"weight": [E, H], "bias": [E] or None, "noise_weight": [E, H] or None}
experts (one of):
  {"kind": "grouped", "w_gate": [E, H, F] or None, "w_up": [E, H, F], "w_down": [E, F, H]}
  {"kind": "lora_on_experts", same as grouped, "lora": {name: (A [E, I, r], B [E, r, O])}, "scaling": s}
  {"kind": "moelora", "w_gate": [H, F] or None, "w_up": [H, F], "w_down": [F, H],
   "lora": {name: (A [E, I, r], B [E, r, O])}, "scaling": s}
shared:  {"w_gate": [H, F] or None, "w_up", "w_down", "w_shared_gate": [H, 1] or None} or None
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch


# ----------------------------------------------------------------- scalar math
def _f(v) -> float:
    """A python float of a (possibly autograd) scalar, for comparisons only."""
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def ref_sigmoid(z):
    return 1.0 / (1.0 + torch.exp(-z))


def ref_silu(z):
    return z * ref_sigmoid(z)


def ref_gelu(z):
    """Exact (erf) GELU: z * Phi(z)."""
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def ref_relu(z):
    return torch.where(z > 0, z, torch.zeros_like(z))


def ref_softplus(z):
    return torch.log(1.0 + torch.exp(z))


def ref_phi(z):
    """Standard normal CDF."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


REF_GATED = {"swiglu": ref_silu, "geglu": ref_gelu}
REF_PLAIN = {"gelu": ref_gelu, "relu": ref_relu, "silu": ref_silu}


def ref_vecmat(v, M):
    """v [I] @ M [I, O] as sum_i v[i] * M[i, :] (elementwise product and sum; no matmul kernel)."""
    return (v.unsqueeze(1) * M).sum(0)


def ref_ffn_token(x_H, w_gate, w_up, w_down, activation, lora=None, scaling=1.0):
    """One token through one FFN. lora: {name: (A [I, r], B [r, O])} for this expert."""
    lora = lora or {}

    def proj(name, v, W):
        y = ref_vecmat(v, W)
        if name in lora:
            A, B = lora[name]
            y = y + scaling * ref_vecmat(ref_vecmat(v, A), B)
        return y

    if activation in REF_GATED:
        h = REF_GATED[activation](proj("gate", x_H, w_gate)) * proj("up", x_H, w_up)
    else:
        h = REF_PLAIN[activation](proj("up", x_H, w_up))
    return proj("down", h, w_down)


def ref_expert(e, x_H, experts, activation):
    """Output of global expert e for one token."""
    kind = experts["kind"]
    if kind == "grouped":
        wg = experts["w_gate"][e] if experts["w_gate"] is not None else None
        return ref_ffn_token(x_H, wg, experts["w_up"][e], experts["w_down"][e], activation)
    lora_e = {n: (A[e], B[e]) for n, (A, B) in experts["lora"].items()}
    if kind == "lora_on_experts":
        wg = experts["w_gate"][e] if experts["w_gate"] is not None else None
        return ref_ffn_token(x_H, wg, experts["w_up"][e], experts["w_down"][e], activation, lora_e, experts["scaling"])
    if kind == "moelora":
        return ref_ffn_token(x_H, experts["w_gate"], experts["w_up"], experts["w_down"], activation, lora_e, experts["scaling"])
    raise AssertionError(kind)


# ----------------------------------------------------------------- routing
def _argsort_desc(values):
    """Indices of python floats sorted by value descending, ties by lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def ref_route(x_TH, router, top_k, score_func="softmax", renormalize=True,
              jitter_eps=0.0, jitter_u=None, noise_eps=None):
    """Route each token with loops.

    jitter_u: [T, H] uniforms in [0, 1) used as x * (1 - eps + 2 eps u) for the router input.
    noise_eps: [T, E] standard normals; noisy logit = clean + eps * (softplus(x . Wn) + 0.01).

    Returns dict with idx [T][K] ints, w [T][K] scalars, probs [T][E], logits [T][E]
    (the ones the scores came from), clean [T][E], noise_std [T][E] (or None).
    """
    T, H = x_TH.shape
    W = router["weight"]
    E = W.shape[0]
    bias = router.get("bias")
    Wn = router.get("noise_weight")
    out = dict(idx=[], w=[], probs=[], logits=[], clean=[], noise_std=[] if noise_eps is not None else None)
    for t in range(T):
        xt = x_TH[t]
        if jitter_u is not None and jitter_eps > 0:
            xt = xt * (1.0 - jitter_eps + 2.0 * jitter_eps * jitter_u[t].to(xt.dtype))
        clean = [torch.dot(xt, W[e]) for e in range(E)]
        logits = list(clean)
        if noise_eps is not None:
            std = [ref_softplus(torch.dot(xt, Wn[e])) + 1e-2 for e in range(E)]
            logits = [clean[e] + noise_eps[t, e].to(xt.dtype) * std[e] for e in range(E)]
            out["noise_std"].append(std)
        if score_func == "softmax":
            m = max(_f(l) for l in logits)
            ex = [torch.exp(l - m) for l in logits]
            tot = sum(ex)
            probs = [v / tot for v in ex]
            chosen = _argsort_desc([_f(p) for p in probs])[:top_k]
            w = [probs[e] for e in chosen]
        elif score_func == "sigmoid":
            s = [ref_sigmoid(l) for l in logits]
            choice = [_f(s[e]) + (_f(bias[e]) if bias is not None else 0.0) for e in range(E)]
            chosen = _argsort_desc(choice)[:top_k]
            w = [s[e] for e in chosen]
            tot_s = sum(s)
            probs = [v / tot_s for v in s]
        else:
            raise AssertionError(score_func)
        if renormalize:
            tot = sum(w)
            w = [v / tot for v in w]
        out["idx"].append(chosen)
        out["w"].append(w)
        out["probs"].append(probs)
        out["logits"].append(logits)
        out["clean"].append(clean)
    return out


# ----------------------------------------------------------------- capacity
def ref_capacity(T, E, K, capacity_factor, min_capacity=0):
    """ceil(cf * T * K / E) in exact arithmetic (cf read as the decimal written), >= min_capacity."""
    if capacity_factor is None or capacity_factor == 0:
        return None
    exact = Fraction(str(capacity_factor)) * T * K / E
    c = exact.numerator // exact.denominator + (1 if exact.numerator % exact.denominator else 0)
    return max(min_capacity, c)


def ref_keep(idx, w, E, capacity, policy, active=None):
    """keep[t][k] booleans and dropped[e] counts.

    position: visit slot 0 of every token (token order), then slot 1, ...; an expert
    accepts until full. probs: each expert keeps its `capacity` pairs of largest
    weight (ties: earlier slot-major position). active[t][k] False: the pair is not
    routed at all (never kept, takes no capacity, not counted as dropped).
    """
    T, K = len(idx), len(idx[0])
    active = active or [[True] * K for _ in range(T)]
    keep = [[active[t][k] for k in range(K)] for t in range(T)]
    dropped = [0] * E
    if capacity is None:
        return keep, dropped
    if policy == "position":
        used = [0] * E
        for k in range(K):
            for t in range(T):
                e = idx[t][k]
                if not active[t][k]:
                    continue
                if used[e] < capacity:
                    used[e] += 1
                else:
                    keep[t][k] = False
                    dropped[e] += 1
    elif policy == "probs":
        for e in range(E):
            pairs = [(t, k) for k in range(K) for t in range(T) if idx[t][k] == e and active[t][k]]  # slot-major
            pairs.sort(key=lambda tk: -_f(w[tk[0]][tk[1]]))  # stable: ties keep position order
            for t, k in pairs[capacity:]:
                keep[t][k] = False
                dropped[e] += 1
    else:
        raise AssertionError(policy)
    return keep, dropped


# ----------------------------------------------------------------- losses
def ref_switch_loss(idx, probs, E):
    T, K = len(idx), len(idx[0])
    counts = [0] * E
    for t in range(T):
        for k in range(K):
            counts[idx[t][k]] += 1
    total = 0.0
    for e in range(E):
        P_e = sum(probs[t][e] for t in range(T)) / T
        total = total + (counts[e] / (T * K)) * P_e
    return E * total


def ref_cv_squared(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n  # population variance
    return var / (mean * mean + 1e-10)


def ref_importance_loss(idx, w, E):
    T, K = len(idx), len(idx[0])
    imp = []
    for e in range(E):
        s = 0.0
        for t in range(T):
            for k in range(K):
                if idx[t][k] == e:
                    s = s + w[t][k]
        imp.append(s if torch.is_tensor(s) else torch.tensor(s, dtype=torch.float64))
    return ref_cv_squared(imp)


def ref_load_loss(clean, noisy, std, k):
    """Shazeer 2017 appendix A: load_e = sum_t Phi((clean - kth_excluding(noisy, k, e)) / std)."""
    T, E = len(clean), len(clean[0])
    if k >= E:
        return 0.0
    loads = []
    for e in range(E):
        s = 0.0
        for t in range(T):
            others = sorted(((_f(noisy[t][j]), j) for j in range(E) if j != e), key=lambda vj: (-vj[0], vj[1]))
            j_thr = others[k - 1][1]  # k-th largest among the other experts
            s = s + ref_phi((clean[t][e] - noisy[t][j_thr]) / std[t][e])
        loads.append(s)
    return ref_cv_squared(loads)


def ref_z_loss(logits):
    T = len(logits)
    total = 0.0
    for t in range(T):
        m = max(_f(l) for l in logits[t])
        lse = m + torch.log(sum(torch.exp(l - m) for l in logits[t]))
        total = total + lse * lse
    return total / T


# ----------------------------------------------------------------- layer
def ref_shared(x_H, shared, activation):
    y = ref_ffn_token(x_H, shared["w_gate"], shared["w_up"], shared["w_down"], activation)
    if shared.get("w_shared_gate") is not None:
        y = ref_sigmoid(ref_vecmat(x_H, shared["w_shared_gate"]))[0] * y
    return y


def ref_moe(x_TH, router, experts, top_k, activation, shared=None, shared_activation=None,
            score_func="softmax", renormalize=True, capacity_factor=None, min_capacity=0,
            drop_policy="position", jitter_eps=0.0, jitter_u=None, noise_eps=None, second_u=None):
    """The whole MoE layer for one rank's tokens. Returns (y [T, H], info dict).

    second_u: [T] uniforms of GShard's random second expert (top-2), or None for all pairs.

    MoE-LoRA experts ("moelora") are adapters on one frozen FFN, which applies to every
    token at full weight: y = FFN(x) + sum over kept pairs of w * (FFN_e(x) - FFN(x)).
    """
    T, H = x_TH.shape
    E = router["weight"].shape[0]
    r = ref_route(x_TH, router, top_k, score_func, renormalize, jitter_eps, jitter_u, noise_eps)
    cap = ref_capacity(T, E, top_k, capacity_factor, min_capacity)
    active = ref_random_second_keep(r["w"], second_u) if second_u is not None else None  # GShard random 2nd expert
    keep, dropped = ref_keep(r["idx"], r["w"], E, cap, drop_policy, active)
    rows = []
    kept_counts = [0] * E
    for t in range(T):
        y = torch.zeros(H, dtype=x_TH.dtype)
        base = ref_base_ffn(x_TH[t], experts, activation) if experts["kind"] == "moelora" else None
        if base is not None:
            y = y + base
        for k in range(top_k):
            if not keep[t][k]:
                continue  # a dropped slot contributes zero (MoE-LoRA: its adapter only)
            e = r["idx"][t][k]
            kept_counts[e] += 1
            out = ref_expert(e, x_TH[t], experts, activation)
            y = y + r["w"][t][k] * (out if base is None else out - base)
        if shared is not None:
            y = y + ref_shared(x_TH[t], shared, shared_activation or activation)
        rows.append(y)
    info = dict(route=r, keep=keep, dropped=dropped, kept=kept_counts, capacity=cap)
    return torch.stack(rows), info


def ref_base_ffn(x_H, experts, activation):
    """The frozen FFN under MoE-LoRA experts, without any adapter."""
    return ref_ffn_token(x_H, experts["w_gate"], experts["w_up"], experts["w_down"], activation)


def ref_dense_ffn(x_TH, w_gate, w_up, w_down, activation):
    """A dense FFN applied token by token."""
    return torch.stack([ref_ffn_token(x_TH[t], w_gate, w_up, w_down, activation) for t in range(x_TH.shape[0])])


# ----------------------------------------------------------------- adapters
class Leaves:
    """Maps each parameter/buffer of the modules under test to an independent
    float64 leaf copy, so the reference builds its own graph and its gradients
    can be compared with the module's, parameter by parameter (reads
    attributes only; no moedist math is used)."""

    def __init__(self, dtype=torch.float64):
        self.dtype = dtype
        self.map = {}  # id(param) -> (param, leaf)

    def __call__(self, p):
        if p is None:
            return None
        if id(p) not in self.map:
            leaf = p.detach().to(self.dtype).clone()
            if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                leaf.requires_grad_(True)
            self.map[id(p)] = (p, leaf)
        return self.map[id(p)][1]

    def pairs(self):
        """(module param, reference leaf) for every trainable parameter seen."""
        return [(p, leaf) for p, leaf in self.map.values() if leaf.requires_grad]


def router_dict(router, leaves):
    return {"weight": leaves(router.weight), "bias": leaves(getattr(router, "expert_bias", None)),
            "noise_weight": leaves(getattr(router, "noise_weight", None))}


def lora_dict(module, leaves):
    return {name: (leaves(st.lora_A), leaves(st.lora_B)) for name, st in module.lora.items()}


def experts_dict(module, kind, leaves):
    """kind: "grouped", "lora_on_experts" or "moelora" (stacked weights are read per expert)."""
    d = {"kind": kind, "w_gate": leaves(module.w_gate), "w_up": leaves(module.w_up), "w_down": leaves(module.w_down)}
    if kind != "grouped":
        d["lora"] = lora_dict(module, leaves)
        d["scaling"] = module.lora_alpha / module.lora_rank
    return d


def shared_dict(module, leaves):
    if module is None:
        return None
    return {"w_gate": leaves(module.w_gate), "w_up": leaves(module.w_up), "w_down": leaves(module.w_down),
            "w_shared_gate": leaves(module.w_shared_gate)}


# ----------------------------------------------------------------- routing variants
def ref_expert_choice(x_TH, router, experts, capacity, activation):
    """Expert-choice routing (Zhou et al. 2022) with loops: expert e takes the min(C, T) tokens of
    highest softmax probability (ties: lower token id); y[t] = sum over the experts e that took t
    of p[t][e] * expert_e(x_t) (MoE-LoRA: the frozen FFN at full weight plus w * adapter delta).

    Returns (y [T, H], chosen: list per expert of token ids, probs [T][E])."""
    T, H = x_TH.shape
    E = router["weight"].shape[0]
    r = ref_route(x_TH, router, 1)
    probs = r["probs"]
    chosen = []
    for e in range(E):
        order = sorted(range(T), key=lambda t: (-_f(probs[t][e]), t))
        chosen.append(order[:min(capacity, T)])
    rows = []
    for t in range(T):
        base = ref_base_ffn(x_TH[t], experts, activation) if experts["kind"] == "moelora" else None
        y = torch.zeros(H, dtype=x_TH.dtype) if base is None else base
        for e in range(E):
            if t in chosen[e]:
                out = ref_expert(e, x_TH[t], experts, activation)
                y = y + probs[t][e] * (out if base is None else out - base)
        rows.append(y)
    return torch.stack(rows), chosen, probs


def ref_random_second_keep(w, u):
    """GShard Algorithm 1 (second expert): dispatch (t, 1) iff 2 * w2 / (w1 + w2) > u[t]. Returns keep[t][2]."""
    keep = []
    for t in range(len(w)):
        w1, w2 = _f(w[t][0]), _f(w[t][1])
        keep.append([True, 2.0 * w2 / (w1 + w2) > float(u[t])])
    return keep


def ref_bias_update(bias, load, rate):
    """b_e + rate * sign(mean(load) - load_e) on python floats."""
    mean = sum(load) / len(load)
    return [b + rate * ((mean > l) - (mean < l)) for b, l in zip(bias, load)]
