"""Progress while training: a live bar on a terminal, one line per epoch otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """Shows epoch, loss, accuracy and images/s. `quiet` (or output that is not a terminal) keeps
    only one line per epoch; `silent` prints nothing at all (the Python API's default)."""

    def __init__(self, epochs: int, steps: int, batch_size: int, *, quiet: bool = False, silent: bool = False,
                 label: str = "", stream: TextIO | None = None):
        self.epochs, self.steps, self.batch_size = epochs, steps, batch_size
        self.stream = stream or sys.stderr
        self.live = not quiet and not silent and self.stream.isatty()
        self.silent = silent
        self.label = label
        self._t0 = time.perf_counter()
        self._epoch_t0 = self._t0

    def step(self, epoch: int, step: int, loss: float, acc: float) -> None:
        if step == 1 or self._epoch_t0 is None:
            self._epoch_t0 = time.perf_counter()
        if not self.live:
            return
        rate = step * self.batch_size / max(1e-9, time.perf_counter() - self._epoch_t0)
        done = int(20 * step / self.steps)
        bar = "#" * done + "." * (20 - done)
        self.stream.write(f"\r{self.label} epoch {epoch}/{self.epochs} [{bar}] loss {loss:.4f} "
                          f"acc {acc:5.1f}% {rate:,.0f} img/s ")
        self.stream.flush()

    def epoch_done(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.silent:
            return
        seconds = metrics["time_s"]
        rate = self.steps * self.batch_size / max(1e-9, seconds)
        line = (f"{self.label} epoch {epoch}/{self.epochs} loss {metrics['train_loss']:.4f} "
                f"train {metrics['train_acc']:.1f}% test {metrics['test_acc']:.2f}% {rate:,.0f} img/s {seconds:.1f}s")
        self.stream.write(("\r" if self.live else "") + line + ("\x1b[K" if self.live else "") + "\n")
        self.stream.flush()
        self._epoch_t0 = time.perf_counter()
