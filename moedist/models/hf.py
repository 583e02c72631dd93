"""Hugging Face interop in one import: `from_hf`, `load_hf_weights_into`, `apply_hf_config`, `to_hf`.

Import lives in `hf_import.py`, export in `hf_export.py`, the config and
architecture rules of both directions in `hf_maps.py`.
"""
from moedist.models.hf_export import to_hf
from moedist.models.hf_import import HFTensors, apply_hf_config, from_hf, load_hf_weights_into
from moedist.models.hf_maps import SUPPORTED, hf_to_moedist_config, read_hf_config

__all__ = ["from_hf", "load_hf_weights_into", "apply_hf_config", "to_hf", "HFTensors", "SUPPORTED",
           "hf_to_moedist_config", "read_hf_config"]
