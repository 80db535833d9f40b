"""Device statistics per log window: peak memory, GPU utilisation and temperature, process memory.

Read once per log window, never per step: `torch.cuda.max_memory_allocated` and NVML queries do
not synchronise the GPU, and resetting the peak counters at each read makes every value the peak
of its own window (what a user needs to pick a micro-batch, unlike a run-long maximum). NVML comes
from `nvidia-ml-py` when it is installed (`pip install 'resilient_train[gpu]'`); without it the
CUDA allocator's figures are still there. On CPU the process's resident memory is reported.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

log = logging.getLogger(__name__)

GB = 1024**3


class DeviceStats:
    """Reads the statistics of one device; `read()` returns them and starts a new window."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.index = (device.index if device.index is not None else torch.cuda.current_device()) if self.cuda else None
        self.nvml = False
        if self.cuda:
            self.nvml = _nvml_works(self.index)
            torch.cuda.reset_peak_memory_stats(self.index)

    def read(self) -> dict[str, float]:
        """The window's statistics (GB, percent, degrees C), then reset the peak counters."""
        stats: dict[str, float] = {}
        if self.cuda:
            stats["gpu_mem_peak_gb"] = round(torch.cuda.max_memory_allocated(self.index) / GB, 3)
            stats["gpu_mem_reserved_peak_gb"] = round(torch.cuda.max_memory_reserved(self.index) / GB, 3)
            torch.cuda.reset_peak_memory_stats(self.index)
            stats.update(self._nvml_stats())
        rss = process_memory_bytes()
        if rss is not None:
            stats["cpu_mem_gb"] = round(rss / GB, 3)
        return stats

    def _nvml_stats(self) -> dict[str, float]:
        """Utilisation, used memory and temperature through torch's NVML wrappers, which map the
        torch device index to NVML's under CUDA_VISIBLE_DEVICES."""
        if not self.nvml:
            return {}
        try:
            free, total = torch.cuda.mem_get_info(self.index)
            return {
                "gpu_util": float(torch.cuda.utilization(self.index)),
                "gpu_mem_used_gb": round((total - free) / GB, 3),
                "gpu_temp_c": float(torch.cuda.temperature(self.index)),
            }
        except Exception as exc:  # noqa: BLE001 - a driver hiccup costs one row's figures, not the run
            log.debug("NVML query failed: %s", exc)
            return {}


def _nvml_works(index: Optional[int]) -> bool:
    """Whether NVML answers for this device (nvidia-ml-py installed, driver reachable)."""
    try:
        import pynvml  # noqa: F401 - nvidia-ml-py; torch.cuda.utilization needs it

        torch.cuda.utilization(index)
        return True
    except Exception as exc:  # noqa: BLE001 - without NVML the allocator's figures remain
        log.debug("NVML unavailable: %s", exc)
        return False


def process_memory_bytes() -> Optional[int]:
    """Resident memory of this process now (Linux: /proc; elsewhere psutil when installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)
