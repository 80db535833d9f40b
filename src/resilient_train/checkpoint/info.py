"""What a listing says about one checkpoint folder, and what a load returns: plain records.

Kept apart from the manager so that retention (which orders and picks these records) and the
manager (which applies its picks) do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from resilient_train.checkpoint.format import Snapshot

COMMITTED, INCOMPLETE, CORRUPT = "committed", "incomplete", "corrupt"


@dataclass
class CheckpointInfo:
    """One `step-N` folder as `ls` shows it."""

    step: int
    path: str
    status: str
    bytes: int = 0
    created_at: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest: Optional[dict[str, Any]] = None
    reason: Optional[str] = None
    too_new: bool = False  # written by a newer format version
    entries: dict[str, dict] = field(default_factory=dict, repr=False)  # the folder's listing
    shared_bytes: int = 0  # bytes of the shared files it references (stored once per run, not in `bytes`)
    shared_problem: Optional[str] = None  # a shared file it references is missing or of the wrong size

    @property
    def names(self) -> frozenset[str]:
        """Every file name in the folder when it was listed."""
        return frozenset(self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "path": self.path, "status": self.status, "bytes": self.bytes,
            "shared_bytes": self.shared_bytes, "created_at": self.created_at, "metrics": self.metrics, "reason": self.reason,
        }


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint's manifest and the file contents one rank needs (by logical name)."""

    info: CheckpointInfo
    manifest: dict[str, Any]
    files: dict[str, bytearray]  # by logical name; a shared file read too is under `shared/<name>`
    read_shared: Optional[Callable[[str], bytearray]] = field(default=None, repr=False)  # a shared file it references, checked

    def snapshot(self, rank: int) -> "Snapshot":
        from resilient_train.checkpoint import format as fmt

        return fmt.decode(self.files, rank)
