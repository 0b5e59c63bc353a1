"""Process-level memory: hygiene for CPU training, and the kernel's resident-set counters that training logs and
the benchmarks report.

glibc raises its mmap threshold each time a large block is freed, so after a few steps most activation tensors come
from the heap and their memory is not returned between steps; on an SD-1.5-size UNet this fragmentation added about
0.8 GiB to the peak RSS (measured: 3.80 -> 3.01 GiB, benchmarks/train_memory.py). Pinning the threshold makes every
tensor above it its own mapping, returned to the OS as soon as it is freed, at a price in time: each fresh mapping's
pages are zeroed by the kernel. Measured later on idle cores (TuneQDM W4 on the SD-1.5-size UNet, 2 timed steps):
pinned 11.4 s/step at 2.98 GiB, left to glibc 8.4 s at 3.30 GiB (with gradient checkpointing 16.0 s at 1.42 GiB
against 12.1 s at 1.94 GiB). Training pins it unless glibc's own ``MALLOC_MMAP_THRESHOLD_`` is set, which is how a
user chooses speed (``MALLOC_MMAP_THRESHOLD_=33554432``, glibc's largest dynamic value); sampling leaves it alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's own setting; when the user set it, it wins


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold (no effect and False on other C libraries or platforms, or where the user set
    ``MALLOC_MMAP_THRESHOLD_``)."""
    if not sys.platform.startswith("linux") or MMAP_THRESHOLD_ENV in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


def proc_status_bytes(field: str) -> int | None:
    """A size from ``/proc/self/status`` in bytes (``VmHWM``: peak resident set, ``VmRSS``: current), or None where
    the file or the field is missing (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Start the kernel's peak-RSS counter (VmHWM) over (Linux: ``5 > /proc/self/clear_refs``; elsewhere nothing)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class PhaseMemory:
    """The peak memory of each phase of a command (loading, encoding, quantizing, the loop, saving) and of the whole
    process, measured without ever resetting the kernel's peak counter: a reset (``reset_peak_rss``) would hide every
    earlier phase from ``/usr/bin/time``, from a parent's ``wait4`` and from this record alike.

    On CPU a phase's peak is exact when the process reached a new high-water mark (VmHWM) during it; otherwise it is
    the largest resident set a sampler thread saw every ``interval`` seconds (a lower bound: a spike shorter than the
    interval can be missed). The whole-process peak is VmHWM itself. On CUDA each phase has the allocator's peak
    (``max_memory_allocated``, reset per phase: that counter is the process's own) and the whole is their maximum;
    the process's CPU peak is recorded beside it. Where a lazy reader's file pages count in the resident set
    (``RssFile``: clean mmap'd checkpoint pages the kernel may drop), their size at the sampled peak is kept too.
    """

    def __init__(self, device="cpu", interval: float = 0.02):
        import threading

        self.cuda = str(device).startswith("cuda")
        self.phases: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._started = 0.0
        self._name, self._start_hwm, self._sampled, self._file_at_peak = None, 0, 0, 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if not self.cuda and proc_status_bytes("VmRSS") is not None:
            self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
            self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss, file = proc_status_bytes("VmRSS") or 0, proc_status_bytes("RssFile") or 0
            with self._lock:
                if rss > self._sampled:
                    self._sampled, self._file_at_peak = rss, file

    def start(self, name: str) -> None:
        """Phase ``name`` begins (the previous one, if any, ends)."""
        import time

        self.end()
        self._started = time.perf_counter()
        with self._lock:
            self._name, self._start_hwm = name, proc_status_bytes("VmHWM") or 0
            self._sampled = proc_status_bytes("VmRSS") or 0
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def current(self) -> int:
        """The running phase's peak so far, in bytes."""
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        hwm = proc_status_bytes("VmHWM") or 0
        with self._lock:
            return hwm if hwm > self._start_hwm else max(self._sampled, proc_status_bytes("VmRSS") or 0)

    def end(self) -> None:
        import time

        if self._name is not None:
            self.phases[self._name] = max(self.phases.get(self._name, 0), self.current())
            self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._started
            self._name = None

    def phase(self, name: str):
        """A context manager around phase ``name``."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            self.start(name)
            try:
                yield self
            finally:
                self.end()

        return scope()

    def record(self) -> dict:
        """``{"peak_mib", "phases_mib", "phases_seconds", "measured", ...}`` for training.json (MiB, one decimal; the
        seconds of the phases that ended)."""
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        phases = {**self.phases, **({self._name: self.current()} if self._name else {})}
        out = {"measured": "cuda" if self.cuda else "rss", "phases_mib": {k: mib(v) for k, v in phases.items()},
               "phases_seconds": {k: round(v, 2) for k, v in self.seconds.items()}}
        hwm = proc_status_bytes("VmHWM")
        if self.cuda:
            out["peak_mib"] = mib(max(phases.values(), default=0))
            out["process_rss_peak_mib"] = mib(hwm) if hwm is not None else None
        else:
            out["peak_mib"] = mib(hwm) if hwm is not None else mib(max(phases.values(), default=0))
            out["rss_file_mib_at_sampled_peak"] = mib(self._file_at_peak)
        return out

    def close(self) -> None:
        self.end()
        self._stop.set()
