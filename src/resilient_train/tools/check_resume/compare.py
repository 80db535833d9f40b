"""The one comparison of two training states: the first tensor that differs, and by how much.

`check-resume` compares the straight and the interrupted run's final checkpoints with it, and the
tests compare weights with it too (tests/helpers.py), so the tool and the tests agree on what
"the same" means: same keys, shapes and dtypes, and equal values (NaN at the same places counts as
equal for the tool: a run that diverged the same way resumed exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, TextIO

from resilient_train.errors import NotFoundError


@dataclass
class Difference:
    where: str  # "model weight 0.bias", "optimizer state.0.exp_avg", "RNG stream torch (rank 0)"
    detail: str  # "max abs diff 3.1e-03", "7 (straight) vs 9 (interrupted)"
    max_abs: Optional[float] = None


@dataclass
class Section:
    name: str
    summary: str
    differences: list[Difference] = field(default_factory=list)


@dataclass
class FinalState:
    """What the check compares from one run: its last checkpoint and its logged metrics."""

    step: int
    model: dict[str, Any]
    train: dict[str, Any]
    rng: dict[int, Any]  # rank -> that rank's RNG states
    manifest: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[tuple[str, int], float]  # (column, step) -> value, the newest session's


def read_final_state(run_dir: str) -> FinalState:
    """The newest valid checkpoint of `run_dir`, decoded by the library's own readers."""
    from omegaconf import OmegaConf

    from resilient_train.checkpoint.manager import CheckpointManager
    from resilient_train.config import load_run_yaml
    from resilient_train.storage import Storage

    run = Storage(run_dir)
    loaded = CheckpointManager(run).load_latest()
    if loaded is None:
        raise NotFoundError(f"no valid checkpoint in {run_dir}")
    snapshot = loaded.snapshot(0)
    world = loaded.manifest.get("world_size", 1)
    rng = {0: snapshot.rng}
    for rank in range(1, world if isinstance(world, int) else 1):
        rng[rank] = loaded.snapshot(rank).rng
    stored = OmegaConf.to_container(load_run_yaml(run.read_bytes("run.yaml").decode("utf-8")), resolve=True)
    config = {str(k): v for k, v in stored.items()} if isinstance(stored, dict) else {}
    return FinalState(step=loaded.info.step, model=snapshot.model, train=snapshot.train, rng=rng,
                      manifest=loaded.manifest, config=config, metrics=_metrics(run))


def _compared(column: str) -> bool:
    """The columns a resume must reproduce: the losses and every metric training_step returns (and
    their val_ averages); not bookkeeping, timing, the learning rate's display or device statistics."""
    return column not in ("session", "step", "epoch", "time", "lr", "samples_per_sec") and \
        not column.startswith(("gpu_", "cpu_"))


def _metrics(run: Any) -> dict[tuple[str, int], float]:
    from resilient_train.run.metrics import read_rows

    try:
        rows = read_rows(run)
    except FileNotFoundError:
        return {}
    values: dict[tuple[str, int], float] = {}
    for row in rows:  # file order: a later session's row for a step replaces an earlier one's
        for column in (name for name in row if _compared(name)):
            text = row.get(column) or ""
            try:
                values[(column, row["step"])] = float(text)
            except ValueError:
                continue
    return values


# -- tensors ------------------------------------------------------------------------------------


def _same_tensor(a: Any, b: Any, nan_equal: bool) -> bool:
    import torch

    if torch.equal(a, b):
        return True
    if not nan_equal or not a.is_floating_point():
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0))


def tensor_difference(a: Any, b: Any, nan_equal: bool = True) -> Optional[tuple[str, Optional[float]]]:
    """How tensor `a` (straight) differs from `b` (interrupted): (detail, max abs diff), None when the same.

    Same means same shape, same dtype and torch.equal values; with `nan_equal` NaN at the same
    places counts as equal too (torch.equal says NaN != NaN).
    """
    import torch

    if tuple(a.shape) != tuple(b.shape):
        return f"shape {list(a.shape)} (straight) vs {list(b.shape)} (interrupted)", None
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} (straight) vs {b.dtype} (interrupted)", None
    if _same_tensor(a, b, nan_equal):
        return None
    if a.is_complex():
        diff = (a - b).abs()
    else:
        diff = (a.to(torch.float64) - b.to(torch.float64)).abs()
    largest = float(diff.nan_to_num(nan=math.inf).max()) if diff.numel() else 0.0
    return f"max abs diff {largest:.3g}", largest


