"""`moedist demo` (what `make demo` runs): LoRA-MoE fine-tuning of a dense model on a new domain.

    moedist demo                         # 2 CPU processes, a few minutes; outputs under runs/demo
    moedist demo --out /tmp/d --base-steps 50 --steps 20
    moedist demo --retrain-base          # ignore the cached base model

The story, on 2 processes (it starts `torchrun --nproc_per_node 2` itself):

1. Base: a small dense byte-level LM (configs/demo_base.yaml) learns English prose
   (pydoc_data.topics). Its weights are cached in <out>/base/model.safetensors and
   reused while configs/demo_base.yaml is unchanged.
2. Convert: the model of configs/demo.yaml is built with lora.mode=moe_lora; every
   FFN becomes the frozen dense FFN shared by 8 LoRA experts (B = 0) plus a new
   router, so at this point it computes exactly what the dense model computes.
3. Fine-tune on Python code (the standard library's sources) with expert
   parallelism 2 (4 experts per process) under DeepSpeed ZeRO-2; only adapters and
   routers train.
4. Report validation loss on both domains before and after (gain on code,
   forgetting on prose), tokens/s, expert load, and the plot.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from moedist.config import ConfigError, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moedist demo", description="LoRA-MoE fine-tuning demo on 2 processes.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="processes (default 2; the expert-parallel size of "
                   "configs/demo.yaml must divide it)")
    p.add_argument("--base-steps", type=int, default=None, help="steps of base training (default: demo_base.yaml)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: demo.yaml)")
    p.add_argument("--retrain-base", action="store_true", help="train the base model even if cached")
    p.add_argument("--gpu", action="store_true", help="run on GPUs (one per process, nccl) instead of CPU")
    p.add_argument("--base-config", default=str(CONFIGS / "demo_base.yaml"),
                   help="YAML of the dense base training (default: configs/demo_base.yaml)")
    p.add_argument("--config", default=str(CONFIGS / "demo.yaml"),
                   help="YAML of the LoRA-MoE fine-tune (default: configs/demo.yaml)")
    p.add_argument("--hf", action="store_true", help="the Hugging Face journey instead: a Qwen3-MoE with its own "
                   "tokenizer, JSONL data, LoRA fine-tune at EP=2 under ZeRO-2, generate, export "
                   "(see moedist demo --hf --help)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _configs(args):
    """(base cfg, fine-tune cfg) with the demo's overrides; ConfigError on anything wrong."""
    out = os.path.abspath(args.out)
    base_over = [f"train.output_dir={os.path.join(out, 'base')}"]
    ft_over = [f"train.output_dir={os.path.join(out, 'finetune')}"]
    if args.base_steps is not None:
        base_over += [f"train.max_steps={args.base_steps}", f"train.warmup_steps={min(20, args.base_steps)}",
                      f"train.eval_every={max(1, args.base_steps // 4)}"]
    if args.steps is not None:
        ft_over += [f"train.max_steps={args.steps}", f"train.warmup_steps={min(3, args.steps)}",
                    f"train.eval_every={max(1, args.steps // 3)}"]
    base = load_config(args.base_config, base_over)
    ft = load_config(args.config, ft_over)
    if base.model.moe_every != 0 or base.lora.mode != "none":
        raise ConfigError(f"{args.base_config}: model.moe_every must be 0 and lora.mode none (a dense base)")
    if ft.lora.mode != "moe_lora":
        raise ConfigError(f"lora.mode={ft.lora.mode!r}: the demo fine-tunes with lora.mode=moe_lora")
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "max_seq_len",
                "tie_embeddings"):
        if getattr(base.model, key) != getattr(ft.model, key):
            raise ConfigError(f"model.{key}={getattr(ft.model, key)}: must equal the base model's "
                              f"({getattr(base.model, key)} in {args.base_config})")
    if base.moe.activation != ft.moe.activation:
        raise ConfigError(f"moe.activation={ft.moe.activation!r}: must equal the base FFN's ({base.moe.activation!r})")
    return base, ft


def main(argv=None) -> int:
    """Entry of `moedist demo` (registered in moedist.cli.COMMANDS); `--hf`: the Hugging Face journey."""
    argv = list(sys.argv[2:] if argv is None else argv)
    if "--hf" in argv:
        from moedist.train.demo_hf import main as main_hf

        return main_hf([a for a in argv if a != "--hf"])
    args = _parser().parse_args(argv)
    if args.worker:
        return worker(args)
    from moedist.train.preflight import preflight

    try:
        base, ft = _configs(args)
        preflight(base, args.nproc, cuda=args.gpu)
        preflight(ft, args.nproc, cuda=args.gpu)
    except ConfigError as err:
        print(f"moedist: error: {err}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if not args.gpu:  # a CPU demo (gloo) even where CUDA is visible
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "moedist.train.demo", "--worker", *(argv if argv is not None else sys.argv[2:])]
    return subprocess.call(cmd, env=env)


