"""A seeded fetch leaves the main process's RNG streams exactly as they were (data/seeding.py).

NumPy's state is put back through a fast path (data/numpy_rng.py) that handles the legacy
`randn` cache by reasoning, not by reading it; these tests compare it, draw for draw, with the
plain `get_state`/`set_state` round trip over random sequences of user draws and fetches.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import pytest
import torch

from resilient_train.data import seeding
from resilient_train.data.numpy_rng import NumpyRng
from resilient_train.data.python_rng import PythonRng


def _round_trip(save: Callable[[], Any], reseed: Callable[[int], None], restore: Callable[[Any], None],
                seed: int, draw: Callable[[], Any]) -> Any:
    """A fetch's pattern around one stream: save, seed, draw, restore."""
    saved = save()
    reseed(seed)
    try:
        return draw()
    finally:
        restore(saved)


def _reference_fetch(seed: int, draw: Callable[[], Any]) -> Any:
    return _round_trip(np.random.get_state, lambda s: np.random.seed(s % 2**32), np.random.set_state, seed, draw)


def _guarded_fetch(guard: NumpyRng, seed: int, draw: Callable[[], Any]) -> Any:
    return _round_trip(guard.save, lambda s: guard.seed(s % 2**32), guard.restore, seed, draw)


DRAWS: list[Callable[[], Any]] = [
    lambda: None,
    lambda: np.random.rand(),
    lambda: np.random.randn(),  # fills or empties the gauss cache
    lambda: np.random.randn(3),
    lambda: np.random.rand(700),  # past one 624-word block
    lambda: np.random.randint(0, 10, size=5),
    lambda: np.random.normal(size=1),
]


def _script(rng: random.Random, length: int) -> list[tuple[str, int, int]]:
    """A sequence of user draws, user reseeds and fetches (each with the draw it makes)."""
    actions = []
    for _ in range(length):
        kind = rng.choice(["fetch", "fetch", "fetch", "user", "user", "reseed"])
        seed = rng.randrange(2) if kind == "reseed" else rng.randrange(2**40)  # reseeds revisit states
        actions.append((kind, rng.randrange(len(DRAWS)), seed))
    return actions


def _play(script: list[tuple[str, int, int]], fetch: Callable[[int, Callable[[], Any]], Any]) -> list[Any]:
    np.random.seed(1234)
    seen: list[Any] = []
    for kind, draw, seed in script:
        if kind == "fetch":
            seen.append(fetch(seed, DRAWS[draw]))
        elif kind == "user":
            seen.append(DRAWS[draw]())
        else:
            np.random.seed(seed % 2**32)
    values = [np.asarray(x).tolist() if x is not None else None for x in seen]
    state = np.random.get_state()
    return values + [state[1].tolist(), state[2], state[3], state[4]]


@pytest.mark.parametrize("script_seed", range(12))
def test_numpy_draws_match_a_plain_get_and_set_state_round_trip(script_seed: int) -> None:
    script = _script(random.Random(script_seed), 60)
    expected = _play(script, _reference_fetch)
    guard = NumpyRng(np)
    assert _play(script, lambda seed, draw: _guarded_fetch(guard, seed, draw)) == expected


def test_the_gauss_cache_of_the_main_process_survives_a_fetch() -> None:
    guard = NumpyRng(np)
    np.random.seed(5)
    np.random.randn()  # one normal of a pair is now cached
    before = np.random.get_state()
    for seed in range(3):
        _guarded_fetch(guard, seed, lambda: np.random.randn(5))
    after = np.random.get_state()
    assert after[3] == before[3] == 1 and after[4] == before[4]
    assert np.array_equal(after[1], before[1]) and after[2] == before[2]


def test_the_fast_path_is_taken_on_this_numpy() -> None:
    assert NumpyRng(np).save()[0] is not None  # the layout was proven: raw fields, not the 624-word tuple


def test_a_state_revisited_by_reseeding_keeps_its_gauss_cache() -> None:
    # randn(2) and randn(1) from one seed end on the same key and position, the second with a
    # normal left in the cache: a fetch in between must keep that cache (found in review)
    guard = NumpyRng(np)
    np.random.seed(0)
    np.random.randn(2)
    _guarded_fetch(guard, 11, lambda: np.random.rand())
    np.random.seed(0)
    np.random.randn(1)
    expected = np.random.get_state()
    _guarded_fetch(guard, 12, lambda: np.random.rand())
    after = np.random.get_state()
    assert after[3] == expected[3] == 1 and after[4] == expected[4]
    assert np.array_equal(after[1], expected[1]) and after[2] == expected[2]


