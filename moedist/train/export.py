"""The trained weights as a layout-independent moedist checkpoint (`moedist.checkpoint` format).

At the end of a run the trainer writes `<train.output_dir>/final/`: safetensors keyed
by global expert id, with the resolved config in the manifest, so `moedist extract`,
`moedist merge`, `moedist convert` and `moedist.checkpoint.load_checkpoint` read it
at any expert-parallel size, whatever engine trained it.

Values are the optimizer's full fp32 weights, as the runner gives them
(`moedist.train.state.Runner.full_state`: fp32 masters, ZeRO-3 partitions gathered).
A shadow copy of the (sharded) model receives them and is saved.
"""
from __future__ import annotations


def export_model(trainer, path: str) -> str:
    """Write the current weights of `trainer`'s model to `path` (every rank calls it)."""
    from moedist.train import checkpointing

    return checkpointing.save(trainer, path, with_optimizer=False)
