"""Regexes for JSON numbers within bounds, exact for integers.

An integer range [lo, hi] (either side open) is written digit count by digit count, and within one count by the
classic split on the first digit that differs (12-345 -> 1[2-9] | [2-9][0-9] | [1-2][0-9]{2} | 3[0-3][0-9] | ...).
A bounded `number` is written without an exponent: the integers in range, optionally with a zero fraction, plus
`k.ddd` for every integer part k whose whole unit interval lies in range. Every text matched is in range; a few
in-range texts are never produced (an exponent, a fraction at the edge of a non-integer bound).
"""

from __future__ import annotations

import math
from fractions import Fraction

INTEGER = r"-?(0|[1-9][0-9]*)"
NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]{1,3})?"
MAX_ENUMERATED_MULTIPLES = 1000


def _digits(low: int, high: int) -> str:
    return str(low) if low == high else f"[{low}-{high}]"


def _same_length(a: str, b: str) -> str:
    """Digit strings of len(a) == len(b) from a to b (leading zeros allowed: they are inner digits)."""
    if not a:
        return ""
    if a[0] == b[0]:
        return a[0] + _same_length(a[1:], b[1:])
    n = len(a) - 1
    low_full, high_full = a[1:] == "0" * n, b[1:] == "9" * n
    parts = []
    if not low_full:
        parts.append(a[0] + _same_length(a[1:], "9" * n))
    first, last = int(a[0]) + (0 if low_full else 1), int(b[0]) - (0 if high_full else 1)
    if first <= last:
        parts.append(_digits(first, last) + ("" if n == 0 else "[0-9]" if n == 1 else f"[0-9]{{{n}}}"))
    if not high_full:
        parts.append(b[0] + _same_length("0" * n, b[1:]))
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"


def natural_range(low: int, high: int | None) -> str | None:
    """Regex for the decimal naturals in [low, high] (high None: no bound), no leading zeros; None if empty."""
    low = max(low, 0)
    if high is not None and low > high:
        return None
    parts = []
    top = len(str(high)) if high is not None else len(str(low))
    for length in range(len(str(low)), top + 1):
        a = max(low, 10 ** (length - 1) if length > 1 else 0)
        b = 10 ** length - 1 if high is None else min(high, 10 ** length - 1)
        if a <= b:
            parts.append(_same_length(str(a), str(b)))
    if high is None:
        parts.append(f"[1-9][0-9]{{{top},}}")
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"


def integer_range(low: int | None, high: int | None) -> str | None:
    """Regex for the integers in [low, high] (None: no bound on that side); None if the range is empty."""
    if low is not None and high is not None and low > high:
        return None
    parts = []
    if high is None or high >= 0:
        parts.append(natural_range(max(low or 0, 0), high))
    if low is None or low < 0:
        negative = natural_range(max(1, -high) if high is not None else 1, None if low is None else -low)
        if negative is not None:
            parts.append("-" + negative)
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"


def _bound(value, name: str, error) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"'{name}' must be a finite number, got {value!r}")
    return Fraction(value)


def bounds(node: dict, error) -> tuple[Fraction | None, bool, Fraction | None, bool]:
    """(low, low_exclusive, high, high_exclusive) from minimum/maximum and both forms of exclusive* (a number
    since draft 6, a flag on minimum/maximum in draft 4); the tighter bound wins."""
    low = high = None
    low_ex = high_ex = False
    for key, is_low in (("minimum", True), ("maximum", False), ("exclusiveMinimum", True),
                        ("exclusiveMaximum", False)):
        value = node.get(key)
        if value is None or isinstance(value, bool):
            continue
        if key.startswith("exclusive"):
            exclusive = True
        else:  # draft 4: a flag beside minimum / maximum
            exclusive = node.get("exclusiveMinimum" if is_low else "exclusiveMaximum") is True
        bound = _bound(value, key, error)
        if is_low and (low is None or bound > low or (bound == low and exclusive)):
            low, low_ex = bound, exclusive
        elif not is_low and (high is None or bound < high or (bound == high and exclusive)):
            high, high_ex = bound, exclusive
    return low, low_ex, high, high_ex


def _integer_bounds(low, low_ex, high, high_ex) -> tuple[int | None, int | None]:
    lo = None if low is None else (math.floor(low) + 1 if low_ex and low == math.floor(low) else math.ceil(low))
    hi = None if high is None else (math.ceil(high) - 1 if high_ex and high == math.ceil(high) else math.floor(high))
    return lo, hi


