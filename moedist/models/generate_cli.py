"""`moedist generate`: continue a prompt with a trained run, a checkpoint or a Hugging Face model.

    moedist generate runs/tiny --prompt "def "                      # sampled (temperature 1, top-p 1)
    moedist generate runs/sft/final --prompt "Hi" --chat --temperature 0 --max-new-tokens 128   # greedy
    moedist generate path/to/hf_model --prompt "The" --temperature 0.7 --top-p 0.9 --seed 1

PATH is a moedist run directory (its ``final/``, else the checkpoint named by
``checkpoints/latest``), a moedist checkpoint (``manifest.json``) or a Hugging
Face model directory (``config.json`` + safetensors). Defaults follow
transformers: temperature 1.0 and top-p 1.0 (plain sampling); ``--temperature 0``
is greedy decoding. Nothing is unpickled: a PATH holding pickle files is refused.

The tokenizer is the one saved in the checkpoint, else in the run directory
(else the Hugging Face directory's own). A Hugging Face tokenizer encodes the
prompt as transformers does by default (with its special tokens, e.g. BOS);
``--chat`` renders the prompt as one user turn of the chat template with the
assistant's generation prompt. Generation stops at an end-of-sequence id: the
Hugging Face directory's ``generation_config.json`` ``eos_token_id`` (int or
list), else its ``config.json`` one, else the tokenizer's.

stdout gets only the decoded continuation (special tokens skipped) and a
newline; warnings go to stderr; bad input is one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

PROG = "moedist generate"


class UsageError(ValueError):
    """A bad command line (reported as one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and a second line
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Generate a continuation of a prompt with a moedist run, a moedist "
                "checkpoint or a Hugging Face model directory.")
    p.add_argument("path", metavar="PATH", help="moedist run directory, moedist checkpoint, or Hugging Face directory")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most new tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1.0); 0 = greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0 = off)")
    p.add_argument("--chat", action="store_true",
                   help="render the prompt as one user turn of the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return p


@dataclass
class Source:
    """Where the model, tokenizer and stop ids come from."""

    kind: str                 # "moedist" | "hf"
    model_dir: str            # the checkpoint directory, or the Hugging Face directory
    run_dir: Optional[str]    # the run the checkpoint belongs to (tokenizer fallback), if any


def _run_dir_of(ckpt: str) -> str:
    """runs/x for runs/x/final and runs/x/checkpoints/step_N."""
    parent = os.path.dirname(os.path.abspath(ckpt))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent


def resolve_source(path: str) -> Source:
    """Classify PATH (refusing pickles before anything in it is read).

    Raises:
        ValueError: (ConfigError for pickles) PATH is missing or not a model directory.
    """
    from moedist.checkpoint.safety import refuse_pickles

    if not os.path.exists(path):
        raise ValueError(f"PATH={path!r}: no such directory")
    if not os.path.isdir(path):
        raise ValueError(f"PATH={path!r}: not a directory (a moedist run/checkpoint or a Hugging Face model directory)")
    refuse_pickles(path, "generate PATH")
    has = (lambda *parts: os.path.isfile(os.path.join(path, *parts)))
    if has("final", "manifest.json"):
        src = Source("moedist", os.path.join(path, "final"), path)
    elif has("checkpoints", "latest"):
        with open(os.path.join(path, "checkpoints", "latest"), encoding="utf-8") as fh:
            tag = fh.read().strip()
        ckpt = os.path.join(path, "checkpoints", tag)
        if not os.path.isfile(os.path.join(ckpt, "manifest.json")):
            raise ValueError(f"PATH={path!r}: checkpoints/latest names {tag!r}, which is not a checkpoint "
                             "(no manifest.json)")
        src = Source("moedist", ckpt, path)
    elif has("manifest.json"):
        src = Source("moedist", path, _run_dir_of(path))
    elif has("latest"):  # a run's checkpoints/ folder
        with open(os.path.join(path, "latest"), encoding="utf-8") as fh:
            ckpt = os.path.join(path, fh.read().strip())
        if not os.path.isfile(os.path.join(ckpt, "manifest.json")):
            raise ValueError(f"PATH={path!r}: its 'latest' does not name a checkpoint (no manifest.json)")
        src = Source("moedist", ckpt, _run_dir_of(ckpt))
    elif has("config.json"):
        src = Source("hf", path, None)
    else:
        raise ValueError(f"PATH={path!r}: not a moedist run directory (final/ or checkpoints/latest), a moedist "
                         "checkpoint (manifest.json) or a Hugging Face model directory (config.json)")
    refuse_pickles(src.model_dir, "generate PATH")
    return src


def load_tokenizer_for(src: Source):
    """The checkpoint's tokenizer, else the run directory's (ValueError when there is none)."""
    from moedist.data.tokenizer import tokenizer_from_dir

    places = [src.model_dir] + ([src.run_dir] if src.run_dir else [])
    for place in places:
        tok = tokenizer_from_dir(place)
        if tok is not None:
            return tok
    raise ValueError(f"no tokenizer found in {' or '.join(repr(p) for p in places)} (expected Hugging Face "
                     "tokenizer files or moedist_tokenizer.json)")


def eos_ids_for(src: Source, tok) -> List[int]:
    """Stop ids: generation_config.json / config.json eos_token_id of a Hugging Face directory, else the tokenizer's."""
    if src.kind == "hf":
        for name in ("generation_config.json", "config.json"):
            f = os.path.join(src.model_dir, name)
            if not os.path.isfile(f):
                continue
            with open(f, encoding="utf-8") as fh:
                value = json.load(fh).get("eos_token_id")
            if value is not None:
                return [int(v) for v in (value if isinstance(value, list) else [value])]
    return [] if tok.eos_id is None else [int(tok.eos_id)]


def load_model(src: Source):
    """The `CausalLM` of a moedist checkpoint or Hugging Face directory (fp32, as the checkpoint's config builds it)."""
    if src.kind == "hf":
        from moedist.models.hf_import import from_hf

        model, _ = from_hf(src.model_dir, data={"seq_len": 2})  # data.seq_len is a training setting: any that fits
        return model
    from moedist.models.convert_cli import load_model_checkpoint

    model, _ = load_model_checkpoint(src.model_dir)
    return model


def prompt_ids(tok, prompt: str, chat: bool) -> List[int]:
    """Token ids of the prompt: as transformers encodes text by default, or a rendered chat turn."""
    if chat:
        text = tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)  # the template already holds the special tokens
    return tok.encode(prompt, add_special_tokens=True)


