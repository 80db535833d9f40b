"""A TensorDataset's micro-batch in one indexing op per tensor, not one per sample.

`default_collate([dataset[i] for i in indices])` slices every tensor once per sample and stacks
the slices: for a batch of 32 over (inputs, targets) that is 64 slices and 2 stacks, ~100 us on
a CPU, the largest cost of a fetch. `tensor.index_select(0, index)` copies the same rows into a
new contiguous tensor in one op (~15 us): the same bits, dtype, shape and strides, in the list
that `default_collate` makes of a tuple.

It is taken only where the two are the same: torch's own TensorDataset (a subclass may fetch
its own way) with torch's `default_collate` as torch ships it (its documented extension point,
`default_collate_fn_map`, may send tensors or tuples elsewhere), plain contiguous CPU tensors
that need no grad, in the main process (in a DataLoader worker `default_collate` builds the
batch in shared memory, which this would not), with no torch function or dispatch mode active
(a mode runs code of its own around every op, and the gather is not seeded: data/seeding.py).
Anything else goes the per-sample way.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import TensorDataset, get_worker_info
from torch.utils.data._utils.collate import collate_tensor_fn, default_collate, default_collate_fn_map


def gathered(dataset: Any, collate_fn: Callable[[Any], Any], indices: Sequence[int]) -> Optional[list[torch.Tensor]]:
    """`collate_fn([dataset[i] for i in indices])` in one op per tensor, or None where that is not
    known to give the same batch (the caller then fetches sample by sample)."""
    if type(dataset) is not TensorDataset or collate_fn is not default_collate or not indices:
        return None
    tensors = dataset.tensors
    if (not all(_plain(tensor) for tensor in tensors) or get_worker_info() is not None or not _collates_as_shipped()
            or _modes_active() or torch.Tensor.index_select is not _INDEX_SELECT):
        return None
    index = torch.tensor(indices, dtype=torch.long, device="cpu")  # not torch.set_default_device's
    return [tensor.index_select(0, index) for tensor in tensors]


_INDEX_SELECT = torch.Tensor.index_select  # as torch ships it: a patched one is code of someone else's


def _modes_active() -> bool:
    """Whether a torch function or dispatch mode is on its stack, other than the default device's
    (`torch.set_default_device` pushes one that only places factory calls; True where torch
    cannot say)."""
    try:
        if torch._C._len_torch_dispatch_stack():
            return True
        if not torch._C._len_torch_function_stack():
            return False
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext

        return not all(type(mode) is DeviceContext for mode in _get_current_function_mode_stack())
    except (AttributeError, ImportError):
        return True


def _collates_as_shipped() -> bool:
    """Whether `default_collate` still stacks tensors with torch's own function and has no entry
    that a tuple (what TensorDataset hands out per sample) would be collated by."""
    handlers = default_collate_fn_map
    return handlers.get(torch.Tensor) is collate_tensor_fn and not any(isinstance((), kind) for kind in handlers)


def _plain(tensor: Any) -> bool:
    return (type(tensor) is torch.Tensor and tensor.layout == torch.strided and tensor.device.type == "cpu"
            and tensor.is_contiguous() and not tensor.requires_grad and not tensor.is_quantized and tensor.dim() > 0)
