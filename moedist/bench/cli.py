"""`moedist bench layer|ep|train|data`: argument parsing and printing.

`moedist.cli` calls `main(argv)` with the arguments after `bench`; until then:
    python -m moedist.bench.cli layer --tokens 4096 --experts 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

from moedist.choices import EXPERT_GRADS
from moedist.cli_format import DefaultsFormatter


def _int_list(s: str) -> List[int]:
    try:
        return [int(v) for v in s.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated integers") from None


def _str_list(s: str) -> List[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


FFN_CHOICES = {"plain": ["plain"], "recompute": ["recompute"], "both": ["plain", "recompute"]}


def _ffn_impls(s: str) -> List[str]:
    if s not in FFN_CHOICES:
        raise argparse.ArgumentTypeError(f"{s!r}: allowed plain, recompute, both")
    return FFN_CHOICES[s]


class _FfnAction(argparse.Action):
    """`--ffn N` is the FFN size F (as always); `--ffn plain|recompute|both` picks the expert-FFN
    implementation (the same as --ffn-impl). Both may be given: `--ffn 1024 --ffn recompute`."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value in FFN_CHOICES:
            namespace.ffn_impl = FFN_CHOICES[value]
            return
        try:
            namespace.ffn = int(value)
        except ValueError:
            raise argparse.ArgumentError(self, f"{value!r}: an integer FFN size, or plain | recompute | both") from None


def _add_shape_args(p: argparse.ArgumentParser, tokens: int) -> None:
    p.add_argument("--tokens", type=int, default=tokens, help="T, tokens per step (per rank for ep)")
    p.add_argument("--hidden", type=int, default=512, help="H")
    p.add_argument("--ffn", action=_FfnAction, default=1024, metavar="F|plain|recompute|both",
                   help="an integer: F, the FFN size of one expert; plain | recompute | both: the same as --ffn-impl")
    p.add_argument("--experts", type=int, default=8, help="E")
    p.add_argument("--topk", type=int, default=2, help="K")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--activation", default="swiglu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    _add_allocator_arg(p)


def _add_allocator_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-allocator", choices=("default", "cached"), default="default",
                   help="cached: glibc keeps freed memory (no mmap/page faults per step), like a GPU caching allocator")


