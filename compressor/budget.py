"""Budgets as values: `flops<=50%`, `params<=2.5M`, `latency<=3ms@ort-cpu`, joined by `,`.

A Budget is a tuple of Constraints. A constraint is relative (a percentage of the original
model's value) or absolute (FLOPs, parameters, or latency in microseconds).
"""
import math
import re
from dataclasses import dataclass

from .errors import ConfigError
from .formats import TRT_FORMATS

METRICS = ("flops", "params", "latency")
LATENCY_TARGETS = ("torch-cpu", "torch-cuda", "ort-cpu", "ort-cuda", *TRT_FORMATS)  # trt-*: the export formats
# Multipliers of the absolute forms; latency is kept in microseconds.
COUNT_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}
TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}
EXPECTED = "expected METRIC<=VALUE, e.g. 'flops<=50%' or 'params<=2.5M' or 'latency<=3ms@ort-cpu'"
_VALUE = re.compile(r"^(\d+\.?\d*(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)\s*([a-z%]*)$", re.IGNORECASE)


def _bad(text, reason=None):
    return ConfigError(f"bad budget '{text}': {reason + '; ' if reason else ''}{EXPECTED}")


def _problem(metric, value, relative, target):
    """Why a constraint is invalid, or None."""
    if metric not in METRICS:
        return f"unknown metric '{metric}', expected one of {', '.join(METRICS)}"
    if metric == "latency" and target is None:
        return f"latency needs a target after '@', one of {', '.join(LATENCY_TARGETS)}"
    if metric != "latency" and target is not None:
        return f"a target (@{target}) is only allowed for latency"
    if target is not None and target not in LATENCY_TARGETS:
        return f"unknown target '{target}', expected one of {', '.join(LATENCY_TARGETS)}"
    if relative and not 0 < value <= 100:
        return f"percentage {value:g}% is outside (0, 100]"
    if not relative and not (value > 0 and math.isfinite(value)):
        return f"value {value:g} must be a positive number"
    return None


@dataclass(frozen=True)
class Constraint:
    """metric <= value: `value` is a percentage when `relative`, else FLOPs, parameters or
    microseconds. `target` names the runtime of a latency constraint."""

    metric: str
    value: float
    relative: bool = False
    target: str | None = None

    def __post_init__(self):
        reason = _problem(self.metric, self.value, self.relative, self.target)
        if reason:
            raise _bad(str(self), reason)

    def limit(self, original_value=None):
        """The absolute bound: `value` itself, or `value`% of the original model's value
        (for latency, the original's latency in microseconds on this target)."""
        if not self.relative:
            return float(self.value)
        if original_value is None:
            raise ConfigError(f"'{self}' is relative: pass the original model's {self.metric}")
        return original_value * self.value / 100

    def __str__(self):
        if self.relative:
            value = _number(self.value, 1.0) + "%"
        else:
            scales = TIME_UNITS if self.metric == "latency" else COUNT_SUFFIXES
            value = _scaled(self.value, scales)
        return f"{self.metric}<={value}" + (f"@{self.target}" if self.target else "")


def _number(value, scale):
    """`value / scale` written so that float(text) * scale == value, or None."""
    text = repr(value / scale).removesuffix(".0")
    return text if float(text) * scale == value else None


def _scaled(value, scales):
    """`value` with the largest suffix that keeps it >= 1 and round-trips exactly."""
    for suffix, scale in sorted(scales.items(), key=lambda item: -item[1]):
        text = _number(value, scale)
        if text is not None and (value >= scale or scale == 1.0):  # scale 1 always fits
            return text + suffix


class Budget(tuple):
    """An immutable tuple of Constraints, at most one per (metric, target)."""

    def __new__(cls, constraints):
        constraints = tuple(constraints)
        if not constraints:
            raise _bad("", "no constraint given")
        seen = set()
        for c in constraints:
            if not isinstance(c, Constraint):
                raise ConfigError(f"a Budget holds Constraints, got {c!r}")
            if (c.metric, c.target) in seen:
                where = f" on {c.target}" if c.target else ""
                raise _bad(",".join(map(str, constraints)),
                           f"{c.metric}{where} is bounded twice, give one bound per metric and target")
            seen.add((c.metric, c.target))
        return super().__new__(cls, constraints)

    @property
    def metrics(self):
        """The constrained metrics, each once, in order of appearance."""
        return tuple(dict.fromkeys(c.metric for c in self))

    def __str__(self):
        return ",".join(map(str, self))

    def __repr__(self):
        return f"Budget({str(self)!r})"


def _parse_constraint(text):
    left, sep, right = text.partition("<=")
    if not sep or "<=" in right:
        raise _bad(text)
    metric = left.strip().lower()
    if metric not in METRICS:
        raise _bad(text, f"unknown metric '{left.strip()}', expected one of {', '.join(METRICS)}")
    value_text, at, target = (part.strip() for part in right.partition("@"))
    target = target.lower() if at else None
    match = _VALUE.match(value_text)
    if not match:
        raise _bad(text, f"bad value '{value_text}'")
    number, unit = float(match[1]), match[2]
    relative = unit == "%"
    if relative:
        scale = 1.0
    elif metric == "latency":
        if unit.lower() not in TIME_UNITS:
            raise _bad(text, f"latency '{value_text}' needs a unit us, ms or s, or a percentage")
        scale = TIME_UNITS[unit.lower()]
    else:
        if unit.upper() not in COUNT_SUFFIXES:
            raise _bad(text, f"unknown suffix '{unit}' in '{value_text}', expected K, M, G or %")
        scale = COUNT_SUFFIXES[unit.upper()]
    reason = _problem(metric, number * scale, relative, target)
    if reason:
        raise _bad(text, reason)
    return Constraint(metric, number * scale, relative, target)


def parse_budget(text):
    """Parse `METRIC<=VALUE[@TARGET]` constraints joined by `,` into a Budget.

    A Budget is returned as it is; a Constraint becomes a one-constraint Budget.
    """
    if isinstance(text, Budget):
        return text
    if isinstance(text, Constraint):
        return Budget([text])
    if not isinstance(text, str):
        raise ConfigError(f"a budget is a string such as 'flops<=50%', got {text!r}")
    parts = text.split(",")
    if not text.strip() or any(not part.strip() for part in parts):
        raise _bad(text, "empty constraint")
    return Budget(_parse_constraint(part.strip()) for part in parts)
