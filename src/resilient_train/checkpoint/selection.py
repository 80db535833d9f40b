"""Choosing the checkpoint to resume from: the newest one that verifies and decodes, across stores."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Protocol, Sequence

from resilient_train.checkpoint.info import COMMITTED, CheckpointInfo, LoadedCheckpoint
from resilient_train.checkpoint.manifest import FormatTooNewError
from resilient_train.errors import CheckpointError

log = logging.getLogger("resilient_train.checkpoint.manager")


class CheckpointStore(Protocol):
    """What choosing needs of a store's checkpoints (a `CheckpointManager` is one)."""

    distrusted: set[int]  # steps that verified but did not decode: never trusted again this process

    def list(self) -> list[CheckpointInfo]: ...

    def load(self, info: CheckpointInfo, wanted: Optional[set[str]] = None, shared: bool = True) -> LoadedCheckpoint: ...


def load_newest_valid(
    managers: Sequence[CheckpointStore],
    wanted: Optional[set[str]] = None,
    decode: Optional[Callable[[LoadedCheckpoint], Any]] = None,
    on_skip: Optional[Callable[[CheckpointInfo, str], None]] = None,
    shared: bool = True,
) -> Optional[tuple[int, LoadedCheckpoint, Any]]:
    """Across several storages (run folder, mirror), the newest checkpoint that verifies and decodes.

    Returns (index of the manager it came from, the loaded checkpoint, `decode(loaded)`); ties go
    to the first manager. Whatever is wrong with a checkpoint (a missing file, a bad checksum,
    contents that verify but do not decode, hostile JSON) skips that checkpoint alone, reported in
    one line; resume then falls back to the next older one. With `shared` False the shared files
    are left for `decode` to read if it needs them (LoadedCheckpoint.read_shared).
    """
    candidates = sorted(
        ((info, index) for index, manager in enumerate(managers) for info in manager.list()),
        key=lambda pair: (-pair[0].step, pair[1]),
    )
    for info, index in candidates:
        if info.too_new:
            raise FormatTooNewError(f"{info.path}: {info.reason}")
        if info.status != COMMITTED:
            log.warning("skipping checkpoint %s: %s (%s)", info.path, info.status, info.reason)
            continue
        try:
            loaded = managers[index].load(info, wanted, shared=shared)
        except CheckpointError as exc:
            _skip(info, str(exc), on_skip)
            continue
        except OSError:
            raise  # the storage failed (after retries), not the checkpoint: do not fall back past it
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint skips that checkpoint alone
            _skip(info, f"it cannot be read ({type(exc).__name__}: {_first_line(exc)})", on_skip)
            continue
        try:
            value = decode(loaded) if decode is not None else None
        except FormatTooNewError:
            raise
        except Exception as exc:  # noqa: BLE001 - verifies but does not decode: foreign or hostile
            managers[index].distrusted.add(info.step)
            reason = str(exc) if isinstance(exc, CheckpointError) else f"it cannot be decoded ({type(exc).__name__}: {_first_line(exc)})"
            _skip(info, reason, on_skip)
            continue
        return index, loaded, value
    return None


def _skip(info: CheckpointInfo, reason: str, on_skip: Optional[Callable[[CheckpointInfo, str], None]]) -> None:
    reason = reason.removeprefix(f"{info.path}: ")  # errors that name the checkpoint themselves: said once
    log.warning("skipping checkpoint %s: %s", info.path, reason)
    if on_skip is not None:
        on_skip(info, reason)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