def _apply_allocator(args) -> Optional[str]:
    """Apply --cpu-allocator; returns the name recorded in the JSON."""
    choice = getattr(args, "cpu_allocator", "default")
    if choice == "cached":
        from moedist.bench.memory import use_cached_cpu_allocator

        if not use_cached_cpu_allocator():
            raise ValueError("--cpu-allocator=cached: glibc mallopt is not available on this system")
    return choice


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moedist bench", description="Benchmarks of the MoE layer, EP and training.",
                                     formatter_class=DefaultsFormatter)
    sub = parser.add_subparsers(dest="what", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:  # every subcommand's --help shows its defaults
        return sub.add_parser(name, help=help, formatter_class=DefaultsFormatter)

    lay = add("layer", help="one MoE layer vs DeepSpeed, fairscale, a dense FFN and the matmul floor")
    _add_shape_args(lay, 4096)
    lay.add_argument("--ffn-impl", type=_ffn_impls, default="both", metavar="plain|recompute|both",
                     help="the expert FFN given to EVERY impl (moedist, DeepSpeed, fairscale, floor, dense, LoRA rows): "
                          "plain = plain autograd, keeps 4 [rows, F] tensors; recompute = keeps gate/up, recomputes "
                          "phi(gate)*up in backward (moedist's kernel); both = one row per impl and FFN")
    lay.add_argument("--expert-grads", choices=EXPERT_GRADS, default="auto",
                     help="moedist rows' expert weight gradients, as train.expert_grads: kept = allocated once and "
                          "overwritten in place each step (resident: counted in peak memory); fresh = allocated in "
                          "backward and freed between steps, like every peer; auto = kept on CPU, fresh on CUDA")
    lay.add_argument("--repeats", type=int, default=3,
                     help="independent timing rounds of --iters each (impl order reshuffled every iteration); the "
                          "JSON and table give median, IQR and min-max over all samples and each repeat's median")
    lay.add_argument("--impls", type=_str_list, default=None,
                     help="comma list of moedist,deepspeed,fairscale,dense,floor,lora (default all but lora)")
    lay.add_argument("--modes", type=_str_list, default=["capacity", "dropless"], help="capacity,dropless")
    lay.add_argument("--skew", type=float, default=0.0, help="target max/mean expert load (0: natural routing)")
    lay.add_argument("--lora-rank", type=int, default=8)
    lay.add_argument("--min-capacity", type=int, default=4)
    lay.add_argument("--no-memory", action="store_true", help="skip the memory measurement step")
    lay.add_argument("--no-stats", action="store_true",
                     help="moedist layers skip their diagnostics (MoELayer(stats=False): router entropy, dropped fraction)")
    lay.add_argument("--profile", type=_str_list, default=[], metavar="IMPL/MODE,...",
                     help="op-by-op profile of these cases (e.g. moedist/capacity,floor/capacity) into the JSON")
    lay.add_argument("--plot", metavar="PATH", help="PNG of the ratios (the sweep: cost curves)")
    lay.add_argument("--targets", action="store_true",
                     help="print the project's target lines (target OK/MISS) and record them in the JSON; the "
                          "limits are set for the reference sizes (benchmarks/RESULTS.md), not for any size")
    lay.add_argument("--sweep", action="store_true", help="sweep tokens and experts")
    lay.add_argument("--sweep-tokens", type=_int_list, default=None, help="default 1024,2048,4096,8192,16384")
    lay.add_argument("--sweep-experts", type=_int_list, default=None, help="default 8,16,32,64,128")

    ep = add("ep", help="expert-parallel layer under torchrun: all-to-all time, bytes, imbalance")
    _add_shape_args(ep, 2048)
    ep.add_argument("--impls", type=_str_list, default=["moedist", "deepspeed"], help="moedist,deepspeed")
    ep.add_argument("--modes", type=_str_list, default=["capacity", "dropless"])
    ep.add_argument("--skew", type=float, default=0.0, help="target max/mean expert load")

    rep = add("report", help="markdown tables of bench JSON files")
    rep.add_argument("paths", nargs="+", metavar="JSON")

    tr = add("train", help="end-to-end tokens/s: moedist vs DeepSpeed native MoE (tiny model) or vs DeepSpeed AutoEP "
                           "(a Hugging Face MoE model, --peer autoep)")
    tr.add_argument("--config", default="configs/tiny.yaml", help="model/data config (YAML)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, repeatable")
    tr.add_argument("--steps", type=int, default=20, help="timed steps per model")
    tr.add_argument("--warmup", type=int, default=3)
    tr.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2))
    tr.add_argument("--ep-size", type=int, default=1)
    tr.add_argument("--threads", type=int, default=0)
    tr.add_argument("--json", metavar="PATH")
    tr.add_argument("--peer", choices=("deepspeed", "autoep"), default="deepspeed",
                    help="deepspeed: the tiny model with DeepSpeed's native MoE layers; autoep: the Hugging Face MoE "
                         "model of --hf under DeepSpeed AutoEP (expert_parallel config) vs moedist's model.from_hf run")
    tr.add_argument("--hf", metavar="DIR", default=None,
                    help="--peer autoep: the Hugging Face MoE model directory (e.g. from python -m moedist.models.toy_hf)")
    tr.add_argument("--profile", action="store_true",
                    help="--peer autoep: after the timed steps, profile 2 more steps of each side op by op (rank 0's "
                         "self time per op, printed and in the JSON's profiles)")
    _add_allocator_arg(tr)

    from moedist.bench.data import add_arguments as add_data_arguments

    add_data_arguments(add("data", help="training RSS and data-loading time as the prepared corpus grows"))
    return parser


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def _span(r: dict, lo: str, hi: str) -> str:
    a, b = r.get(lo), r.get(hi)
    return "-" if a is None or b is None else f"{a:.0f}-{b:.0f}"


