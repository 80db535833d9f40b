"""Seeded fetching: a micro-batch's randomness is a function of its position, not of the worker.

See the package docstring: every micro-batch is fetched and collated under a seed derived from
(seed, epoch, global position, rank), in whichever process fetches it, and the main process's
own RNG streams are put back afterwards. Shared by map-style and iterable sources.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from resilient_train.data.numpy_rng import NumpyRng
from resilient_train.data.python_rng import PythonRng
from resilient_train.data.stream_guard import StreamGuard
from resilient_train.data.tensor_rows import gathered


def batch_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of `parts` (stable across processes and Python runs)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class BatchKey(NamedTuple):
    """What the DataLoader hands a worker for one micro-batch: its sample indices and its seed."""

    indices: tuple[int, ...]
    seed: int


@functools.cache
def _numpy() -> Optional[NumpyRng]:
    """NumPy's global RNG guard, or None where NumPy is not installed (looked up once)."""
    try:
        import numpy
    except ImportError:
        return None
    return NumpyRng(numpy)


@functools.cache
def _python() -> PythonRng:
    return PythonRng()


class seeded:  # noqa: N801 - used as a context manager, like contextlib's
    """Seed `random`, torch's CPU generator and NumPy's global one; restore all three afterwards.

    Only the CPU generator is touched (`torch.manual_seed` would also reseed CUDA and so move the
    main process's GPU dropout stream when batches are fetched in the main process). Python's and
    NumPy's states are saved and restored as raw bytes (python_rng.py, numpy_rng.py): this runs
    on every micro-batch, and the public round trips cost ~30 us of a ~1 ms step. A class, not a
    generator-based context manager, for the same reason.
    """

    __slots__ = ("seed", "_saved")

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        py_rng, np_rng = _python(), _numpy()
        self._saved = (py_rng.save(), torch.get_rng_state(), np_rng.save() if np_rng is not None else None)
        py_rng.seed(self.seed)
        torch.default_generator.manual_seed(self.seed)
        if np_rng is not None:
            np_rng.seed(self.seed % 2**32)

    def __exit__(self, *exc: Any) -> None:
        saved_py, saved_torch, saved_np = self._saved
        _python().restore(saved_py)
        torch.set_rng_state(saved_torch)
        np_rng = _numpy()
        if np_rng is not None and saved_np is not None:
            np_rng.restore(saved_np)


class SeededBatches(Dataset):
    """The dataset as the DataLoader sees it: item `BatchKey` is one whole micro-batch.

    Fetching and collating both happen under the batch's seed, in whichever process fetches it:
    torch's CPU generator is seeded for every fetch, Python's and NumPy's global streams on the
    process's first fetch and then only if the dataset draws from them (stream_guard.py;
    otherwise seeding them would change nothing). `unbatched` mirrors a DataLoader with `batch_size=None`: each
    micro-batch is one item, given to the collate function alone.
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[Any], Any], unbatched: bool = False) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.unbatched = unbatched
        self._guards: Optional[tuple[StreamGuard, ...]] = None  # per process: built on first use, never pickled

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_guards": None}  # a spawned worker learns its own streams

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: BatchKey) -> Any:
        if not self.unbatched:
            rows = gathered(self.dataset, self.collate_fn, key.indices)  # a TensorDataset: one op per tensor
            if rows is not None:  # no code of the user's ran, so no stream was drawn from: nothing to seed
                return rows
        guards = self._guards if self._guards is not None else self._make_guards()
        while True:
            saved_torch = torch.get_rng_state()
            torch.default_generator.manual_seed(key.seed)
            for guard in guards:
                guard.before(key.seed)
            failed: Optional[Exception] = None
            try:
                batch = self._fetch(key.indices)
            except Exception as exc:  # kept: a fetch that drew unseeded is retried even when it raised
                failed = exc
            finally:
                again = [guard.after() for guard in guards]  # every stream is put back, whatever happened
                torch.set_rng_state(saved_torch)
            if any(again):
                continue
            if failed is not None:
                raise failed
            return batch

    def _fetch(self, indices: tuple[int, ...]) -> Any:
        if self.unbatched:
            return self.collate_fn(self.dataset[indices[0]])
        getitems = getattr(self.dataset, "__getitems__", None)  # batched fetch, as torch's fetcher does
        items = getitems(list(indices)) if getitems else [self.dataset[i] for i in indices]
        return self.collate_fn(items)

    def _make_guards(self) -> tuple[StreamGuard, ...]:
        np_rng = _numpy()
        streams = [StreamGuard(_python(), 2**63)] + ([StreamGuard(np_rng, 2**32)] if np_rng is not None else [])
        self._guards = tuple(streams)
        return self._guards


def whole_batch(batch: Any) -> Any:
    """The loader's collate function: SeededBatches already collated the micro-batch."""
    return batch


def worker_settings(loader: DataLoader) -> dict[str, Any]:
    """The given DataLoader's process and memory settings, carried over unchanged."""
    settings: dict[str, Any] = {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
                                "worker_init_fn": loader.worker_init_fn, "timeout": loader.timeout}
    if loader.num_workers > 0:
        settings["persistent_workers"] = loader.persistent_workers
        settings["multiprocessing_context"] = loader.multiprocessing_context
        if loader.prefetch_factor is not None:
            settings["prefetch_factor"] = loader.prefetch_factor
        if getattr(loader, "in_order", True) is False:
            settings["in_order"] = False
    device = getattr(loader, "pin_memory_device", None)
    if loader.pin_memory and device:
        settings["pin_memory_device"] = device
    return settings


def loader_generator() -> torch.Generator:
    """The loader's own generator: creating an iterator draws worker base seeds from it, never from
    the global torch RNG (that would shift dropout masks after a mid-epoch resume)."""
    generator = torch.Generator()
    generator.manual_seed(0)
    return generator
