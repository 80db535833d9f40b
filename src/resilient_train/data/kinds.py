"""The kinds of train_data the trainer takes, told apart in one place, in one table.

A kind is recognised by what the object is (a class from `datasets` or `torchdata` is recognised
by its module, so neither library is imported to ask), and it says how a resume finds the
position again: `cursor` (map-style: a global sample cursor, O(1), any world size), `state` (the
source's own `state_dict()`, saved per rank), or `skip` (iterate again and drop what was
consumed: exact only if the source repeats its order). Adding a kind is a row here plus, when
it needs one, its adapter module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.utils.data import DataLoader, IterableDataset


@dataclass(frozen=True)
class SourceKind:
    """One kind of train_data: its name, how to recognise it, how a resume finds its position."""

    name: str
    matches: Callable[[Any], bool]
    position: str  # cursor | state | skip


def is_iterable(data: Any) -> bool:
    """Whether `data` (a dataset or a DataLoader) is an iterable source rather than a map-style one."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return isinstance(dataset, IterableDataset) or is_hf_iterable(dataset)


def is_hf_iterable(obj: Any) -> bool:
    return type(obj).__name__ == "IterableDataset" and type(obj).__module__.startswith("datasets.")


def has_state(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def is_stateful_loader(loader: Any) -> bool:
    return type(loader).__name__ == "StatefulDataLoader" and type(loader).__module__.startswith("torchdata.")


def _dataset(data: Any) -> Any:
    return data.dataset if isinstance(data, DataLoader) else data


# First match wins: the more specific kinds come first. A StatefulDataLoader over a map-style
# dataset is map-style (the trainer owns its sampler); only what `is_iterable` accepts is iterable.
SOURCE_KINDS: tuple[SourceKind, ...] = (
    SourceKind("torchdata StatefulDataLoader", lambda data: is_iterable(data) and is_stateful_loader(data), "state"),
    SourceKind("Hugging Face IterableDataset", lambda data: is_hf_iterable(_dataset(data)), "state"),
    SourceKind("IterableDataset with state_dict", lambda data: is_iterable(data) and has_state(_dataset(data)), "state"),
    SourceKind("IterableDataset", is_iterable, "skip"),
    SourceKind("map-style Dataset", lambda data: True, "cursor"),
)


def kind_of(data: Any) -> SourceKind:
    """The first kind in SOURCE_KINDS that `data` (a dataset or a DataLoader) matches."""
    return next(kind for kind in SOURCE_KINDS if kind.matches(data))
