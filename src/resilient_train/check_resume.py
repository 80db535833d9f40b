"""The old home of `check-resume`, kept so `from resilient_train.check_resume import ...` still works.

The check lives in `resilient_train.tools.check_resume` (driver, compare, diagnose, ...).
"""

from resilient_train.tools.check_resume import DEFAULT_STEPS as DEFAULT_STEPS
from resilient_train.tools.check_resume import MIN_STEPS as MIN_STEPS
from resilient_train.tools.check_resume import Cause as Cause
from resilient_train.tools.check_resume import CheckFailed as CheckFailed
from resilient_train.tools.check_resume import Difference as Difference
from resilient_train.tools.check_resume import Facts as Facts
from resilient_train.tools.check_resume import FinalState as FinalState
from resilient_train.tools.check_resume import Interruption as Interruption
from resilient_train.tools.check_resume import NotResumeExact as NotResumeExact
from resilient_train.tools.check_resume import Plan as Plan
from resilient_train.tools.check_resume import Section as Section
from resilient_train.tools.check_resume import check_resume as check_resume
from resilient_train.tools.check_resume import compare as compare
from resilient_train.tools.check_resume import config_changes as config_changes
from resilient_train.tools.check_resume import diagnose as diagnose
from resilient_train.tools.check_resume import differences as differences
from resilient_train.tools.check_resume import first_difference as first_difference
from resilient_train.tools.check_resume import gather_facts as gather_facts
from resilient_train.tools.check_resume import make_plan as make_plan
from resilient_train.tools.check_resume import read_final_state as read_final_state
