"""The trained weights as a layout-independent moedist checkpoint (`moedist.checkpoint` format).

At the end of a run the trainer writes `<train.output_dir>/final/`: safetensors keyed
by global expert id, with the resolved config in the manifest, so `moedist extract`,
`moedist merge`, `moedist convert` and `moedist.checkpoint.load_checkpoint` read it
at any expert-parallel size, whatever engine trained it.

Values are the optimizer's full fp32 weights: under DeepSpeed ZeRO-1/2/3 (and bf16)
the fp32 master copy (`deepspeed_setup.get_full_fp32_param`), under ZeRO-3 frozen parameters
are gathered from their partitions; the PyTorch runner and fp32 ZeRO-0 hold them
directly. A shadow copy of the (sharded) model receives them and is saved.
"""
from __future__ import annotations

import torch


def full_fp32_state(trainer) -> dict:
    """{name: this rank's full fp32 tensor} for every parameter and buffer (collective)."""
    module = trainer.runner.module
    out = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = None
            if trainer.runner.kind == "deepspeed" and p.requires_grad:
                from moedist.train.deepspeed_setup import get_full_fp32_param

                value = get_full_fp32_param(trainer.runner.engine, p)
            if value is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 partition
                from moedist.train.deepspeed_setup import gathered

                with gathered([p]):
                    value = p.detach().clone()
            if value is None:
                value = p.detach()
            out[name] = value.to("cpu", torch.float32).clone()
        for name, b in module.named_buffers():
            if b is not None:
                out[name] = b.detach().to("cpu").clone()
    return out


def export_model(trainer, path: str) -> str:
    """Write the current weights of `trainer`'s model to `path` (every rank calls it)."""
    from moedist.train import checkpointing

    return checkpointing.save(trainer, path, with_optimizer=False)