def format_layer_table(res: dict) -> str:
    """A fixed-width table of one `bench layer` result (what RESULTS.md shows).

    fwd+bwd ms: median over every sample of every repeat; IQR: q25-q75; min-max over all samples;
    x dense / x DS / x floor: against the row of the same expert FFN; useful TF/s: flops.py.
    """
    head = f"{'impl':<13}{'mode':<10}{'ffn':<10}{'fwd ms':>9}{'fwd+bwd ms':>12}{'IQR':>12}{'min-max':>12}" \
           f"{'x dense':>8}{'x DS':>7}{'x floor':>8}{'cpu ms':>9}{'act MB':>9}{'peak MB':>9}{'a2a MB':>9}" \
           f"{'tok/s':>9}{'useful TF/s':>12}"
    lines = [head, "-" * len(head)]
    for r in res["results"]:
        rat = r.get("ratios", {})
        lines.append(f"{r['impl']:<13}{r['mode']:<10}{r.get('ffn', '-'):<10}{r['fwd_ms']:>9.1f}{r['fwd_bwd_ms']:>12.1f}"
                     f"{_span(r, 'fwd_bwd_ms_q25', 'fwd_bwd_ms_q75'):>12}{_span(r, 'fwd_bwd_ms_min', 'fwd_bwd_ms_max'):>12}"
                     f"{_fmt(rat.get('fwd_bwd_vs_dense', rat.get('fwd_bwd_vs_dense_lora')), '.2f'):>8}"
                     f"{_fmt(rat.get('fwd_bwd_vs_deepspeed'), '.2f'):>7}{_fmt(rat.get('fwd_bwd_vs_floor'), '.2f'):>8}"
                     f"{_fmt(r.get('fwd_bwd_cpu_ms')):>9}"
                     f"{_fmt(r.get('act_mem_mb')):>9}{_fmt(r.get('peak_mem_mb')):>9}{r['a2a_bytes'] / 2**20:>9.1f}"
                     f"{r['tokens_per_s']:>9.0f}{_fmt(r.get('useful_tflops'), '.4f'):>12}")
    return "\n".join(lines)


def _layer(args) -> dict:
    from moedist.bench.layer import DEFAULT_IMPLS, LayerBenchConfig, SWEEP_EXPERTS, SWEEP_TOKENS, run_layer_bench, run_layer_sweep

    impls = args.impls or (["moedist", "deepspeed", "dense", "floor"] if args.sweep else list(DEFAULT_IMPLS))
    cfg = LayerBenchConfig(tokens=args.tokens, hidden=args.hidden, ffn=args.ffn, experts=args.experts, topk=args.topk,
                           capacity_factor=args.capacity_factor, dtype=args.dtype, iters=args.iters, warmup=args.warmup,
                           impls=impls, modes=args.modes, skew=args.skew, lora_rank=args.lora_rank,
                           activation=args.activation, min_capacity=args.min_capacity, seed=args.seed,
                           device=args.device, threads=args.threads, memory=not args.no_memory,
                           profile=tuple(args.profile), ffn_impls=tuple(args.ffn_impl), repeats=args.repeats,
                           expert_grads=args.expert_grads, stats=not args.no_stats)
    log = lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if args.sweep:
        res = run_layer_sweep(cfg, args.sweep_tokens or SWEEP_TOKENS, args.sweep_experts or SWEEP_EXPERTS, log=log)
        for which in ("tokens", "experts"):
            print(f"sweep over {which}:")
            print(format_layer_table(dict(results=[r for r in res["results"] if r["sweep"] == which])))
        for k, f in res["fits"].items():
            print(f"fit {k}: {f['ms_per_1k_tokens']:.1f} ms per 1k tokens, R^2 = {f['r2']:.4f}")
    else:
        res = run_layer_bench(cfg, log=log)
        if not args.targets:  # the limits mean something at the reference sizes only
            res["targets"] = []
        print(format_layer_table(res))
        for t in res["targets"]:
            cpu = f", CPU time {t['cpu_value']:.3f} {'OK' if t['cpu_ok'] else 'MISS'}" if "cpu_value" in t else ""
            print(f"target {'OK  ' if t['ok'] else 'MISS'} {t['target']}: {t['value']:.3f} (<= {t['limit']}){cpu}")
        for k, v in res["skipped"].items():
            print(f"skipped {k}: {v}")
        from moedist.bench.report import profile_lines

        for line in profile_lines(res["profiles"], "fwd+bwd step"):
            print(line)
    if args.plot:
        from moedist.bench.plot import plot_layer, plot_sweep

        (plot_sweep if args.sweep else plot_layer)(res, args.plot)
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point for `moedist bench ...` (argv: the arguments after `bench`)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        allocator = _apply_allocator(args)
        if args.what == "layer":
            res = _layer(args)
        elif args.what == "report":
            from moedist.bench.report import render

            print("\n\n".join(render(p) for p in args.paths))
            res = None
        elif args.what == "ep":
            from moedist.bench.ep import run_ep_from_args

            res = run_ep_from_args(args)
        elif args.what == "data":
            from moedist.bench.data import run_data_from_args

            res = run_data_from_args(args)
        else:
            from moedist.bench.train import run_train_from_args

            res = run_train_from_args(args)
    except ValueError as e:
        print(f"moedist bench {args.what}: {e}", file=sys.stderr)
        return 2
    if res is not None:
        res.setdefault("environment", {})["cpu_allocator"] = allocator
    if res is not None and getattr(args, "json", None):
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
