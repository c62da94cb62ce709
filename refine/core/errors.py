"""User-facing errors: bad input ends a command with one clear line, never a traceback.

Raise ``InputError("what is wrong and what to do")`` anywhere; command entry points wrap their
``main`` in ``exit_on_input_error`` which prints ``error: <message>`` to stderr and exits with code 2.
A failed write (a full disk, a file-size limit, an I/O error) is one such line too, naming the path and the
cause: every writer goes through ``refine.core.write.atomic_path``, so the previous version stays and the
half-written temporary is gone, and the rerun finishes the work.
"""

import errno
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)
# Errors of the storage, not of the program: the same command succeeds once there is room again.
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EDQUOT, errno.EROFS}
# How long a torchrun rank other than 0 waits, after an error every rank raised, for rank 0 to print it and
# torchrun to stop the job (it ends on its own after that, should rank 0 never get there).
EVERYONE_WAIT_S = 60.0


class InputError(Exception):
    """Bad input from the user (missing file, corrupt shard, unknown key...). Message is one line.

    ``everyone``: raised alike on every process of a torchrun job, so only rank 0 prints it."""

    everyone = False


def write_error_line(e: BaseException, path: object = None) -> str | None:
    """One line for a failed write (``None`` if ``e`` is not one): the path, the cause, what to do. Also reads
    errors that Rust writers (safetensors) wrap in their own exception text (``(os error 27)``)."""
    code = getattr(e, "errno", None)
    if code is None:
        import re

        m = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(e))
        code = int(m.group(1) or m.group(2)) if m else None
    if code not in WRITE_ERRNOS:
        return None
    where = path or getattr(e, "filename", None) or "a file"
    return (f"cannot write {where}: {os.strerror(code)} ({errno.errorcode[code]}); what was finished before is "
            f"kept: rerun the same command when there is room")


def everyone(e: InputError) -> InputError:
    e.everyone = True
    return e


def exit_on_input_error(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            # Under torchrun an error every rank raised alike is printed once, by rank 0. The others wait for
            # it: torchrun stops every worker as soon as one exits, and a rank that exited first would have
            # rank 0 killed before its line is out (no process group exists yet to order them).
            if e.everyone and os.environ.get("RANK", "0") != "0":
                time.sleep(EVERYONE_WAIT_S)
            else:
                print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            line = write_error_line(e)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
