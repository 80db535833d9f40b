"""Iterable train_data: streams whose position is kept per rank, with the source's own state.

A map-style Dataset is resumed by the sampler in data/map_style.py at a global cursor, in O(1) and on any
world size. An iterable has no index to jump to: its position lives in the source itself. So:

- A source with `state_dict()` / `load_state_dict()` (a Hugging Face `datasets.IterableDataset`,
  streaming or from `to_iterable_dataset()`; torchdata's `StatefulDataLoader`; any torch
  IterableDataset that has both) has its state saved per rank with each checkpoint, and a
  resume loads it: it continues at the next sample. The state saved is the one taken right after
  the last batch an optimizer step consumed, never the live one: a DataLoader whose workers read
  ahead is ahead of training, which is why a dataset with state behind a plain DataLoader with
  workers is refused (torchdata's StatefulDataLoader accounts for the read-ahead itself).
- A source without state is resumed by iterating the epoch again and dropping the batches each
  rank had consumed (with a progress bar and one line saying how long it took). That repeats the
  run only if the source yields the same items in the same order on every pass, which nothing
  here can prove; the checkpoint keeps a fingerprint of the last batch consumed and the resume
  compares it with the last batch it skipped, saying whether they match.

Each rank reads its own shard: a Hugging Face dataset through `split_dataset_by_node`, any other
torch IterableDataset through `RankShard` (rank r keeps item r of every W consecutive items and an
incomplete last round is dropped, so every rank gets as many items). A given DataLoader or
StatefulDataLoader is rebuilt around the shard with its own settings. Positions are per rank and
shards depend on the world size, so a resume on another world size is refused.

The stream reads one batch ahead so that it knows when an epoch has ended (`completed_epochs`,
`trainer.max_epochs`) before asking for the next one; the state saved stays that of the batches
returned. With `num_workers=0`, every batch is fetched with Python's `random`, torch's CPU
generator and NumPy's global one seeded from (seed, epoch, batch number, rank), as map-style
batches are, and the training RNG streams are put back afterwards: reading ahead, or skipping on
resume, never moves dropout, and randomness drawn while iterating repeats on resume. With workers,
their base seed comes from the loader's own generator, seeded from (seed, epoch, rank) when each
epoch's iterator starts.

When a source ends, the next epoch starts (Hugging Face's `set_epoch(epoch)` first, so a shuffled
stream reshuffles). `epoch` is this rank's epoch; `cursor` counts this rank's samples of the epoch
times the world size (shards may differ by a few samples at their end, so under DDP it is an
estimate of the samples all ranks consumed).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from resilient_train.data.hf_position import check_source_state, source_shards
from resilient_train.data.kinds import has_state, is_hf_iterable, is_stateful_loader
from resilient_train.data.order import ITERABLE
from resilient_train.data.seeding import batch_seed, seeded, worker_settings
from resilient_train.data.shards import shard, shuffle_buffer
from resilient_train.errors import CheckpointError, UsageError

log = logging.getLogger("resilient_train")

BY_STATE, BY_SKIPPING = "state", "skip"  # the `data_position` it records: how a resume finds the position
STATE_FORMAT, STATE_VERSION = "resilient_train.data-position", 1
_FINGERPRINT_BYTES = 1 << 16  # of each tensor: enough to tell batches apart, cheap for large ones


def build_iterable_stream(data: Any, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int = 0,
                          max_epochs: Optional[int] = None) -> "IterableStream":
    """An IterableStream over this rank's shard of `data` (an IterableDataset or a DataLoader over one).

    A given DataLoader (torch's or torchdata's StatefulDataLoader) keeps its batch size, collate
    function, drop_last, workers and pinning; `batch_size` and `num_workers` apply to a bare dataset.
    """
    if max_epochs is not None and world_size > 1:
        _refuse(rank, "trainer.max_epochs with an iterable train_data under DDP: each rank's shard may end at another "
                      "batch, so the ranks could disagree on when an epoch is over; set trainer.max_steps instead")
    settings: dict[str, Any] = {"num_workers": num_workers}
    collate: Any = default_collate
    drop_last = False
    kind: Callable[..., DataLoader] = DataLoader
    if isinstance(data, DataLoader):
        if type(data) is not DataLoader and not is_stateful_loader(data):
            _refuse(rank, f"train_data is a {type(data).__name__} over an IterableDataset; give the dataset, a torch "
                          "DataLoader or torchdata's StatefulDataLoader so the trainer can shard it per rank")
        dataset, collate, drop_last = data.dataset, data.collate_fn, data.drop_last
        batch_size = data.batch_size if data.batch_size is not None else batch_size
        unbatched = data.batch_size is None
        settings = worker_settings(data)
        if is_stateful_loader(data):
            kind = type(data)
            settings["snapshot_every_n_steps"] = getattr(data, "snapshot_every_n_steps", 1)
    else:
        dataset, unbatched = data, False
    sharded = shard(dataset, rank, world_size)
    workers = int(settings.get("num_workers", 0))
    stateful_loader = kind is not DataLoader
    if not stateful_loader and has_state(sharded) and workers > 0:
        _refuse(rank, f"train_data has state_dict() but is read by {workers} DataLoader workers, which read ahead of "
                      "training, so its state is not that of the batches trained on; use torchdata's "
                      "StatefulDataLoader (same arguments) or num_workers=0")
    generator = torch.Generator()
    loader = kind(sharded, batch_size=None if unbatched else batch_size, drop_last=drop_last, collate_fn=collate,
                  generator=generator, **settings)
    source: Any = loader if stateful_loader else (sharded if has_state(sharded) else None)
    caveat = None
    if source is not None and shuffle_buffer(sharded):
        caveat = "the Hugging Face shuffle buffer (IterableDataset.shuffle) is refilled on resume: the samples it held are lost"
    set_epoch = getattr(sharded, "set_epoch", None) if is_hf_iterable(sharded) else None
    return IterableStream(loader, source, StreamPlace(batch_size, seed, rank, world_size),
                          StreamOptions(workers=workers, generator=generator, set_epoch=set_epoch, caveat=caveat, drop_last=drop_last))


def _refuse(rank: int, message: str) -> None:
    """A usage error said once: rank 0 raises it (one line), the other ranks exit with its code."""
    if rank == 0:
        raise UsageError(message)
    raise SystemExit(UsageError.exit_code)


def world_size_refusal(manifest: Mapping[str, Any], now: Mapping[str, Any]) -> Optional[str]:
    """Why a checkpoint of an iterable run cannot be resumed on this world size, or None."""
    saved = manifest.get("world_size")
    if now.get("order") != ITERABLE or manifest.get("order") != ITERABLE or saved == now.get("world_size"):
        return None
    return (f"train_data is iterable: each of the {saved} processes that wrote this checkpoint kept the position in its "
            f"own shard, and the shards depend on the number of processes, so it cannot resume on {now.get('world_size')}; "
            f"resume with {saved} processes (trainer.devices x trainer.num_nodes), or start a new run with another --run-dir")


@dataclass(frozen=True)
class StreamPlace:
    """Where a stream sits in the run: its batch size, the run's seed, and its rank among world_size."""

    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class StreamOptions:
    """How a stream reads its source: loader workers and generator, epoch hook, and what its state loses."""

    workers: int = 0
    generator: Optional[torch.Generator] = None
    set_epoch: Optional[Callable[[int], None]] = None
    caveat: Optional[str] = None
    drop_last: bool = False


