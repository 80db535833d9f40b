"""The resumable sampler: a global sample cursor, a world-size-independent order, seeded batches.

Epoch `e` visits the dataset in a shuffled order keyed by (seed, e) that costs O(1) memory at any
size (a Feistel bijection, data/permutation.py; runs begun before it keep `randperm(n)`), or in index
order when the given DataLoader asked for `shuffle=False`. Global micro-batch `k` of the epoch
is `order[k*B*W : (k+1)*B*W]` (B per-device batch, W world size) and rank `r` takes its `r`-th
slice of `B`. Resuming at global cursor `c` (samples consumed in the epoch by all ranks together)
starts at `order[c:]` in O(1): nothing is iterated to skip. Because the cursor is global and the
order does not depend on W, a resume on another world size sees every sample of the interrupted
epoch exactly once. The tail that does not fill a global batch is split evenly across the ranks as
one smaller batch (dropped only when there are fewer samples than ranks), so no sample is skipped
whatever the world size; with `drop_last=True` the tail is dropped on every world size.

Randomness drawn while a batch is fetched (random crops or windows in `__getitem__`, masking in a
collate function) must not depend on which worker process fetches the batch or on when the loader
was created, or a resume (new loader, new workers, batches dealt to other workers) would differ
from an uninterrupted run. So every micro-batch carries a seed derived from (seed, epoch, the
global sample position where its global batch starts, rank), and Python's `random`, torch's CPU
generator and NumPy's global generator are seeded from it just before the items are fetched and
collated, whether that happens in a worker or, with `num_workers=0`, in the main process. The
previous RNG states are restored afterwards, so the main process's own stream (dropout) never
moves, and a batch is the same with 0 or N workers, persistent or not. Lightning seeds each
worker once (from the worker id and rank) and torchdata's StatefulDataLoader snapshots each
worker's RNG state; both tie a batch's randomness to the worker that happens to fetch it, which
a resume with a fresh loader cannot reproduce. Generators a dataset builds itself (say
`numpy.random.default_rng()` without a seed) are outside this and stay non-reproducible.

An iterable train_data (IterableDataset, torchdata's StatefulDataLoader) has no index to jump to:
`build_source` hands it to data/iterable.py, which keeps each rank's position in the source's
own state (or skips what was consumed) instead of a global cursor.

Modules: `source.py` (the BatchSource protocol and `build_source`, choosing from the table in
`kinds.py`), `map_style.py`, `iterable.py` and `shards.py` (the adapters), `order.py` and
`permutation.py` (the epoch order), `seeding.py` (seeded fetching), `evaluation.py` (validation).
"""

from resilient_train.data.evaluation import build_eval_loader
from resilient_train.data.map_style import BatchStream, ResumableBatchSampler, build_loader
from resilient_train.data.order import FEISTEL, ITERABLE, ORDERS, RANDPERM, SEQUENTIAL, EpochOrder, epoch_order, resumed_order, saved_order
from resilient_train.data.seeding import BatchKey, SeededBatches, batch_seed, seeded
from resilient_train.data.source import BatchSource, build_source, build_stream

__all__ = [
    "BatchKey", "BatchSource", "BatchStream", "EpochOrder", "FEISTEL", "ITERABLE", "ORDERS", "RANDPERM", "ResumableBatchSampler",
    "SEQUENTIAL", "SeededBatches", "batch_seed", "build_eval_loader", "build_loader", "build_source", "build_stream", "epoch_order",
    "resumed_order", "saved_order", "seeded",
]
