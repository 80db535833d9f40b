"""Small JSON records of a run folder: read without ever failing a run over bookkeeping."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from resilient_train.storage import Storage

log = logging.getLogger(__name__)

DAMAGED = object()  # what `read_json` returns for a file that is there but does not parse


def read_json(storage: Storage, *parts: str) -> Any:
    """A small JSON file, None when absent, `DAMAGED` (said in one warning line) when unreadable."""
    try:
        raw = storage.read_bytes(*parts)
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        log.warning("%s is damaged (%s); ignoring it", storage.display(*parts), why(exc))
        return DAMAGED


def why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
