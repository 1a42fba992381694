"""cwa.common.format: one printing rule per kind of quantity, checked against hand-written strings."""

from __future__ import annotations

import math

import pytest

from cwa.common import format as fmt


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (0.5, "0.500"),
        (0.0312, "0.031"),
        (0.001, "0.001"),
        (0.000999, "1.0e-03"),
        (1e-4, "1.0e-04"),
        (1.5e-9, "1.5e-09"),
    ],
)
def test_a_p_value_keeps_three_decimals_and_turns_scientific_below_one_in_a_thousand(p: float, text: str) -> None:
    assert fmt.p_value(p) == text


@pytest.mark.parametrize(
    ("x", "text"),
    [(12.3456, "+12.3"), (-0.0042, "-0.0042"), (0.0, "0"), (-0.0, "0"), (1234.5, "+1.23e+03"), (6.62e-07, "+6.62e-07")],
)
def test_an_effect_is_signed_with_three_significant_digits(x: float, text: str) -> None:
    assert fmt.effect(x) == text


def test_an_interval_prints_each_end_in_the_value_rule() -> None:
    assert fmt.interval(0.322, 0.227, 0.45, fmt.effect) == "+0.322 [+0.227, +0.45]"
    assert fmt.interval(0.5123, 0.4, 0.61) == "0.512 [0.400, 0.610]"
    assert fmt.interval(0.5, None, None) == "0.500 [n/a, n/a]"
    assert fmt.interval(1.0, 0.95, 1.0, fmt.percent) == "100% [95%, 100%]"


@pytest.mark.parametrize(
    ("x", "digits", "text"),
    [(0.5123, 3, "0.512"), (0.0, 3, "0.000"), (0.0004, 3, "4.00e-04"), (123456.0, 3, "1.23e+05"),
     (4.13456, 4, "4.1346"), (100.4, 0, "100")],
)  # fmt: skip
def test_a_number_has_fixed_decimals_and_is_scientific_when_tiny_or_huge(x: float, digits: int, text: str) -> None:
    assert fmt.number(x, digits) == text


def test_percent_perplexity_and_count() -> None:
    assert fmt.percent(7 / 680) == "1.03%" and fmt.percent(0.3735) == "37.4%" and fmt.percent(1.2e-5) == "0.0012%"
    assert (
        fmt.perplexity(62.4612) == "62.46" and fmt.perplexity(19.0) == "19" and fmt.perplexity(12345.6) == "1.235e+04"
    )
    assert fmt.count(1234567) == "1,234,567" and fmt.count(0) == "0"


@pytest.mark.parametrize("rule", [fmt.p_value, fmt.effect, fmt.number, fmt.percent, fmt.perplexity])
def test_missing_and_non_finite_values_print_as_missing(rule) -> None:
    assert rule(None) == rule(math.nan) == rule(math.inf) == fmt.MISSING == "n/a"
    assert fmt.count(None) == fmt.MISSING


def test_symlog_axes_label_few_enough_decades_not_to_overlap() -> None:
    """Δ perplexity from -1,000 to +100,000 with linthresh 0.01 gave matplotlib 17 decade labels on one axis;
    the thinned axis keeps 0, the extremes and at most about 8 labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cwa.common.format import symlog_axis, thin_ticks

    fig, ax = plt.subplots()
    ax.barh([0, 1, 2], [-1e3, 0.5, 1e5])
    ax.set_xscale("symlog", linthresh=0.01)
    fig.canvas.draw()
    crowded = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    symlog_axis(ax, "x", 0.01)
    fig.canvas.draw()
    shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    plt.close(fig)
    assert len(crowded) > 12 and len(shown) <= 9 and 0 in shown
    assert thin_ticks([-100, -10, -1, 0, 1, 10, 100, 1000], 4) == [-100, -1, 0, 10, 1000]