def pick_device(name: Optional[str]):
    """--device as a torch.device (default: cuda when available, else cpu)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device={name!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={name!r}: CUDA is not available here")
    return device


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `moedist generate` (argv without the subcommand name). Returns the exit code."""
    try:
        return _run(_parser().parse_args(argv))
    except ValueError as err:  # ConfigError and UsageError are ValueErrors
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from moedist.models.generate import check_sampling, generate, new_token_room

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    device = pick_device(args.device)
    src = resolve_source(args.path)
    tok = load_tokenizer_for(src)
    ids = prompt_ids(tok, args.prompt, args.chat)
    model = load_model(src)
    vocab = model.embed_tokens.num_embeddings
    if ids and max(ids) >= vocab:
        raise ValueError(f"the prompt has token id {max(ids)}, but the model embeds only {vocab} tokens: "
                         "the tokenizer does not belong to this model")
    if not ids:
        raise ValueError("--prompt: encodes to no tokens")
    room = new_token_room(model, len(ids))
    if args.max_new_tokens > room:
        print(f"{PROG}: warning: the prompt has {len(ids)} tokens and model.max_seq_len={model.max_seq_len}: "
              f"at most {room} new tokens", file=sys.stderr)
    new = generate(model.to(device), ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, eos_ids=eos_ids_for(src, tok), seed=args.seed)
    sys.stdout.write(tok.decode(new, skip_special_tokens=True) + "\n")
    sys.stdout.flush()
    return 0
