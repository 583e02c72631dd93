"""A small random Hugging Face Qwen3-MoE with its own BPE tokenizer, made offline in seconds.

    python -m moedist.models.toy_hf runs/toy_qwen3_moe          # tokenizer + model in one directory
    path = make_toy_hf_model("runs/toy_qwen3_moe", seed=0)

What the README's "Fine-tune a Hugging Face model" journey, the HF demo and the
tests start from where no real checkpoint can be downloaded: `transformers`
`Qwen3MoeForCausalLM.save_pretrained` (config.json + model.safetensors) beside a
byte-level BPE tokenizer trained on pydoc prose (`moedist.data.bpe`), with the
chat template and eos of a Qwen-style model. Swap in a real directory (e.g. a
downloaded Qwen3-30B-A3B) and every command stays the same.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def make_toy_hf_model(out_dir: str, seed: int = 0, vocab_size: int = 600, hidden_size: int = 64,
                      num_layers: int = 2, num_experts: int = 4, top_k: int = 2, dense: bool = False) -> str:
    """Write tokenizer + random Qwen3-MoE (every layer MoE, norm_topk_prob; `dense`: a dense Qwen3) into
    `out_dir`; returns it."""
    import torch
    import transformers as tf

    from moedist.data.bpe import train_bpe_tokenizer

    train_bpe_tokenizer(out_dir, vocab_size=vocab_size)
    tok = tf.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    cfg = tf.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            moe_intermediate_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=hidden_size // 4, max_position_embeddings=256,
                            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                            tie_word_embeddings=False)
    if dense:
        cfg = tf.Qwen3Config(**{k: v for k, v in cfg.to_dict().items() if k in tf.Qwen3Config().to_dict()
                                and k not in ("architectures", "model_type", "transformers_version")})
    torch.manual_seed(seed)
    model = (tf.Qwen3ForCausalLM(cfg) if dense else tf.Qwen3MoeForCausalLM(cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # visible routing (router std 1) and non-trivial weights
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(noise)
            else:
                p.copy_(0.05 * noise)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moedist.models.toy_hf", description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory to write (tokenizer + config.json + model.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=600)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--dense", action="store_true", help="a dense Qwen3 instead (e.g. to upcycle into LoRA-MoE)")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"toy_hf: error: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    make_toy_hf_model(args.out, args.seed, args.vocab_size, args.hidden_size, args.num_layers, args.num_experts,
                      dense=args.dense)
    what = "Qwen3" if args.dense else f"Qwen3-MoE ({args.num_experts} experts)"
    print(f"wrote a random {what} ({args.num_layers} layers) and its BPE tokenizer to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
