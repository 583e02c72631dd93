"""Layout-independent checkpoints (safetensors by global expert id, manifest with SHA-256)."""
from moedist.checkpoint.io import (LoadedCheckpoint, load_checkpoint, read_manifest, resolve_checkpoint,
                                   save_checkpoint, verify_checkpoint)
from moedist.checkpoint.optim_state import get_torch_optimizer_state, set_torch_optimizer_state

__all__ = ["LoadedCheckpoint", "load_checkpoint", "read_manifest", "resolve_checkpoint", "save_checkpoint",
           "verify_checkpoint", "get_torch_optimizer_state", "set_torch_optimizer_state"]
