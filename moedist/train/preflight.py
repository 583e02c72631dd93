"""Everything checked and opened before a run builds its model: the checkpoint's architecture
(`resolve_hf`), every check that needs more than the config (`preflight`: world size, installed
packages, files, data size), and the run's data and tokenizer.

`preflight` runs before anything is written and raises `ConfigError` (one line, exit 2 from the CLI).
The CLI runs it before the process group exists and hands its data to the `Trainer`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from moedist.config import ConfigError, validate_world_size
from moedist.train.data import ByteLMData
from moedist.train.metrics import tensorboard_available


def resolve_hf(cfg):
    """With model.from_hf (or model.init_from): the config with the checkpoint's architecture; ConfigError if
    unusable."""
    if cfg.model.init_from is not None:
        from moedist.train.init_from import apply_init_from

        return apply_init_from(cfg)
    if cfg.model.from_hf is None:
        return cfg
    from moedist.models.hf import apply_hf_config

    try:
        return apply_hf_config(cfg)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model.from_hf={cfg.model.from_hf!r}: {' '.join(str(err).split())}") from None


def preflight(cfg, world_size: int, cuda: Optional[bool] = None):
    """Checks that need the world size or the environment; raises `ConfigError` (nothing written yet).

    Returns the run's data (`load_data`), which it had to open to check it, so that the
    trainer does not hash and open the sources a second time.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    m, par, tr, ds, data = cfg.model, cfg.parallel, cfg.train, cfg.deepspeed, cfg.data
    validate_world_size(cfg, world_size)
    if m.from_hf is not None:  # before any file in it is read
        from moedist.checkpoint.safety import refuse_pickles

        refuse_pickles(m.from_hf, "model.from_hf")

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(ds.enabled or ds.zero_stage == 0,
         f"deepspeed.zero_stage={ds.zero_stage}: needs deepspeed.enabled=true")
    need(ds.enabled or not (ds.bf16 or ds.fp16),
         f"deepspeed.{'bf16' if ds.bf16 else 'fp16'}=true: needs deepspeed.enabled=true")
    need(not ds.fp16 or cuda, "deepspeed.fp16=true: needs a CUDA GPU (fp16 is not supported on CPU)")
    need(not (ds.fp16 and ds.zero_stage == 0),
         "deepspeed.fp16=true: needs deepspeed.zero_stage >= 1 (ZeRO-0's FP16_Optimizer keeps its fp32 masters "
         "where moedist's pickle-free checkpoints cannot read them); use zero_stage=1 or bf16")
    # model.dtype is the dtype of the frozen weights (LoRA modes); trainable ones stay fp32 masters
    need(m.dtype != "float16", "model.dtype='float16': not supported; use bfloat16 (frozen weights in bf16)")
    need(m.dtype == "float32" or cfg.lora.mode != "none" or (ds.enabled and ds.bf16),
         f"model.dtype={m.dtype!r} with lora.mode=none: every weight trains and keeps fp32 master weights; "
         "use deepspeed.bf16=true for bf16 compute (or a LoRA mode, whose frozen base is then bf16)")
    need(m.dtype == "float32" or not ds.fp16,
         f"model.dtype={m.dtype!r} with deepspeed.fp16=true: DeepSpeed would cast the bf16 base to fp16; "
         "use deepspeed.bf16=true")
    need(ds.enabled or not ds.extra, "deepspeed.extra: set but deepspeed.enabled=false")
    need(not (ds.enabled and tr.nonfinite == "skip" and ds.zero_stage == 0),
         "train.nonfinite='skip': needs deepspeed.zero_stage >= 1 under DeepSpeed (ZeRO 1-3 drop a step with "
         "non-finite gradients; ZeRO-0 cannot); use 'stop' or the PyTorch runner")
    offload = ds.offload_optimizer != "none" or ds.offload_param != "none"
    need(ds.enabled or not offload, f"deepspeed.offload_{'optimizer' if ds.offload_optimizer != 'none' else 'param'}"
         "=cpu: needs deepspeed.enabled=true")
    if ds.enabled:
        from moedist.train.deepspeed_setup import check_extra, check_offload

        problem = check_extra(ds.extra, par.ep_size, ds.zero_stage) or check_offload(cfg)
        need(problem is None, problem or "")
    need(not tr.tensorboard or tensorboard_available(),
         "train.tensorboard=true: the tensorboard package is not installed (pip install tensorboard)")
    if m.from_hf is not None or m.init_from is not None:
        cfg = resolve_hf(cfg)
        m = cfg.model
    need(m.max_seq_len >= data.seq_len, f"data.seq_len={data.seq_len}: must be <= model.max_seq_len")
    if not data.sources:
        need(m.vocab_size >= 256, f"model.vocab_size={m.vocab_size}: byte-level data needs >= 256")
    out = tr.output_dir
    need(not os.path.exists(out) or os.path.isdir(out), f"train.output_dir={out!r}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(out))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    need(os.path.isdir(probe) and os.access(probe, os.W_OK), f"train.output_dir={out!r}: {probe} is not writable")
    if tr.resume not in (None, "auto"):
        from moedist.train.checkpointing import check_resumable

        check_resumable(os.path.abspath(tr.resume.rstrip("/")))
    tok = None
    if data.sources:  # the tokenizer is checked before anything is tokenized into the cache
        from moedist.data.tokenizer import resolve_tokenizer

        from moedist.train.init_from import model_dir

        tok = resolve_tokenizer(data.tokenizer, model_dir(cfg))
        need(tok.vocab_size <= m.vocab_size,
             f"data.tokenizer: its vocabulary has {tok.vocab_size} tokens but the model embeds only "
             f"model.vocab_size={m.vocab_size}; use the model's own tokenizer (or a larger model.vocab_size)")
    d = load_data(cfg, tokenizer=tok)
    what = "data.sources" if data.sources else f"data.source={data.source!r}"
    step_seqs = world_size * tr.micro_batch_size * tr.grad_accum
    need(d.num_train >= step_seqs,
         f"train.micro_batch_size={tr.micro_batch_size}: a global batch of {step_seqs} sequences is larger than "
         f"the {d.num_train} training sequences of {what}")
    return d


def load_data(cfg, progress: bool = False, tokenizer=None):
    """The run's data: named `data.sources` (tokenized, cached `TokenData`) or a byte-level `ByteLMData`.

    Raises ConfigError (one line naming the file, line and problem) for unreadable data.
    """
    if cfg.data.sources:
        from moedist.data.dataset import build_data

        return build_data(cfg, tokenizer=tokenizer, progress=progress)
    try:
        return ByteLMData.from_config(cfg.data)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.source={cfg.data.source!r}: {err}") from None


def run_tokenizer(cfg, data):
    """The tokenizer a run's ids come from (saved with its checkpoints and exports)."""
    if cfg.data.sources:
        return data.tokenizer
    from moedist.data.tokenizer import ByteTokenizer

    return ByteTokenizer()  # the byte-level sources feed raw bytes whatever model.from_hf says