class IterableStream:
    """Endless batches from an iterable source across epochs, with the position of the batches returned.

    The interface the training loop uses from BatchStream (`next`, `epoch`, `cursor`,
    `last_consumed`, `last_local`, `completed_epochs`, `seek`), what it reads from the sampler
    (`batch_size`, `global_batch`, `layout`, `use_order`), and `state_dict` / `load_state_dict`
    for this rank's entry in a checkpoint.
    """

    def __init__(self, loader: Any, source: Any, place: StreamPlace, options: Optional[StreamOptions] = None) -> None:
        options = options or StreamOptions()
        self.loader = loader
        self.source = source  # what has state_dict/load_state_dict (the dataset or the loader), or None
        self.batch_size, self.seed, self.rank, self.world_size = place.batch_size, place.seed, place.rank, place.world_size
        self.workers = options.workers
        self.generator = options.generator
        self.set_epoch = options.set_epoch
        self.caveat = options.caveat  # why loading the state does not give back the exact position, if it does not
        self.drop_last = options.drop_last
        self.epoch = 0
        self.cursor = 0  # this rank's samples of the epoch times the world size
        self.batches = 0  # batches of the epoch returned on this rank
        self.last_consumed = 0
        self.last_local = 0
        self._iterator: Optional[Iterator[Any]] = None
        self._fetched = 0  # batches of the epoch fetched (returned + the one read ahead)
        self._pending: Optional[tuple[Any, Any]] = None  # the batch read ahead, with the source's state right after it
        self._state: Any = None  # the source's state right after the last batch returned
        self._last: Optional[str] = None  # fingerprint of the last batch returned (sources without state)
        self._load: Any = None  # a state to load when the next iterator starts
        self._skip = 0  # batches to drop when the next iterator starts
        self._expect: Optional[str] = None  # the fingerprint the last skipped batch should have

    # -- what the trainer reads from a sampler --------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def by_state(self) -> bool:
        return self.source is not None

    @property
    def shards(self) -> Optional[int]:
        """How many shards the source reads (a datasets.IterableDataset's), for `check_position`."""
        return source_shards(self.source)

    def layout(self) -> dict[str, Any]:
        """What a checkpoint records: an iterable's order, and how its position is found again."""
        return {"order": ITERABLE, "drop_last": self.drop_last, "data_position": BY_STATE if self.by_state else BY_SKIPPING,
                "data_caveat": self.caveat}

    def use_order(self, layout_order: Any) -> None:
        """An iterable's order is its own: nothing to choose."""

    # -- the loop's interface ------------------------------------------------------------------
    @property
    def completed_epochs(self) -> int:
        """Full passes behind: the current epoch counts once the read-ahead found its end."""
        ended = self._iterator is not None and self._pending is None
        return self.epoch + (1 if ended else 0)

    def seek(self, epoch: int, cursor: int, state: Any = None) -> None:
        """Continue at this rank's entry of a checkpoint (`state`), or at (epoch, cursor) without one.

        Without an entry (the checkpoint was written from a map-style train_data) the batches of
        the epoch are skipped by count, as many as `cursor` makes for the global batch.
        """
        self._iterator, self._pending, self._state, self._last = None, None, None, None
        self._load, self._skip, self._expect = None, 0, None
        if state is None:
            self.epoch, self.cursor, self.batches = epoch, cursor, cursor // max(1, self.global_batch)
            self._skip = self.batches
        else:
            self.load_state_dict(state)
        if self._load is not None or self._skip:
            self._start()  # now: the resume's lines (skipped, how long) come with the resume's

    def next(self) -> Any:
        """The next batch; a source that ends starts the next epoch."""
        for _ in range(2):
            if self._iterator is None:
                self._start()
            if self._pending is not None:
                batch, state = self._pending
                self._pending = self._fetch()
                # a source without state: its fingerprint now, before the training step can change the batch in place
                self._state, self._last = state, (None if self.by_state else fingerprint(batch))
                self.batches += 1
                self.last_local = _batch_length(batch) or self.batch_size
                self.last_consumed = self.last_local * self.world_size
                self.cursor += self.last_consumed
                return batch
            self._new_epoch(self.epoch + 1)
        raise UsageError(f"train_data yielded no batch for a whole epoch on rank {self.rank}; is its shard empty?")

    # -- checkpoint entry ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's position after the batches returned so far (JSON-encodable, a copy)."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "position": BY_STATE if self.by_state else BY_SKIPPING,
            "rank": self.rank, "world_size": self.world_size, "epoch": self.epoch, "batches": self.batches,
            "cursor": self.cursor, "epoch_ended": self._iterator is not None and self._pending is None,
            "source": copy.deepcopy(self._state) if self.by_state and self.batches else None,
            "last_batch": self._last,
        }

    def load_state_dict(self, state: Any) -> None:
        """Continue after the batches an entry of `state_dict` says were returned."""
        check_position(state, self.shards)
        epoch, batches, cursor = state["epoch"], state["batches"], state["cursor"]
        self.epoch, self.batches, self.cursor = int(epoch), int(batches), int(cursor)
        if state.get("epoch_ended"):
            self._new_epoch(self.epoch + 1)
        elif self.by_state and state.get("source") is not None:
            self._load = state["source"]
        else:
            self._skip = self.batches  # no state saved, or none to load it into: drop what was consumed
            expect = state.get("last_batch")
            self._expect = expect if isinstance(expect, str) else None

    # -- internals ---------------------------------------------------------------------------
    def _new_epoch(self, epoch: int) -> None:
        self.epoch, self.cursor, self.batches = epoch, 0, 0
        self._iterator, self._pending, self._state, self._last = None, None, None, None
        self._load, self._skip, self._expect = None, 0, None

    def _start(self) -> None:
        """Begin this epoch's pass: position the source (load its state, or skip), read one ahead."""
        if self._load is None:
            self._begin_pass()
            return
        try:  # a foreign state can fail anywhere: in set_epoch, load_state_dict, or lazily in iter/next (HF)
            self._begin_pass()
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"the checkpoint's data position does not fit train_data ({type(exc).__name__}: "
                                  f"{str(exc).strip()[:200]}); resume with the data the run was trained with") from None

    def _begin_pass(self) -> None:
        if self.set_epoch is not None:
            self.set_epoch(self.epoch)
        if self.generator is not None:
            self.generator.manual_seed(batch_seed(self.seed, "iterable-workers", self.epoch, self.rank))
        self._fetched = 0
        if self._load is not None:
            self.source.load_state_dict(copy.deepcopy(self._load))
            self._fetched = self.batches
            self._state, self._load = self._load, None  # a save before the next batch keeps the position
        self._iterator = iter(self.loader)
        if self._skip:
            self._skip_consumed()
        self._pending = self._fetch()

    def _fetch(self) -> Optional[tuple[Any, Any]]:
        """The next batch of the pass and the source's state right after it; None at the end."""
        if self._iterator is None:  # only `_begin_pass` fetches, after it made the iterator
            raise RuntimeError("internal: fetching from an iterable stream that has not started its pass")
        try:
            if self.workers == 0:
                with seeded(batch_seed(self.seed, "iterable", self.epoch, self._fetched, self.rank)):
                    batch = next(self._iterator)
            else:
                batch = next(self._iterator)
        except StopIteration:
            return None
        self._fetched += 1
        state = copy.deepcopy(self.source.state_dict()) if self.by_state else None
        return batch, state

    def _skip_consumed(self) -> None:
        """Drop the batches of the epoch this rank had consumed, saying how long it took."""
        from tqdm.auto import tqdm

        want, last = self._skip, None
        started = time.perf_counter()
        with tqdm(total=want, desc="skipping consumed batches", unit="batch", disable=self.rank != 0, mininterval=0.5) as bar:
            for _ in range(want):
                fetched = self._fetch()
                if fetched is None:
                    break
                last = fetched[0]
                bar.update(1)
        took = time.perf_counter() - started
        skipped, self._skip = self._fetched, 0
        if skipped < want:
            log.warning("rank %d: train_data ended after %d of the %d batches to skip: it is not the data the run was "
                        "trained on; the epoch continues from its end", self.rank, skipped, want)
            return
        check = ""
        if self._expect is not None and last is not None:
            if fingerprint(last) == self._expect:
                check = "; the last one matches the batch the checkpoint recorded"
            else:
                log.warning("rank %d: the last skipped batch differs from the one the checkpoint recorded: train_data does "
                            "not yield the same items in the same order on every pass, so this resume is not exact", self.rank)
        if self.rank == 0:
            log.info("data: skipped %d consumed batch(es) of epoch %d in %.1fs%s", skipped, self.epoch, took, check)


