"""Peak memory of a training run: CUDA max allocated, or the process's peak RSS on CPU.

On Linux, writing "5" to /proc/self/clear_refs resets VmHWM (the RSS high-water mark), so a run's peak can be
measured on its own rather than as the whole process lifetime's.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import torch


def _read_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    return _read_status("VmRSS")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    hwm = _read_status("VmHWM")
    if hwm is not None:
        return hwm, "rss_peak"
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "rss_peak_process_lifetime"
