"""What a resume on other hardware keeps exact, and what changed since the checkpoint was written.

Three levels, reported in one line on every resume:
  bit-exact     same world size, device kind, precision and batch: the run continues as if never
                interrupted (the tests check this bit for bit on CPU);
  sample-exact  the data order and the samples per optimizer step are the same (the sampler's
                cursor is global), but arithmetic differs: another world size, device or precision;
  approximate   the samples per optimizer step changed (another world size without
                `trainer.global_batch_size`), so the optimisation itself differs.
"""

from __future__ import annotations

from typing import Any

ENV_KEYS = ("python", "torch", "lightning_fabric", "resilient_train", "cuda", "cudnn", "host")


def device_kind(environment: Any) -> str:
    """"2x NVIDIA L4" or "CPU"; tolerant of a damaged or foreign environment record."""
    gpus = environment.get("gpus") if isinstance(environment, dict) else None
    if not isinstance(gpus, list) or not gpus:
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
    if saved.get("global_batch") not in (None, now["global_batch"]):
        reasons.append(f"samples per optimizer step {saved.get('global_batch')} -> {now['global_batch']}")
        return "approximate", reasons
    return ("bit-exact" if not reasons else "sample-exact"), reasons


def environment_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field, then, now) for every fingerprint field that differs."""
    changes = []
    for key in ENV_KEYS:
        if saved.get(key) != now.get(key):
            changes.append((key, str(saved.get(key)), str(now.get(key))))
    if device_kind(saved) != device_kind(now):
        changes.append(("gpus", device_kind(saved), device_kind(now)))
    return changes


def resume_report(manifest: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The lines printed when a run resumes: exactness, then a small table of what changed."""
    level, reasons = exactness(manifest, now)
    lines = [f"resume is {level}" + (f" ({'; '.join(reasons)})" if reasons else " (same world size, device, precision and batch)")]
    changes = environment_changes(manifest.get("environment", {}), now["environment"])
    if changes:
        width = max(len(key) for key, _, _ in changes)
        lines.append("environment changed since the checkpoint was written:")
        lines += [f"  {key:<{width}}  {old} -> {new}" for key, old, new in changes]
    return lines
