"""The one exception type the library raises for bad input; the CLI turns it into a one-line error."""

from __future__ import annotations

import errno
import functools
import re
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class NextrapError(Exception):
    """A problem with the user's input or environment, worded so it can be printed as is."""


class NextrapWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one ``warning:`` line)."""


_OS_PROBLEMS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ENOENT: "not found",
                errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # a write failed: the disk, not the input


def os_problem(code: int | None, fallback: str = "") -> str:
    """An errno as the few words a user reads: 'permission denied', 'no space left on device', ..."""
    return _OS_PROBLEMS.get(code or 0, fallback.lower() or f"error {code}")


def os_error(e: OSError) -> NextrapError:
    """An OSError as one line naming its file: ``PATH: permission denied``, ``no space left on device writing PATH``."""
    problem = os_problem(e.errno, e.strerror or str(e))
    where = e.filename if e.filename is not None else "a file"
    return NextrapError(f"{problem} writing {where}" if e.errno in WRITE_ERRNOS else f"{where}: {problem}")


def one_line_os_errors(func: F) -> F:
    """For the library's entry points: an OSError (an unreadable file, a full disk) becomes a NextrapError naming
    the file, like every other bad input."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except OSError as e:
            raise os_error(e) from None
    return wrapper  # type: ignore[return-value]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (terminal escape codes removed), for one-line errors."""
    text = _ANSI.sub("", str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def one_line(e: BaseException) -> str:
    """An exception's whole message on one line, terminal escape codes removed."""
    return " ".join(_ANSI.sub("", str(e)).split()) or type(e).__name__
