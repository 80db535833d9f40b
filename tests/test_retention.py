"""The retention policy: which committed checkpoints are deleted (a pure function of the list)."""

from __future__ import annotations

from resilient_train.checkpoint.manager import COMMITTED, CORRUPT, INCOMPLETE, CheckpointInfo
from resilient_train.checkpoint.retention import RetentionPolicy


def _infos(*steps: int, loss: dict[int, float] | None = None, status: dict[int, str] | None = None) -> list[CheckpointInfo]:
    loss, status = loss or {}, status or {}
    return [
        CheckpointInfo(step=s, path=f"ck/{s}", status=status.get(s, COMMITTED), metrics={"val_loss": loss[s]} if s in loss else {})
        for s in steps
    ]


def _doomed(policy: RetentionPolicy, infos: list[CheckpointInfo]) -> list[int]:
    return [i.step for i in policy.doomed(infos)]


def test_keep_last_deletes_the_oldest_by_step_not_by_list_order() -> None:
    infos = _infos(30, 10, 40, 20)
    assert _doomed(RetentionPolicy(keep_last=2), infos) == [10, 20]


def test_keep_last_none_keeps_everything() -> None:
    assert _doomed(RetentionPolicy(keep_last=None), _infos(1, 2, 3)) == []


def test_keep_best_keeps_the_best_by_monitor_in_either_mode() -> None:
    infos = _infos(10, 20, 30, 40, 50, loss={10: 0.5, 20: 0.1, 30: 0.9, 40: 0.3, 50: 0.7})
    assert _doomed(RetentionPolicy(keep_last=1, keep_best=2, monitor="val_loss", mode="min"), infos) == [10, 30]
    assert _doomed(RetentionPolicy(keep_last=1, keep_best=1, monitor="val_loss", mode="max"), infos) == [10, 20, 40]


def test_keep_every_n_steps_keeps_milestones() -> None:
    infos = _infos(500, 1000, 1500, 2000, 2500)
    assert _doomed(RetentionPolicy(keep_last=1, keep_every_n_steps=1000), infos) == [500, 1500]


def test_incomplete_and_corrupt_folders_are_never_counted_nor_deleted() -> None:
    infos = _infos(10, 20, 30, 40, status={30: CORRUPT, 40: INCOMPLETE})
    doomed = _doomed(RetentionPolicy(keep_last=1), infos)
    assert doomed == [10]  # 20 is the newest committed one and survives; 30/40 are not ours to judge here


def test_checkpoints_without_the_monitored_metric_are_not_kept_as_best() -> None:
    infos = _infos(10, 20, 30, loss={20: 0.2})
    assert _doomed(RetentionPolicy(keep_last=1, keep_best=2, monitor="val_loss"), infos) == [10]
