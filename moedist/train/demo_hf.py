"""`moedist demo --hf`: fine-tune a Hugging Face MoE model on your own data, every step for real.

    moedist demo --hf                      # 2 CPU processes, about a minute; outputs under runs/hf_demo
    moedist demo --hf --out /tmp/h --steps 10

Nothing can be downloaded here, so the demo makes what a user would bring:

1. A model: a random `transformers` Qwen3-MoE saved beside a byte-level BPE
   tokenizer trained on local text (`python -m moedist.models.toy_hf`).
2. Data: two JSON-lines files from the pydoc topics, one `prompt_completion`
   (the loss counts only the completions) and one `chat` (only assistant turns).

Then it runs the commands of the README's "Fine-tune a Hugging Face model" and
prints each one before it runs:

3. `moedist data prepare` (tokenize into the memory-mapped cache),
4. `torchrun --nproc_per_node 2 -m moedist train configs/hf_finetune.yaml`
   (expert_lora, EP=2, DeepSpeed ZeRO-2, packed documents),
5. `moedist generate` from the run directory,
6. `moedist convert to-hf`, then `transformers` loads the export and greedy-generates
   the same text.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "hf_finetune.yaml"
PROMPT = "Q: What does the Python topic 'lambda' cover?\nA:"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moedist demo --hf", description="Fine-tune a Hugging Face MoE model "
                                "(LoRA on experts, EP=2, ZeRO-2) on JSONL data, then generate and export.")
    p.add_argument("--out", default="runs/hf_demo", help="output folder (default runs/hf_demo)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: configs/hf_finetune.yaml)")
    p.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    return p


def write_demo_data(folder: Path) -> dict:
    """sft.jsonl (prompt/completion) and chat.jsonl (messages) from the pydoc topics; returns their paths."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    sft, chat = folder / "sft.jsonl", folder / "chat.jsonl"
    with open(sft, "w", encoding="utf-8") as f_sft, open(chat, "w", encoding="utf-8") as f_chat:
        for k in sorted(topics):
            text = " ".join(topics[k].split())
            f_sft.write(json.dumps({"prompt": f"Q: What does the Python topic '{k}' cover?\nA:",
                                    "completion": " " + text[:200]}) + "\n")
            f_chat.write(json.dumps({"messages": [
                {"role": "user", "content": f"Explain the Python topic '{k}'."},
                {"role": "assistant", "content": text[200:400]}]}) + "\n")
    return {"sft": sft, "chat": chat}


def _run(cmd: List[str], env: dict, capture: bool = False) -> subprocess.CompletedProcess:
    shown = " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    res = subprocess.run(cmd, env=env, text=True, capture_output=capture)
    if res.returncode != 0:
        if capture:
            sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"moedist demo --hf: step failed (exit {res.returncode}): {shown}")
    return res


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out).resolve()
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR="cpu",
               CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    py = sys.executable
    model_dir, data_dir, run = out / "qwen3_moe", out / "data", out / "run"
    print(f"[1/6] a Hugging Face model: random Qwen3-MoE + BPE tokenizer in {model_dir}")
    if not (model_dir / "config.json").is_file():
        _run([py, "-m", "moedist.models.toy_hf", str(model_dir)], env)
    print(f"[2/6] data: prompt/completion and chat JSONL in {data_dir}")
    write_demo_data(data_dir)
    over = [f"model.from_hf={model_dir}", f"train.output_dir={run}",
            f"data.sources=[{{name: sft, path: {data_dir / 'sft.jsonl'}, format: prompt_completion, weight: 2}}, "
            f"{{name: chat, path: {data_dir / 'chat.jsonl'}, format: chat, weight: 1}}]"]
    if args.steps is not None:
        over += [f"train.max_steps={args.steps}", f"train.warmup_steps={min(2, args.steps)}",
                 f"train.eval_every={max(1, args.steps // 2)}", f"train.save_every={args.steps}"]
    print("[3/6] tokenize and cache the sources")
    _run([py, "-m", "moedist", "data", "prepare", str(CONFIG), *over], env)
    print(f"[4/6] LoRA fine-tune on {args.nproc} processes (expert parallel, DeepSpeed ZeRO-2)")
    _run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), "-m", "moedist",
          "train", str(CONFIG), *over, "--overwrite"], env)
    print("[5/6] generate from the fine-tuned run")
    ours = _run([py, "-m", "moedist", "generate", str(run), "--prompt", PROMPT, "--temperature", "0",
                 "--max-new-tokens", "24"], env, capture=True).stdout
    print(ours, end="")
    export = out / "export"
    print("[6/6] export to transformers and load it there")
    if export.exists():
        import shutil

        shutil.rmtree(export)
    _run([py, "-m", "moedist", "convert", "to-hf", str(run), str(export)], env)
    theirs = _run([py, "-c", _HF_CHECK, str(export), PROMPT], env, capture=True).stdout
    print(theirs, end="")
    same = theirs.split("\n", 1)[-1] == ours
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "val_loss" in r]
    summary = json.loads((run / "summary.json").read_text())
    first = (summary.get("initial_val") or {}).get("val_loss")
    print(f"\nmoedist demo --hf: {len(records)} steps in {time.perf_counter() - t0:.0f} s; val_loss "
          f"{first:.3f} -> {evals[-1]['val_loss']:.3f} (sft {evals[-1].get('val_loss_sft', float('nan')):.3f}, "
          f"chat {evals[-1].get('val_loss_chat', float('nan')):.3f}); transformers greedy text "
          f"{'equals' if same else 'DIFFERS from'} moedist generate; outputs in {out}")
    return 0 if same else 1


# transformers loads the export and greedy-generates from the same prompt (new tokens only).
_HF_CHECK = """
import sys, torch, transformers as tf
path, prompt = sys.argv[1], sys.argv[2]
tok = tf.AutoTokenizer.from_pretrained(path)
model = tf.AutoModelForCausalLM.from_pretrained(path).eval()
ids = tok(prompt, return_tensors="pt")
with torch.no_grad():
    gen = model.generate(**ids, do_sample=False, max_new_tokens=24)
print(f"transformers loaded {type(model).__name__} from {path}; greedy continuation:")
print(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""
