"""What a resume on other hardware keeps exact, and what changed since the checkpoint was written.

Three levels, reported in one line on every resume:
  bit-exact     same world size, device kind, precision and batch: the run continues as if never
                interrupted (the tests check this bit for bit on CPU);
  sample-exact  the data order and the samples per optimizer step are the same (the sampler's
                cursor is global), but arithmetic differs: another world size, device, precision
                or device micro-batch (`trainer.micro_batch_size`; always with `auto`, whose
                chunk size follows free memory);
  approximate   the samples per optimizer step changed (another world size without
                `trainer.global_batch_size`), or the config changed in keys that alter what the
                run computes (seed, task keys, batch layout: let through with --allow-change),
                so the optimisation itself differs; or an iterable train_data's position is found
                by skipping consumed batches (exact only if it repeats its order: not provable
                here), or its state loses something (a Hugging Face shuffle buffer).

A world-size change also changes the RNG streams: each rank saves its own (torch CPU and CUDA,
Python, NumPy: dropout and any random op in the step), so a rank that no longer exists has its
stream dropped and a new rank starts a fresh one. The report says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

ENV_KEYS = ("python", "torch", "lightning_fabric", "resilient_train", "cuda", "cudnn", "host")


def device_kind(environment: Any) -> str:
    """"2x NVIDIA L4" or "CPU"; tolerant of a damaged or foreign environment record."""
    gpus = environment.get("gpus") if isinstance(environment, dict) else None
    if not isinstance(gpus, list) or not gpus or environment.get("device") == "cpu":  # trained on the CPU beside its GPUs
        return "CPU"
    names = sorted({str(g.get("name", "?")) if isinstance(g, dict) else "?" for g in gpus})
    return f"{len(gpus)}x {', '.join(names)}"


def exactness(saved: dict[str, Any], now: dict[str, Any]) -> tuple[str, list[str]]:
    """(`bit-exact` | `sample-exact` | `approximate`, reasons) comparing manifest fields with now."""
    reasons = []
    if saved.get("world_size") != now["world_size"]:
        reasons.append(f"world size {saved.get('world_size')} -> {now['world_size']}")
    if saved.get("precision") != now["precision"]:
        reasons.append(f"precision {saved.get('precision')} -> {now['precision']}")
    saved_device, now_device = device_kind(saved.get("environment", {})), device_kind(now["environment"])
    if saved_device != now_device:
        reasons.append(f"device {saved_device} -> {now_device}")
    if saved.get("micro_batch") not in (None, now["micro_batch"]):
        reasons.append(f"per-device batch {saved.get('micro_batch')} -> {now['micro_batch']}")
    saved_chunk, now_chunk = saved.get("device_micro_batch"), now.get("device_micro_batch")
    if saved_chunk != now_chunk:  # same samples, another summation order of the gradient
        reasons.append(f"device micro-batch {saved_chunk or saved.get('micro_batch')} -> {now_chunk or now['micro_batch']}")
    if now.get("micro_batch_auto"):
        reasons.append("trainer.micro_batch_size=auto (the device micro-batch follows free memory)")
    approximate = False
    if saved.get("global_batch") not in (None, now["global_batch"]):
        reasons.append(f"samples per optimizer step {saved.get('global_batch')} -> {now['global_batch']}")
        approximate = True
    saved_order, now_order = saved.get("order"), now.get("order")
    if saved_order is not None and now_order is not None and saved_order != now_order:
        reasons.append(f"data order {saved_order} -> {now_order}")  # shuffle changed in the task
        approximate = True
    if "drop_last" in saved and "drop_last" in now and saved["drop_last"] != now["drop_last"]:
        reasons.append(f"drop_last {saved['drop_last']} -> {now['drop_last']}")
        approximate = True
    if now.get("order") == "iterable" and saved_order == "iterable":  # data/iterable.py: how the position is found
        if now.get("data_position") == "skip" or saved.get("data_position") == "skip":
            reasons.append("train_data has no state_dict(): each rank skips the batches it had consumed, which repeats "
                           "the run only if train_data yields the same items in the same order on every pass")
            approximate = True
        if now.get("data_caveat"):
            reasons.append(str(now["data_caveat"]))
            approximate = True
    changed = list(now.get("config_changes") or [])
    if changed:
        reasons.append(f"config changed with --allow-change: {', '.join(changed)}")
        approximate = True
    if approximate:
        return "approximate", reasons
    return ("bit-exact" if not reasons else "sample-exact"), reasons


def rng_streams(saved_world: Any, now_world: int) -> Optional[str]:
    """What a world-size change does to the per-rank RNG streams, or None when nothing does."""
    if not isinstance(saved_world, int) or isinstance(saved_world, bool) or saved_world < 1 or saved_world == now_world:
        return None
    if now_world < saved_world:
        ranks = list(range(now_world, saved_world))
        whose = f"rank {ranks[0]}'s RNG stream is" if len(ranks) == 1 else f"the RNG streams of ranks {_span(ranks)} are"
        kept = "rank 0 continues its own" if now_world == 1 else f"ranks {_span(list(range(now_world)))} continue their own"
        where = "that rank" if len(ranks) == 1 else "those ranks"
        return f"RNG: {whose} dropped (dropout and other random ops on {where}); {kept}"
    ranks = list(range(saved_world, now_world))
    who = f"rank {ranks[0]} starts a fresh RNG stream" if len(ranks) == 1 else f"ranks {_span(ranks)} start fresh RNG streams"
    kept = "rank 0 continues its own" if saved_world == 1 else f"ranks {_span(list(range(saved_world)))} continue their own"
    return f"RNG: {who} (none was saved for {'it' if len(ranks) == 1 else 'them'}); {kept}"


def _span(ranks: list[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 2 else ", ".join(str(r) for r in ranks)


def environment_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field, then, now) for every fingerprint field that differs."""
    changes = []
    for key in ENV_KEYS:
        if saved.get(key) != now.get(key):
            changes.append((key, str(saved.get(key)), str(now.get(key))))
    if device_kind(saved) != device_kind(now):
        changes.append(("gpus", device_kind(saved), device_kind(now)))
    return changes


@dataclass(frozen=True)
class ResumeAssessment:
    """What a resume can promise, as a record: `sessions.json` keeps it, tools read it (never log text)."""

    level: str  # bit-exact | sample-exact | approximate
    reasons: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what the trainer prints

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "reasons": list(self.reasons)}


def assess(manifest: dict[str, Any], now: dict[str, Any]) -> ResumeAssessment:
    """The exactness of resuming from `manifest` here and now, with the lines that report it."""
    level, reasons = exactness(manifest, now)
    return ResumeAssessment(level, reasons, _report_lines(manifest, now, level, reasons))


def resume_report(manifest: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The lines printed when a run resumes: exactness, then a small table of what changed."""
    return assess(manifest, now).lines


def _report_lines(manifest: dict[str, Any], now: dict[str, Any], level: str, reasons: list[str]) -> list[str]:
    lines = [f"resume is {level}" + (f" ({'; '.join(reasons)})" if reasons else " (same world size, device, precision and batch)")]
    streams = rng_streams(manifest.get("world_size"), now["world_size"])
    if streams:
        lines.append(streams)
    changes = environment_changes(manifest.get("environment", {}), now["environment"])
    if changes:
        width = max(len(key) for key, _, _ in changes)
        lines.append("environment changed since the checkpoint was written:")
        lines += [f"  {key:<{width}}  {old} -> {new}" for key, old, new in changes]
    return lines