FRACTION_CAP = 10**15  # how far past 0 (or its other bound) a multipleOf of 1/k is written, on a side the schema leaves open


def _divides_one(step) -> bool:
    """Whether `step` is 1/k for a whole k > 1, as its decimal text reads (0.01, 0.25, 0.5; not 0.3)."""
    if isinstance(step, bool) or not isinstance(step, float) or not 0 < step < 1:
        return False
    return Fraction(repr(step)).numerator == 1


def integer_regex(node: dict, error) -> str | None:
    """An `integer` node with bounds and an integer multipleOf (on a side left open, only the nearest
    MAX_ENUMERATED_MULTIPLES multiples); None when no integer qualifies."""
    lo, hi = _integer_bounds(*bounds(node, error))
    step = node.get("multipleOf")
    if step is not None and not (isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0):
        raise error(f"'multipleOf' must be a positive number, got {step!r}")
    if step is None or (step == 1 and not isinstance(step, float)):
        return integer_range(lo, hi)
    if step == 1 or _divides_one(step):
        # every integer is a multiple of 1.0 or of 1/k (0.01, 0.5, ...): write integers, and validators that divide
        # in floating point still get whole quotients (the step's own rounding is under half a unit of 1/step's last
        # place).
        # Open sides stop at +-FRACTION_CAP: such validators turn the value into a float (jsonschema fails with an
        # OverflowError past 1e308, and precision goes past 2**53)
        top = FRACTION_CAP + max(0, lo or 0) if hi is None else hi
        return integer_range(-FRACTION_CAP + min(0, hi or 0) if lo is None else lo, top)
    if step != int(step):
        raise error(f"unsupported 'multipleOf' {step!r} that is neither an integer nor 1/k")
    step = int(step)
    if lo is None or hi is None:  # an open side: the MAX_ENUMERATED_MULTIPLES multiples next to the bound, or
        # around 0 (a narrower set, still valid, as a maxLength above length_cap is written as the cap)
        span = step * (MAX_ENUMERATED_MULTIPLES - 1)
        if lo is None and hi is None:
            lo = -step * (MAX_ENUMERATED_MULTIPLES // 2)
        lo, hi = (hi - span, hi) if lo is None else (lo, lo + span if hi is None else hi)
    first = -(-lo // step) * step
    if first > hi:
        return None
    if (hi - first) // step >= MAX_ENUMERATED_MULTIPLES:
        raise error(f"unsupported 'multipleOf' {step} with more than {MAX_ENUMERATED_MULTIPLES} multiples in range")
    return "(" + "|".join(str(v) for v in range(first, hi + 1, step)) + ")"


def number_regex(node: dict, error) -> str | None:
    """A `number` node with bounds (no exponent then); an integer multipleOf makes it an integer."""
    if node.get("multipleOf") is not None:
        return integer_regex(node, error)
    low, low_ex, high, high_ex = bounds(node, error)
    if low is None and high is None:
        return NUMBER
    lo, hi = _integer_bounds(low, low_ex, high, high_ex)
    parts = []
    whole = integer_range(lo, hi)
    if whole is not None:
        parts.append(whole + r"(\.0+)?")
    # k.ddd (k >= 0) lies in [k, k + 1): take k with k in range (strictly when low is exclusive) and k + 1 <= high
    k_low = None if low is None else (math.floor(low) + 1 if low_ex or low != math.floor(low) else int(low))
    k_high = None if high is None else math.floor(high) - 1
    natural = natural_range(max(k_low or 0, 0), k_high)
    if natural is not None:
        parts.append(natural + r"\.[0-9]+")
    # -k.ddd (k >= 1) lies in (-k - 1, -k]: take -k - 1 >= low and -k <= high (strictly when exclusive)
    if low is None or low <= -2:
        m_low = 1 if high is None else max(1, math.ceil(-high) + (1 if high_ex and high == math.ceil(high) else 0))
        m_high = None if low is None else math.floor(-low) - 1
        negative = natural_range(m_low, m_high)
        if negative is not None:
            parts.append("-" + negative + r"\.[0-9]+")
    if (low is None or low <= -1) and (high is None or high > 0 or (high == 0 and not high_ex)):
        parts.append(r"-0\.[0-9]+")  # (-1, 0]
    return None if not parts else parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"
