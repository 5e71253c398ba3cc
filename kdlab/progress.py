"""Progress while training: live lines on a terminal, one line per epoch otherwise, with elapsed time and ETAs.

On a terminal the bottom lines are a *live area*: one line per run in training (and one for the
grid when a grid runs), redrawn in place twice a second by a background thread, so the clock and
the ETAs move even while one step takes seconds. The loop only tells `Progress` where it is
(`tick`, plain Python integers, every step) and, when it reads the device-side sums anyway, the
running loss and accuracy (`step`): showing progress never waits for the device. Anything else
printed meanwhile goes above the live area (`echo`). Not on a terminal, nothing is redrawn: each
finished epoch is one line, with the elapsed time and the run's ETA.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

REDRAW_S = 0.5  # how often the live area is redrawn: twice a second, so the clock visibly moves
BAR = 20
MAX_LIVE_RUNS = 8  # runs trained side by side beyond this get per-epoch lines only (a screenful is enough)


def fmt_eta(seconds: float | None) -> str:
    """'45s', '12m05s', '3h02m'; '?' while nothing is known yet."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LiveArea:
    """The last lines of a terminal, one per provider (a function returning the line's text),
    redrawn in place every REDRAW_S seconds by a daemon thread until no provider is left."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._lines: dict[int, tuple[str, Callable[[], str]]] = {}  # id -> (kind, provider)
        self._next = 0
        self._drawn = 0  # how many lines are on the screen now
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, provider: Callable[[], str], kind: str = "run") -> int:
        with self._lock:
            self._next += 1
            self._lines[self._next] = (kind, provider)
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._redraw_forever, daemon=True)
                self._thread.start()
            self._draw()
            return self._next

    def remove(self, token: int) -> None:
        with self._lock:
            self._lines.pop(token, None)
            self._draw()
            if not self._lines:
                self._stop_thread()

    def drop(self, kind: str) -> None:
        """Remove every line of this kind (a grid drops the lines of runs that ended without finishing)."""
        with self._lock:
            for token in [t for t, (k, _) in self._lines.items() if k == kind]:
                self.remove(token)

    def echo(self, text: str) -> None:
        """Print a permanent line above the live area."""
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self._draw()

    def refresh(self) -> None:
        with self._lock:
            self._draw()

    def _redraw_forever(self) -> None:
        while not self._stop.wait(REDRAW_S):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 (a display must never take a run down)
                return

    def _stop_thread(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    def _clear(self) -> None:
        if self._drawn:
            # Back to the first live line, then erase to the end of the screen.
            self.stream.write("\r" + ("\x1b[1A" * (self._drawn - 1)) + "\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        self._clear()
        lines = [provider() for _, provider in self._lines.values()]
        if lines:
            # The cursor stays at the end of the last line, so the next redraw knows where it is.
            self.stream.write("\n".join(line + "\x1b[K" for line in lines))
            self._drawn = len(lines)
        self.stream.flush()


_AREAS: dict[int, LiveArea] = {}


def live_area(stream: TextIO) -> LiveArea:
    """The live area of this stream (one per terminal, shared by the grid's line and the runs')."""
    return _AREAS.setdefault(id(stream), LiveArea(stream))


def echo(message: str, stream: TextIO | None = None) -> None:
    """Print one line to stderr (or `stream`), above the live area if one is being drawn there."""
    stream = stream or sys.stderr
    area = _AREAS.get(id(stream))
    if area is not None and area._lines:
        area.echo(message)
    else:
        print(message, file=stream, flush=True)


@contextmanager
def live_session(stream: TextIO | None = None) -> Iterator[None]:
    """Whatever happens inside, the live area is cleared at the end (no stale lines after an error)."""
    stream = stream or sys.stderr
    try:
        yield
    finally:
        area = _AREAS.pop(id(stream), None)
        if area is not None:
            with area._lock:
                area._lines.clear()
                area._clear()
                area._stop_thread()
            stream.flush()


class Progress:
    """One run's progress: epoch, steps, loss, accuracy, images/s, elapsed time and ETAs.

    `quiet` (or output that is not a terminal) keeps only one line per epoch; `silent` prints
    nothing at all (the Python API's default)."""

    def __init__(self, epochs: int, steps: int, batch_size: int, *, quiet: bool = False, silent: bool = False,
                 label: str = "", stream: TextIO | None = None):
        self.epochs, self.steps, self.batch_size = epochs, steps, batch_size
        self.stream = stream or sys.stderr
        self.live = not quiet and not silent and self.stream.isatty()
        self.silent = silent
        self.label = label
        self._t0 = time.perf_counter()
        self._epoch_t0 = self._t0
        self._epoch, self._step = 0, 0  # where the loop is (1-based); 0 before the first step
        self._started = False  # the clock starts at the first step this process trains (after a resume too)
        self._loss: float | None = None
        self._acc: float | None = None
        self._epoch_times: list[float] = []  # wall seconds of each epoch trained here, evaluation included
        self._in_epoch = False
        self._token: int | None = None

    # ---- what the loop calls -------------------------------------------------------------------

    def tick(self, epoch: int, step: int) -> None:
        """Every step: where the loop is. Plain integers; the drawing happens in the live area's thread."""
        self._epoch, self._step = epoch, step
        if step == 1 or not self._in_epoch:
            self._epoch_t0 = time.perf_counter()
            self._in_epoch = True
            if not self._started:
                self._started = True
                self._t0 = self._epoch_t0
                if self.live:
                    self._token = live_area(self.stream).add(self.line)

    def step(self, epoch: int, step: int, loss: float, acc: float) -> None:
        """When the loop reads the device-side sums anyway: the running loss and accuracy."""
        self._loss, self._acc = loss, acc
        self.tick(epoch, step)

    def epoch_done(self, epoch: int, metrics: dict[str, Any]) -> None:
        """The epoch's line (permanent), with the run's elapsed time and ETA."""
        self._epoch_times.append(time.perf_counter() - self._epoch_t0)
        self._in_epoch, self._epoch, self._step = False, epoch, self.steps
        if self.silent:
            return
        seconds = metrics["time_s"]
        rate = self.steps * self.batch_size / max(1e-9, seconds)
        line = (f"{self.label} epoch {epoch}/{self.epochs} loss {metrics['train_loss']:.4f} "
                f"train {metrics['train_acc']:.1f}% test {metrics['test_acc']:.2f}% {rate:,.0f} img/s {seconds:.1f}s, "
                f"elapsed {fmt_eta(self.elapsed())}, ETA {fmt_eta(self.eta_run())}")
        if self.live:
            if epoch == self.epochs and self._token is not None:
                live_area(self.stream).remove(self._token)  # the run's live line ends with its last epoch
                self._token = None
            live_area(self.stream).echo(line)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()
        self._epoch_t0 = time.perf_counter()

    # ---- what is shown -------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def _step_s(self) -> float | None:
        """Seconds per training step: this epoch's pace while one is under way, else the last epoch's."""
        if self._in_epoch and self._step > 0:
            return (time.perf_counter() - self._epoch_t0) / self._step
        return self._epoch_times[-1] / self.steps if self._epoch_times else None

    def eta_epoch(self) -> float | None:
        step_s = self._step_s()
        return None if step_s is None or not self._in_epoch else (self.steps - self._step) * step_s

    def eta_run(self) -> float | None:
        """Seconds left in the run: the rest of this epoch at its pace, then the remaining epochs at
        the mean measured epoch time (with evaluation; steps x step time before one has finished)."""
        step_s = self._step_s()
        if step_s is None:
            return None
        per_epoch = sum(self._epoch_times) / len(self._epoch_times) if self._epoch_times else step_s * self.steps
        rest = (self.steps - self._step) * step_s if self._in_epoch else 0.0
        return rest + (self.epochs - self._epoch) * per_epoch

    def line(self) -> str:
        done = int(BAR * self._step / max(1, self.steps))
        bar = "#" * done + "." * (BAR - done)
        step_s = self._step_s()
        rate = f" {self.batch_size / step_s:,.0f} img/s" if step_s else ""
        measured = "" if self._loss is None else f" loss {self._loss:.4f} acc {self._acc:5.1f}%"
        return (f"{self.label} epoch {self._epoch}/{self.epochs} [{bar}] {self._step}/{self.steps}{measured}{rate} | "
                f"{fmt_eta(self.elapsed())} elapsed, epoch ETA {fmt_eta(self.eta_epoch())}, "
                f"run ETA {fmt_eta(self.eta_run())}")


class GridProgress:
    """The grid's own progress: run k of N, time elapsed, and an ETA from the pace at which runs
    have finished since this grid started (by any process sharing the runs dir).

    On a terminal it is a line of the live area, above the lines of the runs in training; in any
    case each run this process starts is logged as "run k of N" with the elapsed time and ETA."""

    def __init__(self, total: int, log: Any, live: bool):
        self.total, self.log = total, log
        self.claimed: set[str] = set()  # runs this process trained
        self.finished = 0  # runs done or failed, as this process has seen them
        self._first: int | None = None  # finished when the grid started: not part of its pace
        self._current: list[int] = []  # numbers of the runs in training now
        self._number = 0  # the number of the run started last
        self._t0 = time.perf_counter()
        self._area = live_area(sys.stderr) if live and sys.stderr.isatty() else None
        self._token = self._area.add(self.line, kind="grid") if self._area else None

    def __enter__(self) -> GridProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._area is not None and self._token is not None:
            self._area.remove(self._token)

    def update(self, counts: dict[str, int]) -> None:
        self.finished = counts["trained"] + counts["skipped"] + counts["failed"]
        if self._first is None:
            self._first = self.finished
        self._current.clear()
        if self._area is not None:
            self._area.drop("run")  # lines of runs that ended without finishing (failed, interrupted)

    def started(self, run_id: str, label: str) -> None:
        # Numbered across the whole grid: after every run seen finished and every run started before,
        # also while runs this grid started on other processes are still training.
        self.claimed.add(run_id)
        self._number = max(self._number, self.finished) + 1
        self._current.append(self._number)
        self.log(f"run {self._number} of {self.total}: {run_id[:8]} {label} ({self._times()})")

    def eta(self) -> float | None:
        done = self.finished - (self._first or 0)
        if done <= 0:
            return None
        return (self.total - self.finished) * (time.perf_counter() - self._t0) / done

    def _times(self) -> str:
        return f"{fmt_eta(time.perf_counter() - self._t0)} elapsed, grid ETA {fmt_eta(self.eta())}"

    def line(self) -> str:
        k = self._current
        which = "" if not k else f"run {k[0]}" if len(k) == 1 else f"runs {k[0]}-{k[-1]}"
        which += f" of {self.total}, " if k else ""
        done = int(20 * self.finished / max(1, self.total))
        bar = "#" * done + "." * (20 - done)
        return f"grid [{bar}] {which}{self.finished} of {self.total} finished | {self._times()}"
