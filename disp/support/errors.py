"""One exception type for every user-facing problem (bad flag, missing file, wrong checkpoint).

Scripts catch `DispError` at the top and print its message as one line, then exit with code 2,
so a typo never ends in a traceback wall. Messages say what is wrong and how to fix it.
"""

import sys
from contextlib import contextmanager


class DispError(Exception):
    """A problem with the user's input, explained in one line."""


@contextmanager
def friendly_errors():
    """Turn DispError (and Ctrl-C) into a one-line message and a non-zero exit."""
    try:
        yield
    except DispError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last saved checkpoint is intact; rerun with --resume to continue", file=sys.stderr)
        sys.exit(130)


def check_ratio(name: str, value: float) -> float:
    """A fraction that must lie in [0, 1] (mask ratio, poison rate, alpha)."""
    if not 0.0 <= value <= 1.0:
        raise DispError(f"{name} must be in [0, 1], got {value}")
    return value
