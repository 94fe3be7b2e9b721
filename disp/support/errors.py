"""One exception type for every user-facing problem (bad flag, missing file, wrong checkpoint).

Scripts catch `DispError` at the top and print its message as one line, then exit with code 2,
so a typo never ends in a traceback wall. Messages say what is wrong and how to fix it.
"""

import math
import sys
from contextlib import contextmanager


class DispError(Exception):
    """A problem with the user's input, explained in one line."""


# The resume point the running stage wrote last (support.checkpoint.save sets it), for Ctrl-C's message.
last_resume_point = None


@contextmanager
def friendly_errors():
    """Turn DispError (and Ctrl-C) into a one-line message and a non-zero exit."""
    global last_resume_point
    last_resume_point = None
    try:
        yield
    except DispError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if last_resume_point is None:
            print("interrupted before the first resume point: nothing was saved, rerun the stage from the start",
                  file=sys.stderr)
        else:
            print(f"interrupted: the resume point {last_resume_point} is intact; rerun with --resume to continue",
                  file=sys.stderr)
        sys.exit(130)


def check_ratio(name: str, value: float) -> float:
    """A fraction that must lie in [0, 1] (mask ratio, poison rate, alpha)."""
    if not 0.0 <= value <= 1.0:
        raise DispError(f"{name} must be in [0, 1], got {value}")
    return value


def check_positive(name: str, value, allow_zero: bool = False):
    """A count or rate that must be > 0 (>= 0 with allow_zero) and finite."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise DispError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    """A name that must be one of `choices` (a trigger, a rule, a preset, ...)."""
    if value not in choices:
        raise DispError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value
