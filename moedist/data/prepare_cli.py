"""`moedist data prepare CONFIG [key=value ...]`: tokenize and cache the config's data.sources.

    moedist data prepare configs/sft.yaml data.seq_len=1024

Prints one line per source (documents, tokens, loss tokens, train/validation
sequences) and the cache directory. Running it once before a multi-process
launch means no rank tokenizes at start-up. A bad config or bad input exits 2
with one line on stderr and leaves no partial cache.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from moedist.config_yaml import ConfigError

PROG = "moedist data"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Data tools for data.sources.")
    subs = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prep = subs.add_parser("prepare", help="tokenize and cache every data.sources entry",
                           description="Tokenize every data.sources entry of CONFIG into the memory-mapped "
                                       "cache (data.cache_dir) and print per-source statistics.")
    prep.add_argument("config", metavar="CONFIG", help="YAML config file")
    prep.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.seq_len=512")
    return parser


def _fmt(n: int) -> str:
    return f"{n:,}"


def prepare(config: str, overrides: List[str], progress: bool = True) -> int:
    """Build the cache of every source and print one line per source.

    Raises:
        ConfigError: bad config, no data.sources, or bad input.
    """
    from moedist.config import load_config
    from moedist.data.dataset import build_data

    cfg = load_config(config, overrides)
    if not cfg.data.sources:
        raise ConfigError(f"data.sources is empty in {config!r}: `moedist data prepare` tokenizes data.sources "
                          "(a list of {name, path, format}); data.source=pydoc/stdlib/file needs no preparing")
    data = build_data(cfg, progress=progress)
    width = max(len(n) for n in data.names)
    for name in data.names:
        st = data.stats[name]
        print(f"{name:<{width}}  documents {_fmt(st['documents'])}  tokens {_fmt(st['tokens'])}  "
              f"loss tokens {_fmt(st['loss_tokens'])}  train sequences {_fmt(st['train_sequences'])}  "
              f"val sequences {_fmt(st['val_sequences'])}  ({data.cache_paths[name]})")
    print(f"tokenizer {data.tokenizer.kind} ({data.tokenizer.fingerprint()}), data.seq_len={data.seq_len}, "
          f"training sequences per epoch {_fmt(data.num_train)}")
    print(f"cache: {os.path.expanduser(cfg.data.cache_dir)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `moedist data` (argv after "data"). Returns the exit code."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return prepare(args.config, args.overrides, progress=True)
    except ConfigError as err:
        print(f"moedist: error: {err}", file=sys.stderr)
        return 2
