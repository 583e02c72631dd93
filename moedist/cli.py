"""`moedist` command line: dispatch only; each subcommand lives in its own module.

    moedist train CONFIG [key=value ...]      # e.g. moedist train configs/tiny.yaml moe.top_k=1
    moedist train CONFIG --print-config       # resolved config as YAML
    moedist train --help-config[=markdown]    # every config key with type, default and help
    moedist doctor [--timeout-s S]            # versions, launcher, ranks; timed collectives, verdict

Subcommands are registered in :data:`COMMANDS` by ``"module:function"`` and
imported only when run, so ``moedist --help`` and config errors never pay for
importing torch. Two kinds:

* ``config`` commands (train): the CLI loads and validates the config
  first (a bad config exits 2 with one line on stderr, before anything is
  created), then calls ``function(cfg, args)``; ``args.config`` and
  ``args.overrides`` hold what was given.
* ``argv`` commands (bench, convert, ...): ``function(argv)`` gets the rest of
  the command line untouched and parses it itself.

A function returns an exit code (None = 0). A :class:`ConfigError` it raises
(e.g. ``validate_world_size``) is reported like a load error: one line, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from dataclasses import dataclass

from moedist.config import ConfigError, config_schema, config_to_dict, dump_yaml, load_config


@dataclass(frozen=True)
class Command:
    target: str          # "package.module:function"
    help: str
    takes_config: bool   # True: function(cfg, args); False: function(argv) -> exit code


# The registry. Owners: point your subcommand at your module here (one line).
COMMANDS: dict[str, Command] = {
    "train": Command("moedist.train.run:main_train", "train or fine-tune from a YAML config", True),
    "eval": Command("moedist.train.evaluate:main_eval", "moedist eval RUN_OR_CKPT [...] [key=value ...] [--json] "
                    "[--table T.md] [--plot P.png]: validation loss per domain of runs, checkpoints or HF "
                    "directories, side by side (same at any world size)", False),
    "bench": Command("moedist.bench.cli:main", "benchmark MoE layers and all-to-all", False),
    "convert": Command("moedist.models.convert_cli:main", "convert Hugging Face <-> moedist checkpoints", False),
    "merge": Command("moedist.checkpoint.cli:main_merge", "merge LoRA adapters into the base weights; --method "
                     "average|task_arithmetic|ties|lorahub: combine several fine-tunes of one base", False),
    "extract": Command("moedist.checkpoint.cli:main_extract", "write an adapter-only checkpoint "
                       "from a full one (PEFT export: moedist convert peft); --domain NAME: one domain's "
                       "sub-model", False),
    "grow": Command("moedist.checkpoint.grow:main_grow", "add experts to a trained checkpoint's expert group",
                    False),
    "generate": Command("moedist.models.generate_cli:main", "generate text from a moedist run/checkpoint or a "
                        "Hugging Face directory", False),
    "data": Command("moedist.data.prepare_cli:main", "moedist data prepare CONFIG: tokenize and cache the "
                    "data sources", False),
    "demo": Command("moedist.train.demo:main", "run the 2-process LoRA-MoE fine-tuning demo", False),
    "plan": Command("moedist.plan.cli:main", "per-rank memory estimate of a layout (--world-size N)", False),
    "doctor": Command("moedist.distributed.doctor:main", "versions, launcher, ranks, network interface; "
                      "a timed all-reduce and all-to-all with a verdict", False),
}

# The deepspeed launcher appends --local_rank=N (it also sets LOCAL_RANK in the environment).
_LOCAL_RANK = re.compile(r"^--local[-_]rank(=\d+)?$")


def _strip_local_rank(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        m = _LOCAL_RANK.match(argv[i])
        if m is None:
            out.append(argv[i])
        elif m.group(1) is None and i + 1 < len(argv) and argv[i + 1].isdigit():
            i += 1                                   # "--local_rank 3": drop the value too
        i += 1
    return out


def _resolve(name: str):
    """The function registered for ``name``; a registry entry that does not import is a bug, not "later"."""
    module_name, _, func_name = COMMANDS[name].target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def _error(message: str) -> int:
    print(f"moedist: error: {message}", file=sys.stderr)
    return 2


def describe_config(markdown: bool = False) -> str:
    """Every config key with type, default, allowed values and help: plain text or Markdown tables."""
    out, section = [], None
    for info in config_schema():
        new = info.key.split(".")[0] if "." in info.key else "top level"
        if new != section:
            section = new
            title = f"`{section}`" if "." in info.key else section
            out += ["", f"### {title}", "", "| key | type | default | allowed | description |",
                    "|---|---|---|---|---|"] if markdown else ["", f"[{section}]"]
        if markdown:
            cells = [f"`{info.key}`", info.type_name, f"`{info.default_text}`", info.allowed, info.help]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        else:
            allowed = f"  ({info.allowed})" if info.allowed else ""
            out += [f"  {info.key}: {info.type_name} = {info.default_text}{allowed}", f"      {info.help}"]
    return "\n".join(out).strip() + "\n"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("moedist")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moedist", description="Distributed Mixture-of-Experts "
                                     "training and LoRA-MoE fine-tuning.")
    parser.add_argument("--version", action="version", version=f"moedist {_version()}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        if not cmd.takes_config:
            subs.add_parser(name, help=cmd.help, add_help=False)   # dispatched before parsing
            continue
        sub = subs.add_parser(name, help=cmd.help, description=cmd.help,
                              usage=f"moedist {name} [CONFIG] [key=value ...] [options]")
        sub.add_argument("items", nargs="*", metavar="CONFIG key=value",
                         help="YAML config file (omit for defaults), then dotted overrides such as "
                              "moe.top_k=1 or lora.targets=[gate,up]")
        sub.add_argument("--print-config", action="store_true",
                         help="print the resolved config as YAML and exit")
        sub.add_argument("--help-config", nargs="?", const="text", choices=("text", "markdown"),
                         help="describe every config key and exit")
        if name == "train":
            sub.add_argument("--overwrite", action="store_true",
                             help="delete another run's results in train.output_dir first (default: refuse, "
                                  "unless train.resume=auto continues that run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moedist`` console script and ``python -m moedist``."""
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] in COMMANDS and not COMMANDS[argv[0]].takes_config:
        return _run(argv[0], lambda fn: fn(argv[1:]))
    args = _parser().parse_args(argv)
    if args.help_config:
        print(describe_config(markdown=args.help_config == "markdown"), end="")
        return 0
    items = args.items
    has_file = bool(items) and ("=" not in items[0] or os.path.isfile(items[0]))
    args.config, args.overrides = (items[0], items[1:]) if has_file else (None, items)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _error(str(err))
    if args.print_config:
        if cfg.model.from_hf is not None or cfg.model.init_from is not None:  # what the run will use
            try:
                from moedist.train.preflight import resolve_hf

                cfg = resolve_hf(cfg)
            except ConfigError as err:
                return _error(str(err))
        print(dump_yaml(config_to_dict(cfg)), end="")
        return 0
    return _run(args.command, lambda fn: fn(cfg, args))


def _run(name: str, call) -> int:
    fn = _resolve(name)
    try:
        rc = call(fn)
    except ConfigError as err:
        return _error(str(err))
    return 0 if rc is None else int(rc)


if __name__ == "__main__":      # `python -m moedist.cli ...`, as the launch/ scripts run it
    sys.exit(main())