def test_without_a_ctypes_interface_the_guard_falls_back_to_get_state() -> None:
    class NoCtypes:
        """NumPy as seen through a bit generator without `ctypes` (another implementation)."""

        def __init__(self) -> None:
            self.random = self

        def get_state(self) -> Any:
            return np.random.get_state()

        def set_state(self, state: Any) -> None:
            np.random.set_state(state)

        def seed(self, seed: int) -> None:
            np.random.seed(seed)

    guard = NumpyRng(NoCtypes())
    np.random.seed(2)
    np.random.randn()
    before = np.random.get_state()
    saved = guard.save()
    assert saved[0] is None  # no proven layout: the legacy state tuple
    guard.seed(7)
    np.random.rand(10)
    guard.restore(saved)
    after = np.random.get_state()
    assert np.array_equal(after[1], before[1]) and after[2:] == before[2:]


def test_a_seeded_fetch_restores_python_torch_and_numpy_streams() -> None:
    random.seed(3)
    torch.manual_seed(3)
    np.random.seed(3)
    expected = (random.random(), torch.rand(2).tolist(), np.random.rand())
    random.seed(3)
    torch.manual_seed(3)
    np.random.seed(3)
    with seeding.seeded(42):
        inside = (random.random(), torch.rand(2).tolist(), np.random.rand())
    assert (random.random(), torch.rand(2).tolist(), np.random.rand()) == expected
    with seeding.seeded(42):
        again = (random.random(), torch.rand(2).tolist(), np.random.rand())
    assert again == inside  # a batch's randomness is a function of its seed alone


# -- Python's `random` (data/python_rng.py) ----------------------------------------------------

PY_DRAWS: list[Callable[[], Any]] = [
    lambda: None,
    lambda: random.random(),
    lambda: random.gauss(0.0, 1.0),  # fills or empties the gauss_next cache
    lambda: random.getrandbits(64 * 624),  # past one 624-word block
    lambda: random.sample(range(100), 5),
    lambda: random.randrange(10**30),
]


def _py_play(script: list[tuple[str, int, int]], fetch: Callable[[int, Callable[[], Any]], Any]) -> list[Any]:
    random.seed(1234)
    seen = []
    for kind, draw, seed in script:
        if kind == "fetch":
            seen.append(fetch(seed, PY_DRAWS[draw % len(PY_DRAWS)]))
        elif kind == "user":
            seen.append(PY_DRAWS[draw % len(PY_DRAWS)]())
        else:
            random.seed(seed)
    return seen + [random.getstate()]


@pytest.mark.parametrize("script_seed", range(8))
def test_python_draws_match_a_plain_getstate_and_setstate_round_trip(script_seed: int) -> None:
    script = _script(random.Random(script_seed), 60)
    expected = _py_play(script, lambda seed, draw: _round_trip(random.getstate, random.seed, random.setstate, seed, draw))
    guard = PythonRng()
    assert _py_play(script, lambda seed, draw: _round_trip(guard.save, guard.seed, guard.restore, seed, draw)) == expected


def test_the_python_fast_path_is_taken_on_this_python() -> None:
    assert PythonRng().save()[0] is not None  # the layout was proven: raw bytes, not getstate()


def test_proving_the_python_layout_leaves_the_users_state_as_it_was() -> None:
    random.seed(9)
    random.gauss(0.0, 1.0)  # a cached normal, too
    before = random.getstate()
    PythonRng().save()
    assert random.getstate() == before


def test_a_random_subclass_keeps_the_plain_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    class Mine(random.Random):
        pass

    mine = Mine(5)
    monkeypatch.setattr(random, "getstate", mine.getstate)
    monkeypatch.setattr(random, "setstate", mine.setstate)
    monkeypatch.setattr(random, "seed", mine.seed)
    guard = PythonRng()
    before = mine.getstate()
    saved = guard.save()
    assert saved[0] is None  # not proven for a subclass: getstate()'s tuple
    guard.seed(3)
    mine.random()
    guard.restore(saved)
    assert mine.getstate() == before


# -- lazy seeding of Python's and NumPy's streams (data/stream_guard.py) ------------------------

