"""Which config changes a continued run (`resume`, or `run` on an existing run folder) allows.

Changes that alter what the run computes (seed, task keys, batch layout) are refused unless named
with `--allow-change KEY`; the others (longer max_steps, checkpoint cadence, logging, hardware)
pass. Decided from the config files alone, so every DDP rank reaches the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from resilient_train.config.schema import RunConfig
from resilient_train.errors import UsageError

# trainer keys that change how the run is computed on this machine, not what it computes: the
# resume's exactness line labels their effect (world size, device, precision), or they have none
# on the result (cadences, logging, worker count: batches are seeded from their position alone,
# validation leaves the training RNG streams where they were)
_FREE_TRAINER_KEYS = frozenset({
    "max_steps", "accelerator", "strategy", "precision", "gradient_checkpointing", "checkpoint_modules",
    "val_every_n_steps", "val_batches", "log_every_n_steps", "num_workers", "progress_bar", "micro_batch_size",
    "max_epochs", "gpu_stats",
})
# keys that set the batch layout: free while `trainer.global_batch_size` is set and unchanged (the
# trainer then derives accumulation so the samples per optimizer step stay the same)
_LAYOUT_KEYS = frozenset({"batch_size", "accumulate_grad_batches", "devices", "num_nodes"})
_ABSENT = "<unset>"


@dataclass(frozen=True)
class ConfigChange:
    """One key whose value differs between a run's stored config and the one it continues with.

    `guarded` changes alter what the run computes (seed, task keys, batch layout): a run refuses
    them unless the user names each with `--allow-change KEY`, and then labels the resume
    approximate. The others (longer max_steps, checkpoint cadence, logging, hardware) pass.
    """

    key: str
    old: Any
    new: Any
    guarded: bool

    def to_json(self) -> dict[str, Any]:
        """The record kept in sessions.json."""
        return {"key": self.key, "old": self.old, "new": self.new, "guarded": self.guarded}


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """Dotted key -> value for every leaf of nested mappings (lists are leaves; an empty mapping has none)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _guarded(key: str, stored: RunConfig, new: RunConfig) -> bool:
    if key == "seed" or key.startswith("task."):
        return True
    section, _, name = key.partition(".")
    if section in ("checkpoint", "logging"):
        return False
    if section == "trainer" and name in _FREE_TRAINER_KEYS:
        return False
    if section == "trainer" and name in _LAYOUT_KEYS:
        kept = stored.trainer.global_batch_size
        return kept is None or new.trainer.global_batch_size != kept
    return True  # trainer.global_batch_size, gradient_clip_val, and any key not known to be harmless


def config_changes(stored: RunConfig, new: RunConfig) -> list[ConfigChange]:
    """Every key (run_dir aside) whose value differs, in key order, each classified."""
    before = _leaves(stored.to_container(), "")
    after = _leaves(new.to_container(), "")
    changes = []
    for key in sorted(set(before) | set(after)):
        if key == "run_dir":
            continue
        old, now = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if old != now or type(old) is not type(now):  # True == 1, but a flag is not a count
            changes.append(ConfigChange(key, old, now, _guarded(key, stored, new)))
    return changes


def _allowed(key: str, allow: Iterable[str]) -> bool:
    """`--allow-change task` allows every `task.*` key; `--allow-change task.lr` that one."""
    return any(key == a or key.startswith(a.rstrip(".") + ".") for a in allow if a)


def check_config_changes(stored: RunConfig, new: RunConfig, allow: Iterable[str] = ()) -> list[ConfigChange]:
    """The changes a continued run makes to its stored config; UsageError (exit 2) for guarded
    changes not named in `allow`, in one line naming the keys and the flag that lets them through.

    Computed from the config files alone, so every DDP rank reaches the same decision.
    """
    allow = [str(a).strip() for a in allow]
    changes = config_changes(stored, new)
    refused = [c for c in changes if c.guarded and not _allowed(c.key, allow)]
    if refused:
        what = ", ".join(f"{c.key} ({_short(c.old)} -> {_short(c.new)})" for c in refused)
        flags = " ".join(f"--allow-change {c.key}" for c in refused)
        raise UsageError(
            f"changing {what} would make this another run, not a continuation of the stored one; pass {flags} "
            "to continue anyway (the resume is then labelled approximate), or start a new run with another --run-dir"
        )
    return changes


def _short(value: Any) -> str:
    text = value if value == _ABSENT else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