# ------------------------------------------------------------------ the worker (every rank)

def _fingerprint(cfg) -> str:
    d = config_to_dict(cfg)
    for k in ("output_dir", "log_every", "eval_every", "eval_batches", "save_every", "resume", "plot",
              "tensorboard"):
        d["train"].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_FFN = re.compile(r"layers\.(\d+)\.mlp\.(w_gate|w_up|w_down)")


def load_dense_into_moe_lora(model, dense_state: dict) -> None:
    """Copy a dense model's weights into a freshly built moe_lora model (before `parallelize`).

    Same-named tensors (embeddings, attention, norms, head) are copied; layer i's dense
    FFN becomes the frozen base of its LoRA experts (`MoELoRAExperts.load_base`).
    Router and adapters keep their initialisation (B = 0: every expert equals the FFN).
    A shared expert (moe.num_shared_experts) gets w_down = 0, so the converted model
    still computes exactly the dense one; it trains with lora.train_shared_experts.
    """
    import torch

    params = dict(model.named_parameters())
    ffn: dict = {}
    with torch.no_grad():
        for name, t in dense_state.items():
            m = _FFN.fullmatch(name)
            if m:
                ffn.setdefault(int(m.group(1)), {})[m.group(2)] = t
            elif name in params:
                params[name].copy_(t)
            else:
                raise KeyError(f"dense weight {name} has no place in the LoRA-MoE model")
        for i, w in ffn.items():
            mlp = model.layers[i].mlp
            mlp.experts.load_base(w.get("w_gate"), w["w_up"], w["w_down"])
            if mlp.shared_experts is not None:  # optional shared expert: silent until it trains
                mlp.shared_experts.w_down.zero_()
    loaded = set(dense_state) - {n for n in dense_state if _FFN.fullmatch(n)}
    missing = [n for n, p in params.items() if n not in loaded and not p.requires_grad
               and ".experts.w_" not in n]
    if missing:
        raise KeyError(f"LoRA-MoE weights not loaded from the dense base: {missing}")


