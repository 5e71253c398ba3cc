"""Did a finished run learn, or fall apart? A verdict from its per-epoch history alone.

A run whose loss became NaN fails while it trains (the loop checks). Some runs stay finite and
still go wrong: a loss weight too strong for the data makes the training loss climb epoch after
epoch while the training accuracy stays at chance, or a run learns and then collapses. Their last
accuracy is not a result of the method, so such a run is stored as *diverged*: shown at the end of
the run and listed by the report, never averaged into a table.

Only the training signals are read (loss and accuracy on the training batches): judging a run by
its test accuracy would select on the test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

OK = "ok"
RISE = 1.5  # the training loss ended this many times above its lowest epoch...
MIN_RISE = 0.1  # ...and this much above it in absolute terms (tiny losses wobble by large factors)
EPOCHS_AFTER_MIN = 2  # ...at least this many epochs after that lowest epoch
NO_GAIN = 1.0  # while the training accuracy gained at most this many points since that epoch
LEARNED = 20.0  # a collapse needs a run that once beat chance by this many points...
KEPT = 0.25  # ...and then kept at most this share of what it had gained over chance


def assess(history: Sequence[dict[str, Any]], num_classes: int | None = None) -> str:
    """'ok', or 'diverged: <why, with the numbers>' for a run whose training loss kept rising
    without its training accuracy improving, or whose training accuracy collapsed to near chance.

    `history` is the run's epochs in order, each with `train_loss` and `train_acc` (percent);
    `num_classes` gives chance (100 / classes) for the collapse rule, which is skipped without it.
    """
    epochs = [h for h in history if h.get("train_loss") is not None and h.get("train_acc") is not None]
    if len(epochs) < 2:
        return OK
    losses = [float(h["train_loss"]) for h in epochs]
    accs = [float(h["train_acc"]) for h in epochs]
    low = min(range(len(losses)), key=losses.__getitem__)
    last = len(epochs) - 1
    rose = losses[last] > RISE * losses[low] and losses[last] - losses[low] > MIN_RISE
    if rose and last - low >= EPOCHS_AFTER_MIN and accs[last] <= accs[low] + NO_GAIN:
        return (f"diverged: training loss rose from {losses[low]:.3g} (epoch {low + 1}) to {losses[last]:.3g} "
                f"(epoch {last + 1}) while training accuracy went from {accs[low]:.1f}% to {accs[last]:.1f}%")
    if num_classes:
        chance = 100.0 / num_classes
        best = max(range(len(accs)), key=accs.__getitem__)
        gained = accs[best] - chance
        if gained >= LEARNED and accs[last] <= chance + KEPT * gained:
            return (f"diverged: training accuracy collapsed from {accs[best]:.1f}% (epoch {best + 1}) to "
                    f"{accs[last]:.1f}% (epoch {last + 1}; chance is {chance:.1f}%)")
    return OK


def is_diverged(health: str | None) -> bool:
    """True for a verdict of `assess` that is not 'ok'."""
    return bool(health) and health != OK
