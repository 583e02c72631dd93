"""`moedist extract` and `moedist merge`: adapter-only checkpoints out of full ones, and back.

    moedist extract CKPT OUT                                  # full checkpoint -> adapter-only checkpoint
    moedist extract CKPT --domain NAME OUT                    # one domain's sub-model (moedist.checkpoint.grow)
    moedist merge ADAPTER --base BASE OUT                     # base + adapter -> full moedist checkpoint
    moedist merge ADAPTER --base BASE OUT --format hf         # ... -> transformers directory, LoRA merged
    moedist merge --method ties --base BASE A B OUT           # several fine-tunes combined (moedist.merge.cli)

CKPT and ADAPTER are `moedist.checkpoint` checkpoints (manifest.json + safetensors
keyed by global expert id) or run directories whose ``latest`` names one.

`extract` keeps what the checkpoint's ``lora`` section trains (LoRA A/B, the
routers when lora.train_router, shared experts when lora.train_shared_experts),
with the full checkpoint's config, step and extra_state; optimizer state is dropped.

`merge` rebuilds the model the adapter was trained as (its config's ``lora`` and
``moe`` sections) on top of BASE, which is

* a moedist checkpoint whose parameter names are those of that model (e.g. the
  pre-fine-tuning checkpoint): its tensors are copied by name; or
* a moedist checkpoint of another layout (e.g. the dense model the LoRA-MoE was
  made from): converted in memory to Hugging Face tensors (its own LoRA merged),
  then imported like an HF directory; or
* a Hugging Face directory (config.json + safetensors): `moedist.models.from_hf`.

The adapter must fit exactly: each of its tensors names a parameter of that model
with the same shape, and it holds every parameter the model trains.
``--format hf`` writes the result with `to_hf(merge_lora=True)`: LoRA is folded
into the weights and LoRA-MoE layers become real experts (Mixtral / Qwen2-MoE).

Bad input is one line on stderr and exit code 2. Output is written into a
temporary directory beside OUT and renamed into place at the end, so a failed
run leaves no OUT behind. Nothing is unpickled.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

EXIT_BAD_INPUT = 2


class _UsageError(Exception):
    """argparse's complaint, reported as one line instead of usage + message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # noqa: D102 - argparse hook
        raise _UsageError(message)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _run(prog: str, parser: argparse.ArgumentParser, argv: Optional[List[str]], body) -> int:
    """Parse argv and run body(args); bad input becomes one stderr line and exit 2."""
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(f"{prog}: error: {err} (see {prog} --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as ex:  # --help
        return ex.code if isinstance(ex.code, int) else 0
    from safetensors import SafetensorError  # a truncated or foreign .safetensors file

    try:
        body(args)
    except (ValueError, KeyError, OSError, SafetensorError) as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{prog}: error: {' '.join(str(text).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


# ------------------------------------------------------------------ arguments and sizes

def _checkpoint_arg(label: str, path: str) -> Path:
    """The checkpoint directory `path` names (itself or a run dir's latest); ValueError otherwise."""
    from moedist.checkpoint.io import resolve_checkpoint

    if not os.path.exists(path):
        raise ValueError(f"{label}={path}: no such file or directory")
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{label}={path}: not a moedist checkpoint (no manifest.json, and no 'latest' "
                         "file naming one)")
    return ckpt


def _manifest(label: str, ckpt: Path, need_config: bool = True) -> dict:
    from moedist.checkpoint.io import read_manifest

    try:
        m = read_manifest(ckpt)
    except ValueError as err:  # also json.JSONDecodeError
        raise ValueError(f"{label}={ckpt}: unreadable manifest.json ({err})") from None
    missing = [k for k in ("index", "files", "step") if k not in m]
    if missing:
        raise ValueError(f"{label}={ckpt}: manifest.json lacks {', '.join(missing)}")
    if need_config and not m.get("config"):
        raise ValueError(f"{label}={ckpt}: the checkpoint has no config; cannot rebuild its model")
    return m


def full_source(label: str, src: str, out_path: str, overwrite: bool, if_adapter_only: str) -> tuple:
    """(checkpoint dir, manifest, output dir) of a command that reads a full checkpoint `src` and writes
    `out_path`; an adapter-only `src` is refused with `if_adapter_only`."""
    ckpt = _checkpoint_arg(label, src)
    m = _manifest(label, ckpt)
    out = _out_arg(out_path, overwrite)
    if m.get("adapter_only"):
        raise ValueError(f"{label}={ckpt}: {if_adapter_only}")
    return ckpt, m, out


def _out_arg(path: str, overwrite: bool = False) -> Path:
    """OUT, refused when it exists and is not empty unless --overwrite (emptied later by `_emptied`)."""
    from moedist.checkpoint.outdir import check_out

    check_out(path, overwrite, "OUT", clear=False)
    return Path(path)


def _emptied(out: Path, overwrite: bool) -> Path:
    """--overwrite: empty OUT right before the result is renamed into place (inputs were read already)."""
    from moedist.checkpoint.outdir import check_out

    check_out(os.fspath(out), overwrite, "OUT")
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def _staged(out: Path):
    """Yield a path in a temporary directory beside `out`; rename it to `out` when the body succeeds.

    On failure nothing is left: the temporary directory goes, and so do parent
    directories this call created.
    """
    created = []
    parent = out.absolute().parent
    for d in reversed([parent, *parent.parents]):
        if not d.exists():
            d.mkdir()
            created.append(d)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    ok = False
    try:
        yield tmp_root / out.name
        os.replace(tmp_root / out.name, out)  # an existing empty OUT is replaced
        ok = True
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        if not ok:
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()


def _config(label: str, ckpt: Path, raw: dict, clear_from_hf: bool):
    """The MoedistConfig stored in a manifest, with paths that only mattered to training made harmless.

    A stale model.from_hf (merge takes the base from --base), train.resume or
    data.path would otherwise fail validation on another machine.
    """
    from moedist.config import ConfigError, config_from_dict

    raw = copy.deepcopy(raw)
    model, train, data = (raw.setdefault(s, {}) or {} for s in ("model", "train", "data"))
    if clear_from_hf:
        model["from_hf"] = None
    if train.get("resume") not in (None, "auto"):
        train["resume"] = None
    if data.get("source") == "file" and not (data.get("path") and os.path.isfile(data["path"])):
        data["source"], data["path"] = "pydoc", None
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ValueError(f"{label}={ckpt}: config in manifest.json: {err}") from None


def _load_model(label: str, ckpt: Path, m: dict):
    """(model, cfg) of a checkpoint, as `convert_cli.load_model_checkpoint` but tolerant of stale paths.

    model.from_hf is used when it is a directory (an adapter-only checkpoint needs
    it); otherwise the stored dimensions and architecture facts are used.
    """
    import torch

    from moedist.checkpoint.io import load_checkpoint
    from moedist.models.build import build_model
    from moedist.models.hf_import import apply_hf_config, load_hf_weights_into

    from_hf = (m["config"].get("model") or {}).get("from_hf")
    usable = bool(from_hf) and os.path.isdir(from_hf)
    if m.get("adapter_only") and not usable:
        raise ValueError(f"{label}={ckpt}: an adapter-only checkpoint whose base (model.from_hf={from_hf!r}) "
                         "is not a directory here")
    cfg = _config(label, ckpt, m["config"], clear_from_hf=not usable)
    try:
        cfg = apply_hf_config(cfg)
    except ValueError as err:
        raise ValueError(f"{label}={ckpt}: model.from_hf={from_hf}: {err}") from None
    model = build_model(cfg)
    if m.get("adapter_only"):
        load_hf_weights_into(model, cfg.model.from_hf)
    with torch.random.fork_rng(devices=[]):  # load_checkpoint restores the saved RNG state
        load_checkpoint(ckpt, model, load_optim=False)
    return model, cfg


# ------------------------------------------------------------------ extract

def _extract_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moedist extract", description="Write an adapter-only checkpoint (the parameters the "
                "config's lora section trains: LoRA adapters, routers, ...) from a full checkpoint.")
    p.add_argument("ckpt", metavar="CKPT", help="full moedist checkpoint, or a run directory (its final/, else "
                   "its latest checkpoint)")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory (must not exist, or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists and is not empty")
    p.add_argument("--domain", metavar="NAME", default=None,
                   help="instead: write the full sub-model of one domain: shared parts plus the experts of "
                        "moe.expert_groups[NAME] renumbered 0..g-1, router rows sliced, num_experts=g; its logits on "
                        "that domain equal the full model's (default: none, adapter-only extraction)")
    return p


def main_extract(argv: Optional[List[str]] = None) -> int:
    """Entry point of `moedist extract` (argv without the subcommand name). Returns the exit code."""
    def body(a):
        if a.domain is None:
            return extract(a.ckpt, a.out, a.overwrite)
        from moedist.checkpoint.grow import extract_domain

        return extract_domain(a.ckpt, a.domain, a.out, a.overwrite)

    return _run("moedist extract", _extract_parser(), argv, body)


def extract(src: str, out_path: str, overwrite: bool = False) -> Path:
    """Write the trainable parameters of the full checkpoint `src` as an adapter-only checkpoint at `out_path`.

    Raises:
        ValueError: `src` is missing, not a checkpoint, already adapter-only, or
            has nothing to extract (lora.mode none); `out_path` is not empty.
    """
    from moedist.checkpoint.io import save_checkpoint

    t0 = time.perf_counter()
    ckpt, m, out = full_source("CKPT", src, out_path, overwrite, "already an adapter-only checkpoint; nothing to extract")
    mode = (m["config"].get("lora") or {}).get("mode", "none")
    if mode == "none":
        raise ValueError(f"CKPT={ckpt}: its config has lora.mode='none' (every parameter trains), so there is "
                         "no adapter to extract; extract works on moe_lora, expert_lora and full checkpoints")
    _say(f"[1/2] reading {ckpt} (step {m['step']}, lora.mode={mode}, {_fmt_bytes(_dir_bytes(ckpt))})")
    model, _ = _load_model("CKPT", ckpt, m)
    total = sum(p.numel() for p in model.parameters())
    kept = sum(p.numel() for p in model.parameters() if p.requires_grad)
    persistent = set(model.state_dict())
    dropped = [n for n, b in model.named_buffers() if b is not None and n in persistent]
    if dropped:  # adapter-only checkpoints hold parameters only
        _say(f"warning: buffers not kept (merge takes them from the base): {', '.join(dropped)}")
    extra = dict(m.get("extra_state") or {}, extracted_from=str(ckpt))
    n_keys = sum(trains for _, _, trains in _expected(model).values())
    _say(f"[2/2] writing {n_keys} trainable tensors ({kept:,} of {total:,} parameters) to {out}")
    with _staged(_emptied(out, overwrite)) as tmp:
        save_checkpoint(tmp, model, step=int(m["step"]), config=m["config"], extra_state=extra, adapter_only=True)
    before, after = _dir_bytes(ckpt), _dir_bytes(out)
    _say(f"size: {_fmt_bytes(before)} -> {_fmt_bytes(after)} ({100.0 * after / max(before, 1):.1f}%); "
         f"parameters: {total:,} -> {kept:,} ({100.0 * kept / max(total, 1):.2f}%)")
    _say(f"extracted adapter (lora.mode={mode}, step {m['step']}) from {ckpt} to {out} "
         f"in {time.perf_counter() - t0:.1f} s")
    return out


# ------------------------------------------------------------------ merge

def _merge_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moedist merge", description="Apply an adapter-only checkpoint to its base model and "
                "write a full moedist checkpoint or a Hugging Face directory with LoRA merged in.")
    p.add_argument("adapter", metavar="ADAPTER_CKPT", help="adapter-only moedist checkpoint, as written by "
                   "moedist extract RUN_OR_CKPT OUT (a run's own checkpoints are full ones: extract them first)")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist, or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists and is not empty")
    p.add_argument("--base", metavar="BASE", help="base model: moedist checkpoint or Hugging Face directory "
                   "(default: the adapter config's model.from_hf)")
    p.add_argument("--format", choices=("moedist", "hf"), default="moedist",
                   help="moedist: full checkpoint (LoRA kept as adapters); hf: transformers directory with "
                        "LoRA merged into the weights (LoRA-MoE -> Mixtral/Qwen2-MoE) (default moedist)")
    p.add_argument("--method", choices=("average", "task_arithmetic", "ties", "lorahub"), default=None,
                   help="instead combine several fine-tunes of one base: moedist merge --method METHOD [--base BASE] "
                        "MODEL MODEL ... OUT (flags and defaults: moedist merge --method ties --help); default: "
                        "apply ADAPTER_CKPT to BASE")
    return p


def main_merge(argv: Optional[List[str]] = None) -> int:
    """Entry point of `moedist merge` (argv without the subcommand name). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--method" or a.startswith("--method=") for a in argv):  # several fine-tunes: moedist.merge
        from moedist.merge.cli import main

        return main(argv)
    return _run("moedist merge", _merge_parser(), argv, lambda a: merge(*_no_pickles(a.adapter, a.base), a.out, a.format,
                                                                        a.overwrite))


def _no_pickles(adapter: str, base: Optional[str]) -> Tuple[str, Optional[str]]:
    """Refuse either input before anything in them is read (both, whatever the order of checks after)."""
    from moedist.checkpoint.safety import refuse_pickles

    for label, path in (("ADAPTER_CKPT", adapter), ("--base", base)):
        if path is not None and os.path.exists(path):
            refuse_pickles(path, label)
    return adapter, base


def _base_arg(path: Optional[str], stored_from_hf: Optional[str]) -> Tuple[str, Path]:
    """("moedist", checkpoint dir) or ("hf", directory) for --base."""
    from moedist.checkpoint.io import resolve_checkpoint

    if path is None:
        if not stored_from_hf:
            raise ValueError("--base: required (the adapter's config has no model.from_hf to default to)")
        path = stored_from_hf
    if not os.path.exists(path):
        raise ValueError(f"--base {path}: no such file or directory")
    ckpt = resolve_checkpoint(path)
    if ckpt is not None:
        return "moedist", ckpt
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", Path(path)
    raise ValueError(f"--base {path}: neither a moedist checkpoint (manifest.json, or a run directory with "
                     "'latest') nor a Hugging Face directory (config.json)")


def _expected(model) -> Dict[str, Tuple[str, tuple, bool]]:
    """Checkpoint key -> (parameter name, shape of that key's tensor, trains) for every parameter."""
    from moedist.checkpoint.keys import global_keys_for, param_slots

    slots, out = param_slots(model), {}
    for name, p in model.named_parameters():
        if name in slots:
            for key in global_keys_for(name, slots[name]):
                out[key] = (name, tuple(p.shape[1:]), p.requires_grad)
        else:
            out[name] = (name, tuple(p.shape), p.requires_grad)
    return out


def _tensor_keys(manifest: dict) -> List[str]:
    from moedist.checkpoint.io import OPT_SEP

    return [k for k in manifest["index"] if OPT_SEP not in k]


def _check_shapes(ckpt: Path, manifest: dict, keys: List[str], expected, nope: str, what: str) -> int:
    """Compare the stored shapes of `keys` (safetensors headers only) with `expected`; returns their numel."""
    from safetensors import safe_open

    numel, handles = 0, {}
    for key in keys:
        fname = manifest["index"][key]
        if fname not in handles:
            handles[fname] = safe_open(str(ckpt / fname), "pt")
        shape = tuple(handles[fname].get_slice(key).get_shape())
        if shape != expected[key][1]:
            other = "the adapter's model" if what == "base" else "the base model"
            raise ValueError(f"{nope} {key}: {what} shape {shape} != {expected[key][1]} in {other}")
        n = 1
        for d in shape:
            n *= d
        numel += n
    return numel


def _load_base(kind: str, base: Path, acfg, adapter_keys: List[str]):
    """(model, cfg): the adapter's model with the base weights in it (adapter parameters at init)."""
    import torch

    from moedist.checkpoint.io import load_checkpoint, verify_checkpoint
    from moedist.models.build import build_model
    from moedist.models.hf_export import describe, hf_state_dict
    from moedist.models.hf_import import from_hf, load_hf_weights_into
    from moedist.models.hf_maps import hf_config_dict, hf_to_moedist_config

    if kind == "hf":
        try:
            return from_hf(str(base), cfg=acfg)
        except ValueError as err:
            raise ValueError(f"--base {base}: {err}") from None
    bm = _manifest("--base", base, need_config=False)
    model = build_model(acfg)
    expected = _expected(model)
    adapter_set = set(adapter_keys)
    missing = [k for k in expected if k not in adapter_set and k not in bm["index"]]
    if not bm.get("adapter_only") and not missing:  # the same layout: copy by name
        verify_checkpoint(base)
        _check_shapes(base, bm, [k for k in expected if k not in adapter_set], expected,
                      f"adapter does not fit the base {base}:", "base")
        with torch.random.fork_rng(devices=[]):
            load_checkpoint(base, model, strict=False, load_optim=False, verify=False)
        return model, acfg
    # Another layout (e.g. dense -> LoRA-MoE, plain -> LoRA): through Hugging Face tensors in memory.
    if not bm.get("config"):
        raise ValueError(f"--base {base}: its parameters are laid out differently from the adapter's model "
                         f"(no {missing[0]}), and it has no config to rebuild it from")
    why = f"its parameters are laid out differently from the adapter's model (no {missing[0]})" if missing else \
        "it is an adapter-only checkpoint"
    _say(f"      {why}: converting it through Hugging Face tensors")
    base_model, _ = _load_model("--base", base, bm)
    try:
        spec = describe(base_model)
    except ValueError as err:
        raise ValueError(f"--base {base}: {why}, and it has no Hugging Face form to convert through: {err}") from None
    state = hf_state_dict(base_model, spec, merge_lora=True)
    del base_model
    try:
        cfg = hf_to_moedist_config(hf_config_dict(spec), base=acfg)
        model = build_model(cfg)
        load_hf_weights_into(model, state)
    except ValueError as err:
        raise ValueError(f"--base {base}: {err}") from None
    return model, cfg


def _apply_adapter(model, adapter: Path, am: dict, base: Path) -> int:
    """Check that the adapter fits `model` exactly, then load it. Returns its parameter count."""
    import torch

    from moedist.checkpoint.io import load_checkpoint

    expected = _expected(model)
    keys = _tensor_keys(am)
    nope = f"adapter does not fit the base {base}:"
    for key in keys:
        if key not in expected:
            raise ValueError(f"{nope} adapter tensor {key} has no place in the model (different lora/moe "
                             "layout or number of experts/layers?)")
    order = {k: i for i, k in enumerate(expected)}  # report the first misfit in model order
    numel = _check_shapes(adapter, am, sorted(keys, key=order.__getitem__), expected, nope, "adapter")
    lacking = [k for k, (_, _, trains) in expected.items() if trains and k not in set(keys)]
    if lacking:
        more = f" (+{len(lacking) - 1} more)" if len(lacking) > 1 else ""
        raise ValueError(f"{nope} the adapter lacks {lacking[0]}{more}, which its lora config trains")
    with torch.random.fork_rng(devices=[]):
        load_checkpoint(adapter, model, load_optim=False, verify=False)  # verified before
    return numel


def merge(adapter_arg: str, base_arg: Optional[str], out_path: str, fmt: str = "moedist",
          overwrite: bool = False) -> Path:
    """Apply the adapter-only checkpoint `adapter_arg` to `base_arg` and write the full model to `out_path`.

    Args:
        adapter_arg: adapter-only moedist checkpoint (or run directory).
        base_arg: moedist checkpoint or Hugging Face directory; None = the
            adapter config's model.from_hf.
        out_path: output directory (must not exist or be empty).
        fmt: "moedist" (full checkpoint) or "hf" (transformers directory, LoRA merged).

    Raises:
        ValueError: a missing path, not a checkpoint, or an adapter that does not
            fit the base (naming the tensor); nothing is written then.
    """
    import torch

    from moedist.checkpoint.io import verify_checkpoint
    from moedist.models.convert_cli import save_model_checkpoint
    from moedist.models.hf_export import to_hf

    if fmt not in ("moedist", "hf"):
        raise ValueError(f"--format={fmt!r}: allowed moedist, hf")
    t0 = time.perf_counter()
    adapter = _checkpoint_arg("ADAPTER_CKPT", adapter_arg)
    am = _manifest("ADAPTER_CKPT", adapter)
    if not am.get("adapter_only"):
        raise ValueError(f"ADAPTER_CKPT={adapter}: a full checkpoint (adapter_only=false); merge applies an "
                         "adapter-only checkpoint (make one with moedist extract)")
    out = _out_arg(out_path, overwrite)
    kind, base = _base_arg(base_arg, (am["config"].get("model") or {}).get("from_hf"))
    verify_checkpoint(adapter)
    acfg = _config("ADAPTER_CKPT", adapter, am["config"], clear_from_hf=True)
    keys = _tensor_keys(am)
    _say(f"[1/4] adapter {adapter}: step {am['step']}, lora.mode={acfg.lora.mode}, {len(keys)} tensors "
         f"({_fmt_bytes(_dir_bytes(adapter))})")
    _say(f"[2/4] loading base {base} ({'moedist checkpoint' if kind == 'moedist' else 'Hugging Face directory'})")
    with torch.no_grad():
        model, cfg = _load_base(kind, base, acfg, keys)
    _say(f"[3/4] applying adapter ({len(keys)} tensors)")
    n_adapter = _apply_adapter(model, adapter, am, base)
    model.eval()
    total = sum(p.numel() for p in model.parameters())
    with _staged(_emptied(out, overwrite)) as tmp:
        if fmt == "hf":
            _say(f"[4/4] writing Hugging Face directory (LoRA merged) to {out}")
            written = f"Hugging Face {to_hf(model, tmp, cfg, merge_lora=True)['model_type']} directory"
        else:
            _say(f"[4/4] writing moedist checkpoint to {out}")
            save_model_checkpoint(model, cfg, str(tmp), source=f"merge of {adapter} into {base}")
            written = "moedist checkpoint"
    _say(f"merged adapter {adapter} ({n_adapter:,} parameters) into {base}: {written} at {out} "
         f"({total:,} parameters, {_fmt_bytes(_dir_bytes(out))}) in {time.perf_counter() - t0:.1f} s")
    return out
