"""How cwa prints a number: one rule per kind of quantity, shared by the console, the report and the figures.

| kind | rule | examples |
|---|---|---|
| :func:`p_value` | three decimals; below 0.001 two significant digits in scientific notation | ``0.034``, ``1.0e-04`` |
| :func:`effect` | a signed change, three significant digits | ``+12.3``, ``-0.0042`` |
| :func:`interval` | a value and its interval, each in the value's own rule | ``+12.3 [+8.1, +16.4]`` |
| :func:`number` | a statistic (Jaccard, Gini, ρ, NLL): fixed decimals, scientific when tiny or huge | ``0.512`` |
| :func:`percent` | a share, three significant digits | ``1.03%``, ``95.2%`` |
| :func:`perplexity` | four significant digits | ``19.23`` |
| :func:`count` | an integer with thousands separators | ``12,345`` |

A missing or non-finite value prints as :data:`MISSING` in every rule, so that a table never shows ``nan``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

MISSING = "n/a"


def _absent(x: object) -> bool:
    """No number to show: None, non-finite, or not a number at all (a malformed field read from a file)."""
    return not isinstance(x, numbers.Real) or isinstance(x, bool) or not math.isfinite(x)


def p_value(p: float | None) -> str:
    """A p-value: ``0.034``; ``1.0e-04`` below 0.001 (a bootstrap test's smallest p is still shown)."""
    if _absent(p):
        return MISSING
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def p_floored(p: float | None, floor: float) -> str:
    """A p-value with a floor: ``< 1e-06`` at or below it, else as :func:`p_value`."""
    if not _absent(p) and p <= floor:
        return f"< {floor:.0e}"
    return p_value(p)


def effect(x: float | None) -> str:
    """A change against a reference (Δ perplexity, Δ accuracy): signed, three significant digits."""
    if _absent(x):
        return MISSING
    return "0" if x == 0 else f"{x:+.3g}"  # no change carries no sign


def number(x: float | None, digits: int = 3) -> str:
    """A statistic with ``digits`` decimals; scientific notation below 10^-digits (but not 0) or from 10^5 on."""
    if _absent(x):
        return MISSING
    if x != 0 and (abs(x) < 10**-digits or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def interval(
    value: float | None, low: float | None, high: float | None, rule: Callable[[float | None], str] = number
) -> str:
    """``value [low, high]``, each printed by ``rule`` (:func:`number` or :func:`effect`)."""
    return f"{rule(value)} [{rule(low)}, {rule(high)}]"


def ratio(x: float | None) -> str:
    """A ratio (a perplexity multiplied by it), three significant digits: ``1.05``, ``7.49``, ``6.75e+04``."""
    return MISSING if _absent(x) else f"{x:.3g}"


def counted(n: int | None, noun: str) -> str:
    """A count with its noun, singular for one: ``1 weight``, ``2,048 weights``."""
    return f"{count(n)} {noun}" + ("" if n == 1 else "s")


def percent(x: float | None) -> str:
    """A share (0.0103 -> ``1.03%``), three significant digits."""
    return MISSING if _absent(x) else f"{100 * x:.3g}%"


def perplexity(x: float | None) -> str:
    """A perplexity, four significant digits."""
    return MISSING if _absent(x) else f"{x:.4g}"


def count(n: int | None) -> str:
    """A count with thousands separators."""
    return MISSING if _absent(n) else f"{int(n):,}"


def thin_ticks(ticks: list[float], most: int) -> list[float]:
    """At most about ``most`` of the decade ticks of a symlog axis: 0 and every n-th decade on each side,
    counted from the outermost, so the labels never overlap and the extremes stay labelled."""
    step = max(1, math.ceil(len(ticks) / most))
    positive = sorted((t for t in ticks if t > 0), reverse=True)[::step]
    negative = sorted(t for t in ticks if t < 0)[::step]
    return sorted([*negative, *([0.0] if 0 in ticks else []), *positive])


def symlog_axis(ax, which: str, linthresh: float, most: int = 8) -> None:
    """Put ``ax``'s ``which`` (``x`` or ``y``) axis on a symlog scale whose major ticks are thinned by
    :func:`thin_ticks` (matplotlib labels every decade on both sides of 0, and they overlap)."""
    from matplotlib.ticker import SymmetricalLogLocator

    class Sparse(SymmetricalLogLocator):
        def tick_values(self, vmin: float, vmax: float) -> list[float]:
            return thin_ticks([float(t) for t in super().tick_values(vmin, vmax)], most)

    getattr(ax, f"set_{which}scale")("symlog", linthresh=linthresh)
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(Sparse(axis.get_transform(), subs=[1.0]))
