"""KFP recurring-run cron expressions: six fields, seconds first (robfig/cron syntax), checked before anything is
sent to the cluster."""

from __future__ import annotations

import re
from typing import Optional

from subjectops.errors import SubjectopsError


class SubmitError(SubjectopsError):
    """An input of a Kubeflow submission that the cluster would refuse (or misread)."""


_CRON_FIELDS = (
    ("seconds", 0, 59, None),
    ("minutes", 0, 59, None),
    ("hours", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]),
    ("day of week", 0, 6, ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]),
)
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _cron_value(text: str, lo: int, hi: int, names: Optional[list[str]], what: str, expr: str) -> int:
    if names and text.upper() in names:
        return names.index(text.upper()) + lo
    if not text.isdigit():
        raise SubmitError(f"cron {expr!r}: {what} value {text!r} is not a number"
                          + (f" or one of {', '.join(names)}" if names else ""))
    v = int(text)
    if not lo <= v <= hi:
        raise SubmitError(f"cron {expr!r}: {what} value {v} is outside {lo}-{hi}")
    return v


def validate_cron(expr: str) -> str:
    """Check a KFP recurring-run cron expression: six fields, seconds first (robfig/cron syntax).

    Accepts `*`, `?` (day fields), numbers, names (JAN-DEC, SUN-SAT), ranges `a-b`, steps `*/n` and
    `a-b/n`, lists `a,b`, and the descriptors `@daily`, `@every 1h30m`, .... Returns the expression.
    """
    expr = (expr or "").strip()
    if not expr:
        raise SubmitError("the cron expression is empty", fix="pass --cron '0 0 3 * * *' (every day at 03:00:00)")
    if expr.startswith("@"):
        if expr in _DESCRIPTORS:
            return expr
        if expr.startswith("@every "):
            if _DURATION.match(expr[len("@every "):].strip()):
                return expr
            raise SubmitError(f"cron {expr!r}: '@every' needs a Go duration such as 1h30m",
                              fix="e.g. --cron '@every 24h'")
        raise SubmitError(f"cron {expr!r}: unknown descriptor",
                          fix=f"use one of {', '.join(_DESCRIPTORS)} or '@every DURATION'")
    parts = expr.split()
    if len(parts) != 6:
        fix = "KFP's cron has six fields: seconds minutes hours day-of-month month day-of-week"
        if len(parts) == 5:
            fix += f"; for this five-field expression write '0 {expr}'"
        raise SubmitError(f"cron {expr!r} has {len(parts)} fields, KFP needs 6 (seconds first)", fix=fix)
    for part, (what, lo, hi, names) in zip(parts, _CRON_FIELDS):
        for item in part.split(","):
            if not item:
                raise SubmitError(f"cron {expr!r}: empty list item in the {what} field")
            base, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                raise SubmitError(f"cron {expr!r}: step {step!r} in the {what} field must be a positive number")
            if base in ("*", "?"):
                if base == "?" and what not in ("day of month", "day of week"):
                    raise SubmitError(f"cron {expr!r}: '?' is allowed only in the day fields, not in {what}")
                continue
            a, dash, b = base.partition("-")
            first = _cron_value(a, lo, hi, names, what, expr)
            if dash:
                last = _cron_value(b, lo, hi, names, what, expr)
                if last < first:
                    raise SubmitError(f"cron {expr!r}: range {base!r} in the {what} field runs backwards")
    return expr
