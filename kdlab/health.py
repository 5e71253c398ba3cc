"""Did a finished run learn, and is its test accuracy a result? A verdict from its per-epoch history.

A run whose loss became NaN fails while it trains (the loop checks). Some runs stay finite and
still go wrong, and their last accuracy is not a result of the method:

- *diverged*: a loss weight too strong for the data makes the training loss climb epoch after
  epoch while the training accuracy stays at chance, or a run learns and then collapses;
- *not learning*: the training accuracy never leaves chance although the loss stays finite (a
  first update too large can silence a ReLU network for good: constant logits, a flat loss);
- *test at chance*: the training accuracy is far above chance but the test accuracy is chance
  itself: the model in eval mode is not the one that trained, most often because its BatchNorm
  running statistics never settled (`kdlab.bnstats`; the loop says how far they are from it).

Such a run is stored with its verdict: shown at the end of the run and listed by the report, never
averaged into a table. The first two read only the training signals. The third reads the test
accuracy, but only to recognise an evaluation that does not measure the model (a result at chance
after training far above it); it never compares runs by their test accuracy.
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
NOT_LEARNED = 5.0  # no epoch's training accuracy beat chance by more than this many points...
MIN_EPOCHS = 3  # ...over at least this many epochs
AT_CHANCE = 0.1  # test accuracy within this share of the training accuracy's gain over chance, of chance


def assess(history: Sequence[dict[str, Any]], num_classes: int | None = None, bn_note: str | None = None) -> str:
    """'ok', or '<kind>: <why, with the numbers>' where kind is 'diverged' (the training loss kept
    rising without the training accuracy improving, or the training accuracy collapsed to near
    chance), 'not learning' (the training accuracy never left chance) or 'test at chance' (while
    the training accuracy is far above it).

    `history` is the run's epochs in order, each with `train_loss` and `train_acc` (percent) and
    `test_acc` where known; `num_classes` gives chance (100 / classes), without which only the
    rising-loss rule applies; `bn_note` is what is known of the model's BatchNorm statistics
    (`kdlab.bnstats.describe`), said as the likely cause of a test accuracy at chance.
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
    if not num_classes:
        return OK
    chance = 100.0 / num_classes
    best = max(range(len(accs)), key=accs.__getitem__)
    gained = accs[best] - chance
    if gained >= LEARNED and accs[last] <= chance + KEPT * gained:
        return (f"diverged: training accuracy collapsed from {accs[best]:.1f}% (epoch {best + 1}) to "
                f"{accs[last]:.1f}% (epoch {last + 1}; chance is {chance:.1f}%)")
    if len(epochs) >= MIN_EPOCHS and gained <= NOT_LEARNED:
        return (f"not learning: training accuracy stayed at chance ({chance:.1f}%) for all {len(epochs)} epochs "
                f"(at most {accs[best]:.1f}%) while the training loss stayed finite ({losses[0]:.3g} -> "
                f"{losses[last]:.3g})")
    test = epochs[last].get("test_acc")
    trained = accs[last] - chance
    if test is not None and trained >= LEARNED and float(test) <= chance + AT_CHANCE * trained:
        cause = bn_note or ("most often BatchNorm running statistics that never settled (a low BatchNorm momentum, "
                            "or few training steps): re-estimate them on the training set with --set bn_stats=train")
        return (f"test at chance: test accuracy {float(test):.1f}% is chance ({chance:.1f}%, {num_classes} classes) "
                f"while training accuracy reached {accs[last]:.1f}%: the model in eval mode does not behave as in "
                f"training; {cause}")
    return OK


ADVICE = {"diverged": "lower the lr or the method's loss weights",
          "not learning": "lower the lr or the method's loss weights (updates too large for the model at the start "
                          "can leave it predicting one class), or check the labels",
          "test at chance": "see the cause above"}


def advice(health: str) -> str:
    """What to try for a verdict of `assess` (its kind's advice)."""
    return ADVICE.get(health.partition(": ")[0], ADVICE["diverged"])


def is_diverged(health: str | None) -> bool:
    """True for a verdict of `assess` that is not 'ok' (of any kind: its accuracy is not a result)."""
    return bool(health) and health != OK
