"""What each resume of the interrupted run promised, read from the run's session records.

The trainer records every session in `sessions.json`: the step it resumed from and the exactness
label of that resume (`resume`: level and reasons). The check reads those records, never the lines
a session printed: a warning that happens to contain "resume is" is no label, and a run folder on
any fsspec URL can be read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from resilient_train.run.folder import RunFolder
from resilient_train.run.sessions import SessionRecord
from resilient_train.storage import Storage


@dataclass(frozen=True)
class ResumeFact:
    """Where a session resumed from and how it labelled that resume."""

    resumed_from: Optional[int]  # None: the session started fresh
    label: Optional[str]  # "bit-exact", "sample-exact (world size 2 -> 1)"; None: not recorded (unknown)


def last_session(run_dir: str) -> int:
    """The highest session number recorded so far (0 when none): the next session's record comes after."""
    return max((r.session for r in RunFolder(Storage(run_dir)).session_records()), default=0)


def resume_after(run_dir: str, seen: int) -> ResumeFact:
    """The resume made by the first session recorded after session `seen` (none recorded: no resume)."""
    records = [r for r in RunFolder(Storage(run_dir)).session_records() if r.session > seen]
    return fact_of(records[0]) if records else ResumeFact(None, None)


def fact_of(record: SessionRecord) -> ResumeFact:
    """The resume one record describes.

    A record written before sessions recorded their resume has neither field: the session resumed
    when it started past step 0, and its exactness is unknown (never assumed bit-exact).
    """
    if not record.labelled:
        start = record.start_step
        return ResumeFact(start if start else None, None)
    return ResumeFact(record.resumed_from, str(record.resume) if record.resume is not None else None)
