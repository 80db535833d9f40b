"""Checkpoints: the pickle-free format, the manifest commit protocol, listing, loading, retention."""

from resilient_train.checkpoint.manager import CheckpointInfo, CheckpointManager, LoadedCheckpoint
from resilient_train.checkpoint.format import Snapshot

__all__ = ["CheckpointInfo", "CheckpointManager", "LoadedCheckpoint", "Snapshot"]
