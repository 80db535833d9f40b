"""`check-resume`: does this task resume bit-exactly? Train it straight and interrupted, compare.

A resume that is not exact shows up hours later as a loss curve that drifts, when the Colab session
that could have told why is long gone. This check answers before the long run, on the user's own
task: it trains N steps in one go and the same N steps with real interruptions, both through the
real CLI in subprocesses (what a Colab session does), then compares the two final checkpoints with
the library's own readers, so what it checks is what `resume` will do.

    plan.py         N steps, the checkpoint cadence, the check's two failures
    driver.py       the child processes: start, pause, signal, anchored on the checkpoint listing
    records.py      where each resume started and how it labelled itself, from sessions.json
    compare.py      the one state comparison: the first tensor that differs, by how much
    diagnose.py     likely causes from those facts
    orchestrate.py  the runs in order and the verdict

When something differs, a second straight run tells a nondeterministic task (two uninterrupted runs
differ too) from a resume that loses state. Linux/macOS only (POSIX signals).
"""

from resilient_train.tools.check_resume.compare import (
    Difference,
    FinalState,
    Section,
    compare,
    config_changes,
    differences,
    first_difference,
    read_final_state,
    tensor_difference,
    weight_difference,
)
from resilient_train.tools.check_resume.diagnose import Cause, Facts, diagnose, gather_facts
from resilient_train.tools.check_resume.orchestrate import Interruption, check_resume
from resilient_train.tools.check_resume.plan import DEFAULT_STEPS, MIN_STEPS, CheckFailed, NotResumeExact, Plan, make_plan
from resilient_train.tools.check_resume.records import ResumeFact

__all__ = [
    "DEFAULT_STEPS", "MIN_STEPS", "Cause", "CheckFailed", "Difference", "Facts", "FinalState", "Interruption",
    "NotResumeExact", "Plan", "ResumeFact", "Section", "check_resume", "compare", "config_changes", "diagnose",
    "differences", "first_difference", "gather_facts", "make_plan", "read_final_state", "tensor_difference",
    "weight_difference",
]
