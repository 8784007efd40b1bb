"""Peak memory of a stretch of work, above a baseline taken before it.

CUDA: exact, from the caching allocator (`torch.cuda.max_memory_allocated`).
CPU: an approximation from the process's resident set. The kernel's peak-RSS mark is reset through
`/proc/self/clear_refs` (Linux) after handing freed heap back with glibc's `malloc_trim`, so the figure is the
growth of resident memory during the measured work. It includes allocator slack and anything else the process
touches, and misses memory that was resident before and reused, so compare it between runs of one process,
not across machines. (tracemalloc would see none of it: torch allocates tensors outside Python's allocator.)
Where neither works, peaks are None and only the exact cache sizes remain.
"""

from __future__ import annotations

import ctypes
import gc
import re

import torch


class CudaMeter:
    method = "cuda.max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        """Take the baseline and reset the peak."""
        torch.cuda.synchronize(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def restart_peak(self) -> None:
        """Reset the peak, keeping the baseline (to measure a later phase against the same start)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.baseline


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap stays resident, the figures only get coarser
        pass


class RSSMeter:
    method = "rss_peak (approximate)"

    def __init__(self):
        self.baseline = 0
        self.works = self._reset_peak()

    @staticmethod
    def _reset_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # "5" resets VmHWM to the current RSS (proc(5))
            _status_kib("VmHWM")
            return True
        except (OSError, AttributeError):
            return False

    def start(self) -> None:
        _trim()
        self._reset_peak()
        self.baseline = _status_kib("VmRSS") * 1024 if self.works else 0

    def restart_peak(self) -> None:
        _trim()
        self._reset_peak()

    def peak(self) -> int | None:
        if not self.works:
            return None
        return max(0, _status_kib("VmHWM") * 1024 - self.baseline)


def meter_for(device: torch.device):
    return CudaMeter(device) if device.type == "cuda" else RSSMeter()


def free_memory(device: torch.device) -> None:
    """Hand back what earlier work left: collect reference cycles (an out-of-memory traceback's frames hold the
    failed attempt's tensors), then, on CUDA, return the allocator's cached blocks so the next attempt starts from
    an unfragmented pool."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cache_bytes(cache) -> int:
    """Bytes held by a generation cache: key/value tensors of softmax layers, state tensors of converted ones."""
    if hasattr(cache, "state_bytes"):
        return sum(cache.state_bytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
