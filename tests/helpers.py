"""What tests share: the one weight comparison and the one checkpoint listing.

The weight comparison is the tool's own (resilient_train.tools.check_resume.compare), so a test
and `check-resume` agree on what "the same weights" means: same keys, shapes and dtypes, and
values equal bit for bit in torch.equal's sense (here NaN != NaN, as in torch.equal; the tool
itself counts NaN at the same places as equal).

The listing is the library's (`CheckpointManager.list`), so it works on any fsspec URL and sees a
checkpoint as committed exactly when `resume` would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import torch

from resilient_train.checkpoint.manager import COMMITTED, CheckpointManager
from resilient_train.storage import Storage
from resilient_train.tools.check_resume.compare import weight_difference

RunLocation = Union[str, "os.PathLike[str]", Path]


def assert_same_weights(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Same keys, and every tensor the same: shape, dtype and every value (torch.equal)."""
    assert got.keys() == want.keys()
    diff = weight_difference(got, want, nan_equal=False)
    assert diff is None, f"weights differ at {diff.where}: {diff.detail}"


def committed_steps(run: RunLocation) -> list[int]:
    """The committed checkpoint steps of a run folder (a path or any fsspec URL), oldest first."""
    return [info.step for info in CheckpointManager(Storage(os.fspath(run))).list() if info.status == COMMITTED]
