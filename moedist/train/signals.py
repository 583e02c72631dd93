"""Preemption: SIGTERM / SIGUSR1 (what SLURM sends before it preempts or times out a job) ask the
trainer to finish the current step, save a checkpoint and exit 0.

    with PreemptionSignals() as pre:     # installs the handlers (main thread only), restores them after
        ...
        if pre.requested: ...            # set by the handler; the trainer all-reduces it at step end

The handler only sets a flag, so a signal never interrupts a collective or a write; the
trainer combines the flag of every rank (MAX all-reduce, see `Trainer._agree`) before
the optimizer step, so all ranks save the same step. A second signal after the first
does nothing more; SIGKILL (what follows a grace period) cannot be caught, and the
checkpoint format survives it (writes are temp dir + rename).
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionSignals:
    """Context manager: SIGTERM/SIGUSR1 set `requested` instead of killing the process."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.signal_name = None
        self._old = {}
        self._depth = 0

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            print(f"moedist: received {self.signal_name}: finishing this step, then saving a checkpoint "
                  "and exiting (resume with train.resume=auto)", file=sys.stderr, flush=True)

    def __enter__(self) -> "PreemptionSignals":
        self._depth += 1
        if self.enabled and self._depth == 1:  # re-entering (CLI, then Trainer.train) keeps the first handlers
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
