"""How numbers read in the report: means with spread and intervals, gains with their test, durations."""

from __future__ import annotations

import math

from kdlab.stats import PairedResult, Summary

DASH = "—"


def num(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return DASH
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def fmt_summary(s: Summary | None, digits: int = 2) -> str:
    """`91.52` for one seed; `91.52 ± 0.21 [91.00, 92.00]` (mean ± std [95% CI]) for several."""
    if s is None:
        return DASH
    if s.std is None:
        return num(s.mean, digits)
    interval = f"[{num(s.ci_low, digits)}, {num(s.ci_high, digits)}]"
    return f"{num(s.mean, digits)} ± {num(s.std, digits)} {interval}"


def fmt_p(p: float | None) -> str:
    return DASH if p is None else "p<0.001" if p < 0.001 else f"p={p:.2g}"


def fmt_gain(g: PairedResult | None, ci: bool = False) -> str:
    """`+0.46 ± 0.12 (p=0.01, significant)` or `(p=0.4, n.s.)`; one seed: `+0.46 (n=1)`."""
    if g is None:
        return DASH
    if g.std_diff is None:
        return f"{num(g.mean_diff, sign=True)} (n={g.n})"
    interval = f" [{num(g.ci_low, sign=True)}, {num(g.ci_high, sign=True)}]" if ci else ""
    verdict = "significant" if g.significant else "n.s."
    return f"{num(g.mean_diff, sign=True)} ± {num(g.std_diff)}{interval} ({fmt_p(g.p)}, {verdict})"


def fmt_duration(seconds: float | None) -> str:
    """The paper's style: `20m 19s`; under a minute `12.3s`."""
    if seconds is None or not math.isfinite(seconds):
        return DASH
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs}s"


def fmt_time(s: Summary | None) -> str:
    if s is None:
        return DASH
    return fmt_duration(s.mean) + ("" if s.std is None else f" ± {fmt_duration(s.std)}")


def integer(x: int | None) -> str:
    return DASH if x is None else f"{x:,}"


def yes_no(x: bool | None) -> str:
    return DASH if x is None else "yes" if x else "no"


def one_line(text: str, limit: int = 120) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
