"""Retrying storage calls: which errors a retry can cure, and the backoff loop.

Errors are classified by type and code, never by message text.
"""

from __future__ import annotations

import errno
import logging
import random
import time
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
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(code, int) and code in TRANSIENT_HTTP:
        return True
    try:  # aiohttp (used by gcsfs) raises its own connection errors
        import aiohttp

        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


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