def _base_weights(base_cfg, retrain: bool, rank: int, console):
    """Train the dense base (or reuse the cached one); returns its state dict on every rank."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from moedist.train.trainer import Trainer

    folder = Path(base_cfg.train.output_dir)
    path, meta = folder / "model.safetensors", folder / "base.json"
    key = _fingerprint(base_cfg)
    cached = (not retrain and path.exists() and meta.exists()
              and json.loads(meta.read_text()).get("fingerprint") == key)
    ok = torch.tensor([1 if cached else 0])
    dist.broadcast(ok, 0)  # every rank takes the same branch
    if ok.item():
        console.print(f"[bold]1. base[/]: reusing the dense model cached in {path} (--retrain-base to redo)")
        info = json.loads(meta.read_text())
    else:
        console.print(f"[bold]1. base[/]: training a dense byte-level LM on English prose (pydoc_data.topics), "
                      f"{base_cfg.train.max_steps} steps")
        t0 = time.perf_counter()
        trainer = Trainer(base_cfg, save_checkpoints=False)
        res = trainer.train()
        info = {"fingerprint": key, "val_loss_prose": res.val_loss, "steps": res.final_step,
                "time_s": time.perf_counter() - t0}
        if rank == 0:
            state = {n: p.detach().cpu().contiguous() for n, p in trainer.model.state_dict().items()}
            save_file(state, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
            meta.write_text(json.dumps(info, indent=1))
        dist.barrier()
        del trainer
    return load_file(str(path)), info


def worker(args) -> int:
    import torch
    import torch.distributed as dist
    from rich.console import Console
    from rich.table import Table

    from moedist.distributed import init_distributed
    from moedist.models import build_model
    from moedist.train.data import ByteLMData
    from moedist.train.progress import load_bar
    from moedist.train.trainer import Trainer, evaluate_lm

    env = init_distributed()
    rank = env.rank
    console = Console(highlight=False, soft_wrap=True, quiet=rank != 0)
    t_start = time.perf_counter()
    try:
        base_cfg, ft_cfg = _configs(args)
        dense_state, base_info = _base_weights(base_cfg, args.retrain_base, rank, console)

        # 2. convert: the dense base inside frozen-FFN + router + LoRA-expert layers
        prose = ByteLMData.from_config(base_cfg.data)
        code = ByteLMData.from_config(ft_cfg.data)
        M, batches = ft_cfg.train.micro_batch_size, ft_cfg.train.eval_batches
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        dense = build_model(base_cfg)
        dense.load_state_dict(dense_state)
        dense.to(dev)
        def dense_val(data) -> float:  # token-weighted mean over the validation micro-batches
            total, count = evaluate_lm(lambda b: dense(b.input_ids, b.labels), dense,
                                       lambda i, n: data.val_micro(None, i, n), batches, M, dev)
            return total / max(1.0, count)

        dense_prose, dense_code = dense_val(prose), dense_val(code)
        del dense
        m, moe, lora = ft_cfg.model, ft_cfg.moe, ft_cfg.lora
        console.print(f"[bold]2. convert[/]: each of the {m.num_layers} FFNs -> frozen FFN + router over "
                      f"{moe.num_experts} LoRA experts (rank {lora.rank}, B = 0), top-{moe.top_k}"
                      + (f", + a shared expert (w_down = 0, "
                         f"{'trains' if lora.train_shared_experts else 'frozen'})" if moe.num_shared_experts else ""))
        trainer = Trainer(ft_cfg, model_init=lambda model: load_dense_into_moe_lora(model, dense_state),
                          eval_data={"prose": prose})
        if not ft_cfg.train.eval_every:
            raise ConfigError("train.eval_every=0: the demo needs validation (set it > 0 in configs/demo.yaml)")
        before = {"prose": trainer.evaluate(prose), "code": trainer.evaluate(code)}
        diff = max(abs(before["prose"] - dense_prose), abs(before["code"] - dense_code))
        console.print(f"   converted model = dense base on both validation sets: max |loss difference| "
                      f"{diff:.1e}")

        # 3. fine-tune on code
        console.print(f"[bold]3. fine-tune[/] on Python code (stdlib sources): {env.world_size} processes, "
                      f"{trainer.layout}; {trainer.trainable_params:,} of {trainer.total_params:,} parameters "
                      "train (adapters + routers)")
        res = trainer.train()
        after = {"prose": res.summary["val_loss_prose"], "code": res.summary["val_loss"]}
    except ConfigError as err:
        if rank == 0:
            print(f"moedist: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t_start

    # 4. report
    t = Table(title="4. validation loss, nats/byte (dense base; LoRA-MoE before and after fine-tuning on code)",
              title_justify="left")
    for col in ("domain", "dense", "before", "after", "change"):
        t.add_column(col, justify="right" if col != "domain" else "left", no_wrap=True)
    for dom, dense_loss, label in (("code", dense_code, "code (new)"), ("prose", dense_prose, "prose (old)")):
        delta = after[dom] - before[dom]
        word = "gain" if delta < 0 else "forgetting"
        t.add_row(label, f"{dense_loss:.4f}", f"{before[dom]:.4f}", f"{after[dom]:.4f}", f"{delta:+.4f} {word}")
    console.print(t)
    s = res.summary
    console.print(f"throughput: {s['tokens_per_s']:,.0f} tokens/s over {env.world_size} processes "
                  f"({s['tokens']:,} tokens in {s['time_s']:.1f} s); dropped {100 * s['dropped_frac']:.1f}% of pairs")
    for l, shares in enumerate(s.get("expert_load", [])):
        console.print(f"expert load, layer {l}: {load_bar(shares)}  "
                      + " ".join(f"{x:.2f}" for x in shares))
    summary = {"dense_base": {"prose": dense_prose, "code": dense_code}, "before": before, "after": after,
               "gain_code": before["code"] - after["code"], "forgetting_prose": after["prose"] - before["prose"],
               "tokens_per_s": s["tokens_per_s"], "expert_load": s.get("expert_load"),
               "base": base_info, "finetune_steps": res.final_step, "time_s": elapsed,
               "world_size": env.world_size, "layout": trainer.layout, "plot": s.get("plot"),
               "metrics": s.get("metrics")}
    if rank == 0:
        out = Path(args.out).resolve() / "demo_summary.json"
        out.write_text(json.dumps(summary, indent=1))
        console.print(f"plot: {s.get('plot')}\nmetrics: {s.get('metrics')}\nsummary: {out}\n"
                      f"demo finished in {elapsed:.0f} s")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
