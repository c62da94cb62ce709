"""User-facing errors: bad input ends a command with one clear line, never a traceback.

Raise ``InputError("what is wrong and what to do")`` anywhere; command entry points wrap their
``main`` in ``exit_on_input_error`` which prints ``error: <message>`` to stderr and exits with code 2.
"""

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class InputError(Exception):
    """Bad input from the user (missing file, corrupt shard, unknown key...). Message is one line."""


def exit_on_input_error(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
