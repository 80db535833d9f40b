"""A run's history (`sessions.json`, `logs/metrics.csv`) merged across copies of the run, never shortened.

A run and its copies (the mirror, a `sync` destination) can each go on training: `resume M` on a
mirror, then `resume P`, which takes M's newer checkpoint. Each copy then holds part of the
history. Copying a history file whole would replace the destination's with a shorter one (rows of
steps only the destination trained, session records only it wrote); so `sync` and the mirror
merge instead: the destination keeps everything it had and gains what the source adds. A run that
resumes from another copy's checkpoint takes that copy's history up to the resumed step first
(`adopt`), so its new session is numbered after the copy's sessions and no logged step is lost.

Records and rows are whole facts (a session record is written once; a metrics row is one step of
one session), so the merge is a union: a record or row the destination already holds is not added
twice. Readers already keep, per step, the row of the newest session.

This module imports no torch.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from resilient_train.run.metrics import LOGS, METRICS_CSV, _parse, _rows_text
from resilient_train.run.sessions import SESSIONS
from resilient_train.storage import Storage

log = logging.getLogger(__name__)

METRICS = f"{LOGS}/{METRICS_CSV}"
HISTORY_FILES = (SESSIONS, METRICS)


def merged(rel: str, dst: Optional[bytes], src: bytes, up_to: Optional[int] = None) -> Optional[bytes]:
    """What DST's history file `rel` should hold after taking SRC's (only SRC's entries of steps up
    to `up_to` when given); None when DST already holds all of it (nothing to write)."""
    if rel == SESSIONS:
        return _merged_sessions(dst, src, up_to)
    return _merged_metrics(dst, src, up_to)


def adopt(run: Storage, other: Storage, up_to: int) -> None:
    """Take `other`'s history up to step `up_to` into `run` (a resume from `other`'s checkpoint).

    A history file that cannot be read or written is said in one warning line: the resume goes on
    (the checkpoint is what must not be lost)."""
    for rel in HISTORY_FILES:
        parts = rel.split("/")
        try:
            src = other.read_bytes(*parts)
        except FileNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - history is worth a warning, not a failed resume
            log.warning("could not read %s (%s: %s); its history is not taken over", other.display(*parts), type(exc).__name__, exc)
            continue
        try:
            _write_merged(run, rel, src, up_to)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not take over %s into %s (%s: %s)", other.display(*parts), run.display(*parts), type(exc).__name__, exc)


def copy_history(src: Storage, dst: Storage, rel: str) -> None:
    """`sync` and the mirror: DST's history file gains SRC's entries and loses none of its own."""
    _write_merged(dst, rel, src.read_bytes(*rel.split("/")), None)


def _write_merged(dst: Storage, rel: str, src: bytes, up_to: Optional[int]) -> None:
    parts = rel.split("/")
    try:
        have: Optional[bytes] = dst.read_bytes(*parts)
    except FileNotFoundError:
        have = None
    new = merged(rel, have, src, up_to)
    if new is not None:
        dst.write_bytes(new, *parts)


def _records(raw: Optional[bytes]) -> Optional[list[Any]]:
    """The list sessions.json holds, None when absent or damaged."""
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, list) else None


def _merged_sessions(dst: Optional[bytes], src: bytes, up_to: Optional[int]) -> Optional[bytes]:
    theirs = _records(src)
    if theirs is None:  # a damaged source adds nothing
        return None
    if up_to is not None:
        theirs = [r for r in theirs if not _starts_after(r, up_to)]
    ours = _records(dst)
    if ours is None:  # absent (or damaged: unreadable, it holds no history to lose)
        return json.dumps(theirs, indent=2).encode() if theirs or dst is None else None
    known = {_key(r) for r in ours}
    added = [r for r in theirs if _key(r) not in known]
    if not added:
        return None
    both = ours + added
    both.sort(key=lambda r: r.get("session", 0) if isinstance(r, dict) and isinstance(r.get("session"), int) else 0)
    return json.dumps(both, indent=2).encode()


def _starts_after(record: Any, step: int) -> bool:
    start = record.get("start_step") if isinstance(record, dict) else None
    return isinstance(start, int) and start > step


def _key(record: Any) -> str:
    return json.dumps(record, sort_keys=True)


def _merged_metrics(dst: Optional[bytes], src: bytes, up_to: Optional[int]) -> Optional[bytes]:
    src_header, src_rows = _parse(src.decode("utf-8", errors="replace"))
    theirs = [dict(zip(src_header, fields, strict=True)) for fields in src_rows]
    if up_to is not None:
        theirs = [row for row in theirs if _step(row) is not None and _step(row) <= up_to]  # type: ignore[operator]
    dst_header, dst_rows = _parse(dst.decode("utf-8", errors="replace")) if dst is not None else ([], [])
    ours = [dict(zip(dst_header, fields, strict=True)) for fields in dst_rows]
    header = dst_header + [name for name in src_header if name not in dst_header]
    known = {_row_key(row, header) for row in ours}
    added = [row for row in theirs if _row_key(row, header) not in known]
    if not added and header == dst_header:
        return None
    if not header:
        return None
    return _rows_text(header, ours + added, with_header=True).encode("utf-8")


def _step(row: dict[str, str]) -> Optional[int]:
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


def _row_key(row: dict[str, str], header: list[str]) -> tuple[str, ...]:
    return tuple(row.get(name, "") or "" for name in header)
