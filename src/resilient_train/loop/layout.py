"""The batch layout of a session: what a checkpoint records so a resume can say what it keeps exact."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional


@dataclass(frozen=True)
class RunLayout:
    """How samples reach an optimizer step, as manifests and resume reports name the fields.

    `order` is the data order's algorithm (`feistel-v1`, `randperm-v1`, `sequential`, or
    `iterable`); `data_position` and `data_caveat` belong to an iterable train_data only (how its
    position is found again, and what a resume from it cannot keep) and are left out otherwise.
    """

    micro_batch: int  # samples per device per loaded batch
    global_batch: int  # samples per optimizer step, all ranks and micro-batches together
    order: Optional[str]
    drop_last: bool
    device_micro_batch: Optional[int] = None  # chunk size when a loaded batch goes through in chunks
    micro_batch_auto: bool = False
    data_position: Optional[str] = None
    data_caveat: Optional[str] = None

    @classmethod
    def of_source(cls, source_layout: dict[str, Any], micro_batch: int, global_batch: int) -> RunLayout:
        """The layout from a data source's own `layout()` record and the batch sizes."""
        return cls(micro_batch=micro_batch, global_batch=global_batch, order=source_layout.get("order"),
                   drop_last=bool(source_layout.get("drop_last", False)), data_position=source_layout.get("data_position"),
                   data_caveat=source_layout.get("data_caveat"))

    def with_chunking(self, size: Optional[int], auto: bool) -> RunLayout:
        return replace(self, device_micro_batch=size, micro_batch_auto=auto)

    def with_order(self, order: Optional[str]) -> RunLayout:
        return replace(self, order=order)

    def to_json(self) -> dict[str, Any]:
        """The manifest's fields (an iterable's two only when the source is iterable)."""
        out: dict[str, Any] = {"micro_batch": self.micro_batch, "global_batch": self.global_batch, "order": self.order,
                               "drop_last": self.drop_last}
        if self.data_position is not None:
            out.update(data_position=self.data_position, data_caveat=self.data_caveat)
        out.update(device_micro_batch=self.device_micro_batch, micro_batch_auto=self.micro_batch_auto)
        return out
