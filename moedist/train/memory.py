"""Measured memory of a run, per rank: what `summary.json` reports as `peak_mem_mb`.

    meter = MemoryMeter(device)     # right before the model is built: the baseline
    ...                             # build, train, save
    meter.peak_mb()                 # this rank's peak since the baseline, MiB
    gather_peaks(meter.peak_mb(), device)   # [rank 0, rank 1, ...] (collective)

CPU: the process's peak resident set (VmHWM in /proc/self/status) minus its
resident set (VmRSS) at the baseline. VmHWM is a high-water mark of the whole
process, so whatever was resident before the baseline (imports, data) is excluded
only because the baseline is taken right before the model is built; a model built
whole and sharded afterwards would count whole.

CUDA: `torch.cuda.max_memory_allocated` (peak statistics reset at the baseline).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

MB = 1024.0 * 1024.0


def _status_kb(field: str) -> Optional[int]:
    """A `kB` field of /proc/self/status (VmHWM, VmRSS), or None where there is no procfs."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> Optional[float]:
    """This process's resident set now, MiB (None without /proc)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def hwm_mb() -> Optional[float]:
    """This process's peak resident set so far (VmHWM), MiB (None without /proc)."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024.0


class MemoryMeter:
    """This rank's peak memory since construction (see the module docstring for what is counted)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.base = 0.0
        else:
            self.base = rss_mb()

    def peak_mb(self) -> Optional[float]:
        """MiB above the baseline at this rank's peak so far (None where it cannot be measured)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / MB
        hwm = hwm_mb()
        if hwm is None or self.base is None:
            return None
        return max(0.0, hwm - self.base)


def gather_peaks(peak: Optional[float], device: torch.device) -> List[Optional[float]]:
    """Every rank's `peak` in rank order (collective; -1 travels for None)."""
    mine = torch.tensor([-1.0 if peak is None else float(peak)], dtype=torch.float64, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [peak]
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [None if float(t) < 0 else float(t) for t in every]
