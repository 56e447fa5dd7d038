"""Background threads that watch a running stage: its peak memory, and whether it still makes progress.

Both sample this process and its child processes (the bench and the evaluators compile DeepSparse in
a child). A stage that uses next to no CPU time for HARNESS_STALL_MINUTES minutes (default 10; 0 turns
the warning off) says so on stderr, and again every as many minutes while it stays stalled: a
deadlocked stage would otherwise hang silently.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from typing import Callable

import psutil
from tqdm import tqdm

from harness.errors import HarnessError

STALL_MINUTES_VARIABLE = "HARNESS_STALL_MINUTES"
DEFAULT_STALL_MINUTES = 10.0
# Below a tenth of one core a stage is waiting, not computing: an idle stage still spends ~3% of one
# core in the memory sampler, tqdm's monitor and library helper threads.
IDLE_CPU_SHARE = 0.1


class BackgroundSampler:
    """Calls `_measure` every `interval_s` seconds in a daemon thread while the `with` block runs."""

    def __init__(self, interval_s: float):
        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _measure(self) -> None:
        raise NotImplementedError

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._measure()

    def _children_total(self, measure: Callable[[psutil.Process], float]) -> float:
        """`measure` summed over the live child processes (and theirs); one that ends meanwhile counts 0."""
        total = 0
        for child in self._process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += measure(child)
        return total

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class PeakMemory(BackgroundSampler):
    """Samples RSS: `peak_mb` is this process's maximum, `children_peak_mb` the maximum of its child
    processes together (the bench compiles and times DeepSparse in a child)."""

    def __init__(self, interval_s: float = 0.05):
        super().__init__(interval_s)
        self.peak_bytes = self._process.memory_info().rss
        self.children_peak_bytes = 0

    def _measure(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
        self.children_peak_bytes = max(self.children_peak_bytes, self._children_total(_rss))

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._measure()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

    @property
    def children_peak_mb(self) -> float:
        return round(self.children_peak_bytes / 2**20, 1)


class StallWatch(BackgroundSampler):
    """Says on stderr when `what` has used less than IDLE_CPU_SHARE of one core, in this process and its
    children together, for `stall_s` seconds; at most once every `stall_s` seconds."""

    def __init__(self, what: str, stall_s: float):
        super().__init__(stall_s / 10)
        self._what = what
        self._stall_s = stall_s
        self._progress_at = self._reported_at = time.monotonic()
        self._progress_cpu = self._cpu_seconds()

    def _cpu_seconds(self) -> float:
        return _cpu_seconds(self._process) + self._children_total(_cpu_seconds)

    def _measure(self) -> None:
        # This sampling thread's own CPU time (listing the child processes) is not the stage's progress.
        now, cpu = time.monotonic(), self._cpu_seconds() - time.thread_time()
        idle = now - self._progress_at
        if cpu - self._progress_cpu > IDLE_CPU_SHARE * idle:
            self._progress_at, self._progress_cpu = now, cpu
            return
        self._progress_cpu = min(self._progress_cpu, cpu)  # an ended child's time is gone until it is reaped
        if idle >= self._stall_s and now - self._reported_at >= self._stall_s:
            self._reported_at = now
            tqdm.write(f"{self._what}: no progress for {_duration(idle)} (next to no CPU time used by it or its "
                       f"child processes); it may be deadlocked - Ctrl-C stops it and keeps finished work",
                       file=sys.stderr)


def stall_watch(what: str) -> StallWatch | contextlib.nullcontext:
    """A StallWatch for `what` with the HARNESS_STALL_MINUTES threshold (nothing when it is 0)."""
    value = os.environ.get(STALL_MINUTES_VARIABLE, str(DEFAULT_STALL_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        minutes = math.nan
    if not (math.isfinite(minutes) and minutes >= 0):
        raise HarnessError(f"{STALL_MINUTES_VARIABLE} must be a number of minutes (0 turns the stall warning "
                           f"off), got {value!r}")
    return StallWatch(what, minutes * 60) if minutes else contextlib.nullcontext()


def _rss(process: psutil.Process) -> int:
    return process.memory_info().rss


def _cpu_seconds(process: psutil.Process) -> float:
    """CPU time of `process` and of its child processes that ended and were waited for."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.1f} s"