def weight_difference(a: Mapping[str, Any], b: Mapping[str, Any], nan_equal: bool = True) -> Optional[Difference]:
    """The first tensor of `a` (in its key order) that differs from `b`'s, by how much; None when all match.

    Keys present on one side only are a difference of their own, reported first.
    """
    only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
    if only_a or only_b:
        return Difference("keys", f"only in the first {only_a[:3]}, only in the second {only_b[:3]}")
    for key in a:
        found = tensor_difference(a[key], b[key], nan_equal)
        if found is not None:
            return Difference(str(key), *found)
    return None


def _short(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(a: Any, b: Any, where: str) -> Iterator[Difference]:
    """Every place where `a` (straight) and `b` (interrupted) differ, tensors bit for bit."""
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        found = tensor_difference(a, b)
        if found is not None:
            yield Difference(where, *found)
    elif isinstance(a, dict) and isinstance(b, dict):
        only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
        if only_a or only_b:
            yield Difference(where, f"keys only in the straight run {only_a[:3]}, only in the interrupted run {only_b[:3]}")
        for key in a:
            if key in b:
                yield from differences(a[key], b[key], f"{where}.{key}" if where else str(key))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            yield Difference(where, f"{len(a)} items (straight) vs {len(b)} (interrupted)")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from differences(x, y, f"{where}[{i}]")
    elif type(a) is not type(b) or a != b:
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return
        numeric = isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
        yield Difference(where, f"{_short(a)} (straight) vs {_short(b)} (interrupted)",
                         abs(float(a) - float(b)) if numeric else None)


# -- the sections of a check --------------------------------------------------------------------


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two run.yaml files (run_dir aside: it always does)."""
    fa, fb = _flat(a), _flat(b)
    return sorted(k for k in set(fa) | set(fb) if k != "run_dir" and fa.get(k) != fb.get(k))


def _loss_section(a: FinalState, b: FinalState) -> Section:
    """Losses at the steps both runs logged; a value only one run logged is a note, not a difference.

    The metrics of the steps before a checkpoint are flushed right after it commits: a kill in
    between loses them, and the resume, which starts at that checkpoint, does not log them again.
    """
    common = sorted(set(a.metrics) & set(b.metrics), key=lambda key: (key[1], key[0]))
    diffs = []
    for column, step in common:
        x, y = a.metrics[(column, step)], b.metrics[(column, step)]
        if x != y and not (math.isnan(x) and math.isnan(y)):
            diffs.append(Difference(f"{column} at step {step}", f"{x!r} (straight) vs {y!r} (interrupted)", abs(x - y)))
    only = sorted(set(a.metrics) ^ set(b.metrics), key=lambda key: (key[1], key[0]))
    note = f"; {len(only)} value(s) logged by one run only (steps {only[0][1]}-{only[-1][1]})" if only else ""
    if not common:
        return Section("losses", "none logged by both runs" + note)
    if not diffs:
        return Section("losses", f"same at {len(common)} logged value(s){note}")
    largest = max(d.max_abs or 0.0 for d in diffs)
    steps = sorted({int(d.where.rsplit(" ", 1)[1]) for d in diffs})
    return Section("losses", f"differ from step {steps[0]} on ({len(steps)} step(s), max abs diff {largest:.3g}){note}", diffs)


def _tensor_section(name: str, what: str, a: dict[str, Any], b: dict[str, Any], where: str = "") -> Section:
    diffs = list(differences(a, b, where))
    if not diffs:
        return Section(name, f"same ({len(a)} {what})")
    largest = max((d.max_abs for d in diffs if d.max_abs is not None), default=None)
    tail = f", max abs diff {largest:.3g}" if largest is not None else ""
    return Section(name, f"{len(diffs)} difference(s){tail}", diffs)


_POSITION = ("step", "epoch", "cursor", "samples_seen")


def _split_progress(train: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the data position, everything else the trainer keeps besides optimizer and progress)."""
    progress = train.get("progress")
    progress = progress if isinstance(progress, dict) else {}
    position = {k: progress.get(k) for k in _POSITION}
    other = {k: v for k, v in train.items() if k not in ("optimizer", "progress")}
    other.update({f"progress.{k}": v for k, v in progress.items() if k not in _POSITION})
    return position, other


def _rng_section(a: FinalState, b: FinalState) -> Section:
    diffs, names = [], []
    for rank in sorted(set(a.rng) | set(b.rng)):
        ra, rb = a.rng.get(rank) or {}, b.rng.get(rank) or {}
        for stream in [*ra, *(s for s in rb if s not in ra)]:
            if stream not in names:
                names.append(stream)
            if next(differences(ra.get(stream), rb.get(stream), stream), None) is not None:
                where = f"RNG stream {stream}" + (f" (rank {rank})" if len(a.rng) > 1 else "")
                diffs.append(Difference(where, "in another state"))
    if diffs:
        return Section("RNG streams", f"{len(diffs)} differ", diffs)
    return Section("RNG streams", f"same ({', '.join(names)})" if names else "none saved")


def compare(a: FinalState, b: FinalState) -> list[Section]:
    """Config, data position, losses, weights, optimizer, other state and RNG streams, in that order."""
    sections = []
    changed = config_changes(a.config, b.config)
    sections.append(Section("config", "same" if not changed else f"{len(changed)} key(s) differ",
                            [Difference(f"config key {key}", "differs") for key in changed]))
    (position_a, other_a), (position_b, other_b) = _split_progress(a.train), _split_progress(b.train)
    position = list(differences(position_a, position_b, "progress"))
    summary = (f"same (step {position_a['step']}, epoch {position_a['epoch']}, cursor {position_a['cursor']}, "
               f"{position_a['samples_seen']} samples seen)") if not position else f"{len(position)} difference(s)"
    sections.append(Section("data position", summary, position))
    sections.append(_loss_section(a, b))
    sections.append(_tensor_section("model weights", "tensors", {f"model weight {k}": v for k, v in a.model.items()},
                                    {f"model weight {k}": v for k, v in b.model.items()}))
    optimizer_a, optimizer_b = a.train.get("optimizer") or {}, b.train.get("optimizer") or {}
    section = _tensor_section("optimizer", "parts", optimizer_a, optimizer_b, "optimizer")
    if not section.differences and isinstance(optimizer_a, dict):
        section.summary = f"same ({len(optimizer_a.get('state') or {})} parameter states, param groups)"
    sections.append(section)
    sections.append(_tensor_section("other state", "parts: " + ", ".join(other_a) if other_a else "parts", other_a, other_b))
    sections.append(_rng_section(a, b))
    return sections


_VERDICT_ORDER = ("model weights", "optimizer", "other state", "RNG streams", "data position", "losses", "config")


def first_difference(sections: list[Section]) -> Optional[Difference]:
    """The first tensor that differs (weights before optimizer state before the rest)."""
    by_name = {s.name: s for s in sections}
    for name in _VERDICT_ORDER:
        section = by_name.get(name)
        if section is not None and section.differences:
            return section.differences[0]
    return None


def report(sections: list[Section], out: TextIO) -> None:
    """The comparison table: one line per section, its first three differences under it."""
    width = max(len(s.name) for s in sections)
    out.write("compare (straight vs interrupted):\n")
    for section in sections:
        out.write(f"  {section.name:<{width}}  {section.summary}\n")
        for diff in section.differences[:3]:
            out.write(f"  {'':<{width}}    {diff.where}: {diff.detail}\n")
        if len(section.differences) > 3:
            out.write(f"  {'':<{width}}    ... and {len(section.differences) - 3} more\n")
