"""Layout-independent checkpoints: safetensors keyed by global expert id + a JSON manifest.

Directory `step_000123/`:
    manifest.json              config, step, layout, file list with SHA-256, key -> file index
    model-dense.safetensors    non-expert tensors (written by global rank 0)
    model-experts-epK.safetensors   experts held by EP rank K (written by its first replica)
    optim-*.safetensors        optimizer state, same split, keys "<state>::<tensor key>"
    rng-rankR.safetensors      each rank's RNG states: global torch RNG and, from the trainer, every
                               private generator (`moedist.train.rng`); restored only at the same layout

A checkpoint saved at EP=4 loads at EP=2 or 1 (or 1 -> 4): each rank reads only
the global expert keys it now holds. Writes go to a temporary directory renamed
into place after every file is complete and hashed; `latest` is replaced
atomically, after that rename, so a process killed at any moment of a save leaves
the previous checkpoint (and `latest` naming it) intact. Nothing is ever unpickled.

A checkpoint that fails verification (missing file, SHA-256 mismatch, unreadable
manifest) raises `CorruptCheckpoint`, a `ConfigError`: one line naming the file.

Test-only hook: `MOEDIST_TEST_SAVE_PAUSE=<dir name>` makes the save of that checkpoint
print a line and sleep for a minute after every file is written and before the rename
(tests/reliability/test_checkpoint_integrity.py kills the process there).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from moedist.checkpoint.keys import global_keys_for, param_slots, split_to_global
from moedist.config_yaml import ConfigError

FORMAT = "moedist-checkpoint-v1"
OPT_SEP = "::"


class CorruptCheckpoint(ConfigError):
    """A checkpoint whose files do not match its manifest; one line naming the bad file."""


class CheckpointMismatch(ConfigError):
    """A checkpoint that does not fit the model built from the config (a tensor missing or of another
    shape), usually an override of an architecture key; one line naming the tensor."""


_MISMATCH_HINT = "(the model built from the config differs from the saved one: drop architecture overrides)"


@dataclass
class Layout:
    """Who this rank is: global rank/world, EP rank/size, and whether it writes its experts."""

    rank: int = 0
    world_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    edp_rank: int = 0

    @classmethod
    def from_dims(cls, dims) -> "Layout":
        if dims is None:
            return cls()
        return cls(dims.rank, dims.world_size, dims.ep_rank, dims.ep_size, dims.edp_rank)


@dataclass
class LoadedCheckpoint:
    step: int
    optim_state: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    extra_state: dict = field(default_factory=dict)
    config: Optional[dict] = None
    rng_restored: bool = False
    manifest: dict = field(default_factory=dict)
    rng_state: Dict[str, torch.Tensor] = field(default_factory=dict)  # this rank's, when the layout matches


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    from moedist.data.cache import file_sha256

    return file_sha256(path)


def _tensors_by_owner(model: nn.Module, optim_state, adapter_only: bool):
    """Split this rank's tensors into dense and expert dicts keyed globally."""
    slots = param_slots(model)
    dense, experts, opt_dense, opt_experts = {}, {}, {}, {}
    for name, p in model.named_parameters():
        if adapter_only and not p.requires_grad:
            continue
        t = p.detach().to("cpu").contiguous()
        states = (optim_state or {}).get(name, {})
        if name in slots:
            for key, sub in split_to_global(name, t, slots[name]):
                experts[key] = sub.clone()
            for sname, st in states.items():
                st = st.detach().to("cpu")
                if st.dim() == 0:  # e.g. Adam step: shared by the stack
                    for key in global_keys_for(name, slots[name]):
                        opt_experts[f"{sname}{OPT_SEP}{key}"] = st.clone()
                else:
                    for key, sub in split_to_global(name, st, slots[name]):
                        opt_experts[f"{sname}{OPT_SEP}{key}"] = sub.clone().contiguous()
        else:
            dense[name] = t
            for sname, st in states.items():
                opt_dense[f"{sname}{OPT_SEP}{name}"] = st.detach().to("cpu").contiguous()
    persistent = set(model.state_dict().keys())
    # adapter-only: keep the buffers of modules that train (e.g. a router's expert_bias)
    trained_modules = {n.rpartition(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    for name, b in model.named_buffers():
        if adapter_only and name.rpartition(".")[0] not in trained_modules:
            continue
        if b is not None and name in persistent:
            dense[f"buffer{OPT_SEP}{name}"] = b.detach().to("cpu").contiguous()
    return dense, experts, opt_dense, opt_experts


def _rng_tensors() -> dict:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def _test_pause(final: Path) -> None:
    """Test-only: MOEDIST_TEST_SAVE_PAUSE=<checkpoint dir name> sleeps here (files written, not renamed)."""
    if os.environ.get("MOEDIST_TEST_SAVE_PAUSE") == final.name:
        import sys
        import time

        print(f"moedist: test hook: pausing in the save of {final.name}", file=sys.stderr, flush=True)
        time.sleep(60)


def save_checkpoint(ckpt_dir, model: nn.Module, *, step: int, optim_state=None, extra_state: Optional[dict] = None,
                    config: Optional[dict] = None, adapter_only: bool = False, dims=None,
                    rng_state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write a checkpoint of `model` (and optimizer state) to `ckpt_dir`, atomically.

    Every rank calls this. optim_state: {param name: {state name: full tensor}}
    for this rank's parameters (see moedist.checkpoint.optim_state).
    extra_state: JSON-able dict (LR schedule, data position, ...).
    adapter_only: save only trainable parameters (LoRA adapters, router).
    rng_state: this rank's RNG states (`moedist.train.rng.rng_states`); default: the global torch RNG.
    """
    lay = Layout.from_dims(dims)
    final = Path(ckpt_dir)
    tmp = final.parent / f".tmp-{final.name}"
    if lay.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    dense, experts, opt_dense, opt_experts = _tensors_by_owner(model, optim_state, adapter_only)
    if lay.rank == 0:
        save_file(dense, str(tmp / "model-dense.safetensors"))
        if opt_dense:
            save_file(opt_dense, str(tmp / "optim-dense.safetensors"))
    if lay.edp_rank == 0 and experts:
        save_file(experts, str(tmp / f"model-experts-ep{lay.ep_rank}.safetensors"))
        if opt_experts:
            save_file(opt_experts, str(tmp / f"optim-experts-ep{lay.ep_rank}.safetensors"))
    rng = {k: v.contiguous() for k, v in (rng_state if rng_state is not None else _rng_tensors()).items()}
    save_file(rng, str(tmp / f"rng-rank{lay.rank}.safetensors"))
    _barrier()
    if lay.rank == 0:
        files, index = {}, {}
        from moedist.config import chmod_umask

        for f in sorted(tmp.glob("*.safetensors")):
            chmod_umask(f)  # safetensors writes 0600; checkpoints get the process umask like every other file
            files[f.name] = _sha256(f)
            if not f.name.startswith("rng-"):
                with safe_open(str(f), "pt") as sf:
                    for k in sf.keys():
                        index[k] = f.name
        manifest = dict(format=FORMAT, step=int(step), adapter_only=adapter_only, config=config,
                        layout=dict(world_size=lay.world_size, ep_size=lay.ep_size),
                        extra_state=extra_state or {}, files=files, index=index)
        _write_json_atomic(tmp / "manifest.json", manifest)
        _test_pause(final)
        if final.exists():
            old = final.parent / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        (final.parent / ".latest.tmp").write_text(final.name + "\n")
        os.replace(final.parent / ".latest.tmp", final.parent / "latest")
    _barrier()
    return final


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def resolve_checkpoint(path) -> Optional[Path]:
    """A checkpoint dir itself, or a run dir's: its `final/`, else the checkpoint its `latest` file
    (beside it or under `checkpoints/`) names; None if there is none.

    Raises ConfigError (a ValueError) when the directory holds pickle files: nothing is opened then.
    """
    from moedist.checkpoint.safety import refuse_pickles

    p = _moved_aside(Path(path))
    if p.exists():
        refuse_pickles(os.fspath(p), "checkpoint")
    if (p / "manifest.json").exists():
        return p
    if (_moved_aside(p / "final") / "manifest.json").exists():
        return _moved_aside(p / "final")
    for folder in (p, p / "checkpoints"):
        latest = folder / "latest"
        if latest.is_file():
            cand = _moved_aside(folder / latest.read_text().strip())
            if (cand / "manifest.json").exists():
                return cand
    return None


def _moved_aside(path: Path) -> Path:
    """`path`, or the complete checkpoint a re-save of that name moved aside (`.old-<name>`) when the
    process died between the save's two renames (old aside, new in); None of the bytes are lost."""
    old = path.parent / f".old-{path.name}"
    return old if not path.exists() and (old / "manifest.json").exists() else path


def read_manifest(ckpt_dir) -> dict:
    """The parsed manifest.json; `CorruptCheckpoint` (one line) when it is missing or unreadable."""
    path = Path(ckpt_dir) / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: missing, not a complete moedist checkpoint") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CorruptCheckpoint(f"{path}: unreadable ({err}), checkpoint is corrupt") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise CorruptCheckpoint(f"{path}: not a moedist checkpoint manifest (format={got!r})")
    if not isinstance(m.get("files"), dict) or not isinstance(m.get("index"), dict):
        raise CorruptCheckpoint(f"{path}: has no file list, checkpoint is corrupt")
    return upgrade_legacy_arch(m)


LEGACY_ARCH_KEY = "moedist.arch"  # extra_state of checkpoints from before model.head_dim & co. were config keys


def upgrade_legacy_arch(m: dict) -> dict:
    """Move what old checkpoints kept in ``extra_state["moedist.arch"]`` into the manifest's config.

    Before `model.head_dim`, `attention_bias`, `qk_norm`, `mlp_only_layers`, `rope_scaling` and
    `moe.shared_expert_ffn_size` were config keys, `convert` stored them there as
    ``{section: {key: value}}``. A key the config already holds wins (newer checkpoints wrote
    both, equal). Changes `m` in place and returns it.
    """
    extra, config = m.get("extra_state"), m.get("config")
    legacy = extra.pop(LEGACY_ARCH_KEY, None) if isinstance(extra, dict) else None
    if not isinstance(legacy, dict) or not isinstance(config, dict):
        return m
    for section, values in legacy.items():
        if isinstance(values, dict) and isinstance(config.setdefault(section, {}), dict):
            for key, value in values.items():
                config[section].setdefault(key, value)
    return m


def verify_checkpoint(ckpt_dir) -> None:
    """Raise `CorruptCheckpoint` (a ConfigError, one line) naming the first file that is missing or
    whose SHA-256 does not match the manifest."""
    m = read_manifest(ckpt_dir)
    for name, digest in m["files"].items():
        f = Path(ckpt_dir) / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f}: missing (listed in manifest.json), checkpoint is corrupt")
        if _sha256(f) != digest:
            raise CorruptCheckpoint(f"{f}: SHA-256 mismatch, checkpoint is corrupt")


class _Reader:
    """Reads tensors by key from the files the manifest indexes (each file opened once)."""

    def __init__(self, ckpt_dir: Path, manifest: dict):
        self.dir, self.index, self._open = ckpt_dir, manifest["index"], {}

    def has(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> torch.Tensor:
        if key not in self.index:
            raise KeyError(f"{key}: not in checkpoint {self.dir}")
        fname = self.index[key]
        if fname not in self._open:
            self._open[fname] = safe_open(str(self.dir / fname), "pt")
        return self._open[fname].get_tensor(key)


def load_checkpoint(ckpt_dir, model: nn.Module, *, dims=None, strict: bool = True, verify: bool = True,
                    load_optim: bool = True) -> LoadedCheckpoint:
    """Load weights (and optimizer state, RNG when the world size matches) into `model`.

    Works at any EP layout: expert tensors are gathered by global id. With an
    adapter-only checkpoint, only the parameters it holds are loaded.
    """
    ckpt_dir = Path(ckpt_dir)
    if verify:
        verify_checkpoint(ckpt_dir)
    m = read_manifest(ckpt_dir)
    lay = Layout.from_dims(dims)
    rd = _Reader(ckpt_dir, m)
    slots = param_slots(model)
    optim: Dict[str, Dict[str, torch.Tensor]] = {}
    state_names = sorted({k.split(OPT_SEP)[0] for k in m["index"] if OPT_SEP in k and not k.startswith("buffer")})
    with torch.no_grad():
        for name, p in model.named_parameters():
            keys = global_keys_for(name, slots[name]) if name in slots else [name]
            if not rd.has(keys[0]):
                if strict and not m["adapter_only"]:
                    raise CheckpointMismatch(f"{name}: not in checkpoint {ckpt_dir} {_MISMATCH_HINT}")
                continue
            t = torch.stack([rd.get(k) for k in keys]) if name in slots else rd.get(name)
            if t.shape != p.shape:
                raise CheckpointMismatch(f"{name}: checkpoint {ckpt_dir} has shape {tuple(t.shape)}, the model "
                                         f"{tuple(p.shape)} {_MISMATCH_HINT}")
            p.copy_(t.to(p.dtype))
            if load_optim:
                for s in state_names:
                    okeys = [f"{s}{OPT_SEP}{k}" for k in keys]
                    if rd.has(okeys[0]):
                        parts = [rd.get(k) for k in okeys]
                        optim.setdefault(name, {})[s] = parts[0] if parts[0].dim() == 0 else (torch.stack(parts) if name in slots else parts[0])
        for name, b in model.named_buffers():
            key = f"buffer{OPT_SEP}{name}"
            if b is not None and rd.has(key):
                b.copy_(rd.get(key).to(b.dtype))
    rng_ok = False
    rng: Dict[str, torch.Tensor] = {}
    rng_file = ckpt_dir / f"rng-rank{lay.rank}.safetensors"
    same_layout = m["layout"]["world_size"] == lay.world_size and m["layout"].get("ep_size", 1) == lay.ep_size
    if same_layout and rng_file.exists():
        with safe_open(str(rng_file), "pt") as sf:
            rng = {k: sf.get_tensor(k) for k in sf.keys()}
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available() and "torch_cuda" in rng:
            torch.cuda.set_rng_state(rng["torch_cuda"])
        rng_ok = True
    return LoadedCheckpoint(m["step"], optim, m.get("extra_state", {}), m.get("config"), rng_ok, m, rng)
