"""Measurement helpers shared by the benchmarks and the demo.

* ``time_interleaved`` runs competing variants round-robin, so a noisy shared machine slows them alike, and
  reports the median with the interquartile range. On a GPU each sample is timed with CUDA events around
  enough back-to-back calls to last about a millisecond, so the host's launch and synchronisation overhead
  (tens of microseconds) does not pull the ratios of fast kernels towards 1.
* ``PeakMemory`` reports the peak bytes above a baseline over a block: the CUDA allocator's statistics on a
  GPU; on the CPU the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs), with
  glibc told to hand freed blocks straight back so the resident set follows live memory. CPU figures count
  everything the process touches (the kernels' workspaces too), which is what a user's machine sees.
"""

import ctypes
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    median: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.median * 1e3:.2f} ms [{self.q1 * 1e3:.2f}, {self.q3 * 1e3:.2f}]"


def _cuda_seconds(fn: Callable[[], None], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def time_interleaved(fns: Dict[str, Callable[[], None]], *, repeats: int = 7, warmup: int = 1, device="cpu") -> Dict[str, Timing]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    # calls per sample on a GPU: enough for about 1 ms of device time (one call for anything slower)
    calls = {name: max(1, min(1000, round(1e-3 / max(_cuda_seconds(fn, 1), 1e-7)))) for name, fn in fns.items()} if cuda else {}
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                samples[name].append(_cuda_seconds(fn, calls[name]))
                continue
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        out[name] = Timing(statistics.median(s), q[0], q[2])
    return out


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


_malloc_tuned = False


def _tune_malloc() -> None:
    global _malloc_tuned
    if _malloc_tuned:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: blocks from 64 KiB up are mapped, and unmapped on free
        libc.mallopt(-1, 1 << 17)  # M_TRIM_THRESHOLD: give the heap top back early
    except OSError:
        pass
    _malloc_tuned = True


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak``: peak bytes above the level at entry."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _tune_malloc()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self._start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.peak = _status_bytes("VmHWM") - self._start
        return False


def prepare_cpu_memory_measurement() -> None:
    """Call before allocating what is to be measured: fixes glibc's thresholds so the resident set follows
    live memory from then on."""
    _tune_malloc()
