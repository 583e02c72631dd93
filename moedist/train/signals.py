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
import time

SIGNALS = ("SIGTERM", "SIGUSR1")
# A second Ctrl-C within this many seconds is the same keypress reaching us twice (the terminal signals
# the whole process group, and torchrun forwards its own SIGINT to its workers): it does not abort.
REPEAT_S = 3.0


class PreemptionSignals:
    """Context manager: SIGTERM/SIGUSR1 (and SIGINT, `interrupt=True`) set `requested` instead of killing
    the process.

    SIGINT (Ctrl-C) also sets `interrupted`: the trainer finishes the step, saves when
    train.save_on_interrupt, prints the resume command and the process exits 130. A second
    Ctrl-C (more than REPEAT_S seconds after the first) raises KeyboardInterrupt: stop at once.
    """

    def __init__(self, enabled: bool = True, interrupt: bool = False):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.interrupt = interrupt
        self.requested = False
        self.interrupted = False
        self.signal_name = None
        self._first_sigint = None
        self._old = {}
        self._depth = 0

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > REPEAT_S:
                raise KeyboardInterrupt  # a deliberate second Ctrl-C: stop now, without saving
            if self._first_sigint is None:
                self._first_sigint = now
                self.interrupted = True
                if not self.requested:
                    print("moedist: Ctrl-C: finishing this step, then stopping (Ctrl-C again to stop at once)",
                          file=sys.stderr, flush=True)
            if self.requested:
                return
            self.requested, self.signal_name = True, name
            return
        if not self.requested:
            self.requested = True
            self.signal_name = name
            print(f"moedist: received {self.signal_name}: finishing this step, then saving a checkpoint "
                  "and exiting (resume with train.resume=auto)", file=sys.stderr, flush=True)

    def __enter__(self) -> "PreemptionSignals":
        self._depth += 1
        if self.enabled and self._depth == 1:  # re-entering (CLI, then Trainer.train) keeps the first handlers
            for name in SIGNALS + (("SIGINT",) if self.interrupt else ()):
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
