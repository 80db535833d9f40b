"""sessions.json: one record per session of a run (start step, resumed-from step, exactness label).

Tools read these typed records (`SessionRecord`), never the log lines a session printed. A damaged
file is reported in one line and rebuilt, its bytes kept in sessions.json.bak: bookkeeping never
blocks a resume.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from resilient_train.run.jsonfiles import utc_now, why
from resilient_train.storage import Storage

log = logging.getLogger(__name__)

SESSIONS = "sessions.json"
SESSIONS_BACKUP = "sessions.json.bak"


class SessionLog:
    """Reads and appends the session records of one run folder."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def records_json(self) -> list[dict[str, Any]]:
        """The session records; a damaged file is reported in one warning line, never fatal."""
        return self._load_sessions()[0]

    def records(self) -> list["SessionRecord"]:
        """The session records, typed: what tools read instead of the log lines a session printed."""
        return [SessionRecord.from_json(record) for record in self.records_json()]

    def start(self, start_step: int, info: dict[str, Any]) -> int:
        """Record a new session of this run; returns its number (1 for the first).

        A damaged sessions.json is kept as sessions.json.bak and a fresh list started; the new
        session's number then continues after the highest one in logs/metrics.csv, so plots still
        tell the sessions apart.
        """
        sessions, damaged = self._load_sessions()
        highest = max((s["session"] for s in sessions), default=0)
        if damaged is not None:
            try:
                self.storage.write_bytes(damaged, SESSIONS_BACKUP)
            except Exception as exc:  # the backup is a courtesy; the rebuilt record matters
                log.warning("could not keep the damaged %s as %s (%s: %s)", SESSIONS, SESSIONS_BACKUP, type(exc).__name__, exc)
            highest = max(highest, _highest_logged_session(self.storage))
        number = highest + 1
        sessions.append({"session": number, "start_step": start_step, "started_at": utc_now(), **info})
        self.storage.write_text(json.dumps(sessions, indent=2), SESSIONS)
        return number

    def _load_sessions(self) -> tuple[list[dict[str, Any]], Optional[bytes]]:
        """(usable records, the raw bytes when the file was damaged)."""
        try:
            raw = self.storage.read_bytes(SESSIONS)
        except FileNotFoundError:
            return [], None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("%s is damaged (%s); ignoring it (rebuilt at the next session)", self.storage.display(SESSIONS), why(exc))
            return [], raw
        if not isinstance(data, list):
            log.warning("%s is damaged (a %s, not a list); ignoring it (rebuilt at the next session)",
                        self.storage.display(SESSIONS), type(data).__name__)
            return [], raw
        records = [r for r in (_clean_session(item) for item in data) if r is not None]
        if len(records) != len(data):
            log.warning("%s: ignoring %d damaged record(s)", self.storage.display(SESSIONS), len(data) - len(records))
            return records, raw
        return records, None


@dataclass(frozen=True)
class ResumeLabel:
    """What a resume promised, as the trainer recorded it (portability.ResumeAssessment)."""

    level: str  # bit-exact | sample-exact | approximate
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        """"sample-exact (world size 2 -> 1)": the level with the reasons that say what changed."""
        return f"{self.level} ({'; '.join(self.reasons)})" if self.reasons else self.level


@dataclass(frozen=True)
class SessionRecord:
    """One record of sessions.json with the types its readers rely on.

    `resumed_from` and `resume` are None for a session that started fresh, and also in records
    written before sessions recorded them (`labelled` False): there the exactness is unknown, which
    is not the same as bit-exact.
    """

    session: int
    start_step: Optional[int]
    resumed_from: Optional[int]
    resume: Optional[ResumeLabel]
    labelled: bool  # the record has the `resume` field (None there: no resume happened)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "SessionRecord":
        """From a record `_clean_session` accepted; fields of a wrong type read as absent."""
        resume = record.get("resume")
        return cls(session=record["session"], start_step=_int_or_none(record.get("start_step")),
                   resumed_from=_int_or_none(record.get("resumed_from")), resume=_resume_label(resume),
                   labelled="resume" in record and (resume is None or _resume_label(resume) is not None))


def _int_or_none(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _resume_label(value: Any) -> Optional[ResumeLabel]:
    if not isinstance(value, dict) or not isinstance(value.get("level"), str):
        return None
    reasons = value.get("reasons")
    reasons = reasons if isinstance(reasons, list) else []
    return ResumeLabel(value["level"], tuple(str(r) for r in reasons))


def _clean_session(item: Any) -> Optional[dict[str, Any]]:
    """A session record with the types readers rely on, or None when it is not one."""
    if not isinstance(item, dict):
        return None
    number = item.get("session")
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        return None
    record = dict(item)
    start = record.get("start_step")
    if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
        record.pop("start_step")
    if "environment" in record and not isinstance(record["environment"], dict):
        record.pop("environment")
    return record


def _highest_logged_session(storage: Storage) -> int:
    from resilient_train.run.metrics import read_rows

    try:
        rows = read_rows(storage)
    except Exception:  # no metrics, or unreadable: numbering restarts after the records we have
        return 0
    return max((row["session"] for row in rows), default=0)
