"""Fencing zombie writers with an incarnation number kept in `RUN/lease.json`.

Every session that trains a run takes the lease by bumping the incarnation. A Colab session that
is still alive after the run was resumed elsewhere holds a stale incarnation: before it deletes
debris, commits a manifest or prunes, it re-reads the lease, sees a newer incarnation and stops
with `FencedError` instead of touching the newer session's checkpoints. (On stores without
compare-and-swap this narrows the race to the moment between check and write; it does not remove
it. The manifest-last protocol keeps the loser's half-written files from ever counting.)
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from resilient_train.errors import ResilientTrainError
from resilient_train.storage import Storage

LEASE = "lease.json"


class FencedError(ResilientTrainError):
    """This process's incarnation is stale: a newer session owns the run."""


@dataclass
class Lease:
    """The incarnation this process holds on a run folder."""

    storage: Storage
    incarnation: int
    writer: str

    @classmethod
    def acquire(cls, storage: Storage) -> "Lease":
        """Take over the run: incarnation = previous + 1."""
        current = read_lease(storage)
        record: dict[str, Any] = {
            "incarnation": int(current.get("incarnation", 0)) + 1,
            "writer": uuid.uuid4().hex[:12],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_text(json.dumps(record, indent=2), LEASE)
        lease = cls(storage=storage, incarnation=record["incarnation"], writer=record["writer"])
        lease.check("taking the lease")  # a concurrent taker wrote after us: it wins
        return lease

    def check(self, action: str) -> None:
        """Raise FencedError unless this process still holds the lease."""
        current = read_lease(self.storage)
        if current.get("incarnation") != self.incarnation or current.get("writer") != self.writer:
            raise FencedError(
                f"refusing {action}: run {self.storage.url} was taken over by incarnation "
                f"{current.get('incarnation')} (host {current.get('host')}, since {current.get('acquired_at')}); "
                f"this process holds stale incarnation {self.incarnation} and stops without touching the run"
            )


def read_lease(storage: Storage) -> dict[str, Any]:
    """The lease record, or {} when there is none or it is damaged (truncated, not JSON, wrong shape).

    A damaged lease is said in one warning line and read as "no holder": the next session to take
    the lease rewrites it whole, and a writer holding an incarnation no longer in the file is fenced.
    """
    import logging

    log = logging.getLogger(__name__)
    try:
        raw = storage.read_bytes(LEASE)
    except FileNotFoundError:
        return {}
    try:
        record = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        log.warning("%s is damaged (%s); treating the run as unleased", storage.display(LEASE), type(exc).__name__)
        return {}
    incarnation = record.get("incarnation") if isinstance(record, dict) else None
    if not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0:
        log.warning("%s is damaged (no incarnation number); treating the run as unleased", storage.display(LEASE))
        return {}
    return record
