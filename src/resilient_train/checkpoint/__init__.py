"""Checkpoints: the pickle-free format, the write-once commit protocol, listing, loading, retention.

Importing this package loads no torch: the manager, manifest, lease, retention and transfer
modules are torch-free (`ls`, `verify` and `sync` use them); `format` and `codec` need torch.
"""

from typing import Any

from resilient_train.checkpoint.manager import CheckpointInfo, CheckpointManager, LoadedCheckpoint

__all__ = ["CheckpointInfo", "CheckpointManager", "LoadedCheckpoint", "Snapshot"]


def __getattr__(name: str) -> Any:
    if name == "Snapshot":
        from resilient_train.checkpoint.format import Snapshot

        return Snapshot
    raise AttributeError(f"module 'resilient_train.checkpoint' has no attribute {name!r}")
