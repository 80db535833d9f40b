"""Retrying storage calls: which errors a retry can cure, and the backoff loop.

Errors are classified by type and code, never by message text.
"""

from __future__ import annotations

import errno
import logging
import random
import time
import traceback
from typing import Callable, TypeVar

log = logging.getLogger("resilient_train.storage")
T = TypeVar("T")

# errno values a flaky mount or network produces and that a retry can cure: EIO and ENOTCONN
# ("Transport endpoint is not connected") from the Colab Drive FUSE client, resets and timeouts.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ENOTCONN, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EAGAIN, errno.EPIPE})
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """Whether an error from a storage call is worth retrying (by type and code, never by text)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if _connection_failure(exc):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    return isinstance(code, int) and code in TRANSIENT_HTTP


# the code a storage call runs through: ours, fsspec's, and the libraries of its backends
_STORAGE_CODE = ("resilient_train.storage", "fsspec", "gcsfs", "aiohttp", "google")


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says a store could not be reached: a connection or timeout error raised
    inside a storage call.

    Judged by where it was raised (the modules of the frames it passed through), not by its type
    alone: the same ConnectionResetError comes from a DataLoader worker whose batch was lost in
    transfer, or from the task's own code, and calling that "storage unreachable" would send the
    user to check a network that is fine.
    """
    if not _connection_failure(exc):
        return False
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = str(frame.f_globals.get("__name__", ""))
        if any(module == name or module.startswith(name + ".") for name in _STORAGE_CODE):
            return True
    return False


def _connection_failure(exc: BaseException) -> bool:
    """A connection that failed or timed out, as Python or aiohttp (gcsfs's transport) says it:
    aiohttp's connection errors are OSErrors but not ConnectionErrors."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError))


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call `fn`, retrying transient storage errors with exponential backoff and jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