_MAX_EPOCH, _MAX_COUNT = 2**31, 2**53  # beyond these a counter is garbage, not a position


def check_position(state: Any, shards: Optional[int] = None) -> None:
    """CheckpointError (one line) unless `state` is a data position this version reads.

    Called while the trainer picks the checkpoint to resume (`Trainer._resume`), so a position
    that passes the checksums but is garbage makes that checkpoint a misfit and an older one is
    tried, instead of failing after the choice was made.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError("the checkpoint's data position is not ours; the checkpoint is corrupt or not ours")
    version = state.get("version")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise CheckpointError(f"the checkpoint's data position has version {version!r}, newer than this resilient_train "
                              f"reads ({STATE_VERSION}); upgrade resilient_train")
    counters = {"epoch": _MAX_EPOCH, "batches": _MAX_COUNT, "cursor": _MAX_COUNT}
    for key, limit in counters.items():
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
            raise CheckpointError(f"the checkpoint's data position has {key}={str(value)[:40]!r}, not a plausible count; "
                                  "the checkpoint is corrupt or not ours")
    # the counters of a datasets.IterableDataset's state (`shards`: how many it reads) are checked
    # here; anything else in the source's state is the source's to judge: a state it cannot take
    # fails in `_start`, as one CheckpointError line
    check_source_state(state.get("source"), shards)


def _batch_length(batch: Any) -> Optional[int]:
    """Samples in a batch: the first dimension of its first tensor, or the length of a list of items."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        fields: Any = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        if not batch or not all(isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in batch):
            return len(batch)  # a list of items (strings, numbers)
        fields = batch
    else:
        return None
    for value in fields:
        length = _batch_length(value)
        if length is not None:
            return length
    return None


def fingerprint(batch: Any) -> str:
    """A short hash of a batch's content (each tensor's dtype, shape and first 64 KiB), to tell batches apart."""
    digest = hashlib.blake2b(digest_size=12)

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
            head = tensor[: max(1, _FINGERPRINT_BYTES // max(1, tensor.element_size()))]
            digest.update(head.view(torch.uint8).numpy().tobytes() if head.numel() else b"")
        elif isinstance(value, Mapping):
            digest.update(b"{")
            for key in value:
                digest.update(repr(key).encode())
                walk(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                walk(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    walk(batch)
    return digest.hexdigest()