class _Drawing(torch.utils.data.Dataset):
    """Items that draw from the global streams as `policy` says: never, always, only some items,
    only from item 20 on, or a permutation drawn on first access and kept."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.calls = 0
        self.perm: Any = None

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> Any:
        self.calls += 1
        out = [float(i)]
        if self.policy == "setup":
            if self.perm is None:
                self.perm = random.sample(range(64), 64)
            out.append(float(self.perm[i]))
        if self.policy in ("python", "both") or (self.policy == "sometimes" and i % 7 == 3) or (self.policy == "late" and i >= 20):
            out += [random.random(), random.gauss(0.0, 1.0)]
        if self.policy in ("numpy", "both") or (self.policy == "sometimes" and i % 11 == 5):
            out += [float(np.random.rand()), float(np.random.randn())]
        out.append(float(torch.rand(())))
        return torch.tensor(out)


def _states() -> tuple:
    np_state = np.random.get_state()
    return (random.getstate(), np_state[1].tolist(), np_state[2:], torch.get_rng_state().tolist())


def _fetch_script(fetch: Callable[[seeding.BatchKey], Any], script_seed: int) -> list[Any]:
    """Fetches with user draws and reseeds of every stream in between; every result and the end states."""
    rng = random.Random(script_seed)
    actions = [(rng.choice(["fetch"] * 4 + ["user", "reseed"]), rng.randrange(2**40)) for _ in range(40)]
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    seen: list[Any] = []
    for kind, value in actions:
        if kind == "fetch":
            indices = tuple((value + k) % 64 for k in range(4))
            seen.append([t.tolist() for t in fetch(seeding.BatchKey(indices, value))])
        elif kind == "user":
            seen.append((random.random(), random.gauss(0.0, 1.0), float(np.random.randn()), float(torch.rand(()))))
        else:
            random.seed(value % 3)
            np.random.seed(value % 3)
    return seen + [_states()]


@pytest.mark.parametrize("policy", ["never", "python", "numpy", "both", "sometimes", "late", "setup"])
@pytest.mark.parametrize("script_seed", range(3))
def test_lazy_seeding_gives_what_seeding_every_stream_gives(policy: str, script_seed: int) -> None:
    reference_data = _Drawing(policy)

    def reference(key: seeding.BatchKey) -> Any:
        with seeding.seeded(key.seed):
            return [reference_data[i] for i in key.indices]

    batches = seeding.SeededBatches(_Drawing(policy), list)
    assert _fetch_script(lambda key: batches[key], script_seed) == _fetch_script(reference, script_seed)


def _fetch_all(batches: seeding.SeededBatches, starts: range) -> None:
    for start in starts:
        batches[seeding.BatchKey(tuple(range(start, start + 4)), start)]


def test_only_a_dataset_that_starts_drawing_after_the_first_batch_is_fetched_twice_once() -> None:
    always = seeding.SeededBatches(_Drawing("python"), list)
    _fetch_all(always, range(0, 40, 4))
    assert always.dataset.calls == 10 * 4  # the first fetch was seeded and showed it draws: no fetch again
    late = seeding.SeededBatches(_Drawing("late"), list)
    _fetch_all(late, range(0, 40, 4))
    assert late.dataset.calls == 11 * 4  # the batch at 20 drew from an idle stream: fetched again, seeded
    never = seeding.SeededBatches(_Drawing("never"), list)
    _fetch_all(never, range(0, 40, 4))
    assert never.dataset.calls == 10 * 4


class _FailsUnlucky(torch.utils.data.Dataset):
    """Item 13 draws once and raises when the draw is below one half."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> float:
        if i == 13 and random.random() < 0.5:
            raise ValueError("unlucky draw")
        return float(i)


def test_a_fetch_that_raised_after_drawing_from_an_idle_stream_is_fetched_again_seeded() -> None:
    lucky = next(s for s in range(100) if random.Random(s).random() >= 0.5)
    unlucky = next(s for s in range(100) if random.Random(s).random() < 0.5)
    batches = seeding.SeededBatches(_FailsUnlucky(), list)
    batches[seeding.BatchKey((0, 1), 3)]  # learned: this dataset's first batch does not draw
    random.seed(unlucky)  # the process's own stream would raise
    before = random.getstate()
    assert batches[seeding.BatchKey((12, 13), lucky)] == [12.0, 13.0]  # the batch's seed does not
    assert random.getstate() == before
    with pytest.raises(ValueError, match="unlucky draw"):  # a seeded draw that fails still fails
        batches[seeding.BatchKey((13,), unlucky)]
    assert random.getstate() == before


def test_a_numpy_layout_keeps_the_bit_generator_it_writes_into_alive() -> None:
    guard = NumpyRng(np)
    original = np.random.get_bit_generator()
    try:
        generator = np.random.MT19937(3)
        np.random.set_bit_generator(generator)
        saved = guard.save()  # proven for this bit generator
        assert saved[0] is not None and saved[0].bit_generator is generator  # held by what restore writes through
        np.random.set_bit_generator(np.random.MT19937(4))  # as a fetch might
        guard.fingerprint()  # the guard moves on to the new one
        del generator
        guard.restore(saved)  # into the old generator, still alive: no write into freed memory
    finally:
        np.random.set_bit_generator(original)


def test_what_a_process_learned_about_its_streams_is_not_pickled_to_workers() -> None:
    import pickle

    batches = seeding.SeededBatches(_Drawing("python"), list)
    batches[seeding.BatchKey((1, 2), 5)]
    assert batches._guards is not None and batches._guards[0].learned and batches._guards[0].seeded
    assert pickle.loads(pickle.dumps(batches))._guards is None
