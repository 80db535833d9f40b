"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) that every session of a run continues.

A run outlives its sessions (a Colab VM, then another, then a local box), so its tracker run must
too: the tracker's run id lives in the run folder (`logs/trackers.json`, written through the run's
`Storage`, so a `gs://` run folder works), and each session reopens that same tracker run.

A session resumes from its checkpoint and logs again the steps that the dead session logged after
that checkpoint. What each tracker can do about those steps differs, and is said plainly:

- TensorBoard: the writer opens with `purge_step = resumed step + 1`; TensorBoard then hides the
  older events from that step on, so every step shows once, with the newest session's value.
- MLflow: a metric's history is append-only (no API deletes an entry), so a re-logged step has one
  entry per session that logged it. Every row also logs a `session` metric at its step, the run's
  latest values are the newest session's, and the run carries `resilient_train.session` tags.
- W&B: `wandb.init(id=..., resume="allow")`. Online, W&B itself refuses steps below the run's last
  step; those few steps keep the dead session's values (skipped here with one line, instead of a
  W&B warning per row). Offline, each session writes its own segment; `wandb sync` uploads them in
  order into the same run, where re-logged steps may appear once per session (the `session`
  metric tells them apart). W&B's run rewind (`resume_from`) would supersede them, but it is a
  private preview that needs the server, so it is not used.

Trackers must never stop training: a missing package is a `UsageError` at the start (nothing is
lost yet), while a tracker that fails to start or to log is reported in one warning line and
dropped for the rest of the session; `logs/metrics.csv` keeps every row regardless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resilient_train.errors import UsageError
from resilient_train.trackers.base import (
    FAILED,
    FINISHED,
    LOGS,
    STOPPED,
    TRACKERS_JSON,
    RunParams,
    SessionInfo,
    Tracker,
    TrackerClass,
    TrackerIds,
    TrackerSettings,
    flatten,
    log,
    scalars,
    why,
)
from resilient_train.trackers.mlflow import MlflowTracker
from resilient_train.trackers.tensorboard import TensorBoardTracker, tensorboard_dir
from resilient_train.trackers.wandb import WandbTracker

if TYPE_CHECKING:
    from resilient_train.storage import Storage

# every tracker `logging.trackers` may name, in the order messages list them: a new tracker is a
# new module beside these and one entry here
TRACKERS: dict[str, TrackerClass] = {
    TensorBoardTracker.name: TensorBoardTracker,
    MlflowTracker.name: MlflowTracker,
    WandbTracker.name: WandbTracker,
}

__all__ = [
    "FAILED", "FINISHED", "LOGS", "STOPPED", "TRACKERS", "TRACKERS_JSON",
    "MlflowTracker", "RunParams", "SessionInfo", "TensorBoardTracker", "Tracker", "TrackerClass", "TrackerIds", "WandbTracker",
    "chosen", "flatten", "open_trackers", "require_trackers", "scalars", "tensorboard_dir",
]


# -- choosing and opening ----------------------------------------------------------------------------
def chosen(logging_cfg: TrackerSettings, run: Storage) -> tuple[list[str], bool]:
    """(tracker names, whether the user named them).

    `logging.trackers: null` (the default) keeps what the package always did: TensorBoard when it
    is installed and the run folder is on local disk (the Docker image's TensorBoard watches
    `runs/*/logs/tensorboard`); a list means exactly those, `[]` none.
    """
    if logging_cfg.trackers is not None:
        return list(logging_cfg.trackers), True
    return (["tensorboard"] if run.backend.local_paths else []), False


def open_trackers(run: Storage, session: int, logging_cfg: TrackerSettings, start_step: int, params: RunParams) -> list[Tracker]:
    """Open the session's trackers, continuing the runs recorded in `logs/trackers.json`."""
    names, explicit = chosen(logging_cfg, run)
    # every package first: a missing one stops the session before any tracker run exists
    openers = [TRACKERS[name] for name in names if _installed(name, explicit)]
    if not openers:
        return []
    info = SessionInfo(run, session, start_step, logging_cfg, params, TrackerIds(run))
    trackers: list[Tracker] = []
    for opener in openers:
        if opener.needs_run_id and not info.ids.readable:
            continue
        try:
            trackers.append(opener(info))
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - a tracker outage must not stop the training
            log.warning("%s: could not start (%s); this session's metrics go to logs/metrics.csv only", opener.name, why(exc))
    return trackers


def require_trackers(logging_cfg: TrackerSettings, run: Storage) -> None:
    """UsageError naming the extra when a tracker `logging.trackers` lists cannot be imported.

    Called on global rank 0 before the run starts (Trainer.prepare_run), whose refusal every rank
    shares: found later, inside the loop, it would leave the other DDP ranks in a collective.
    """
    names, explicit = chosen(logging_cfg, run)
    for name in names:
        _installed(name, explicit)


def _installed(name: str, explicit: bool) -> bool:
    """Whether the tracker's package imports; UsageError naming the extra when it was asked for."""
    try:
        __import__(TRACKERS[name].package)
    except ImportError as exc:
        if not explicit:
            return False
        raise UsageError(f"logging.trackers has {name}, which cannot be imported ({exc}); "
                         f"pip install 'resilient_train[{name}]'") from None
    return True
