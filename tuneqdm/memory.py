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


def trim_heap() -> bool:
    """Give the C heap's free memory back to the OS (glibc's ``malloc_trim``; False elsewhere). Sampling leaves the
    mmap threshold alone for speed, so the activations its steps freed stay in the heap: trimmed before the VAE
    decodes, they are not counted twice at the command's peak (measured on an SD-1.5-size generate: 0.45 GiB)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
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
    """The peak memory of each phase of a command (encoding, building the denoiser, the loop, saving) and of the whole
    process, measured without ever resetting the kernel's peak counter: a reset (``reset_peak_rss``) would hide every
    earlier phase from ``/usr/bin/time``, from a parent's ``wait4`` and from this record alike.

    On CPU a phase's peak is exact when the process reached a new high-water mark (VmHWM) during it; otherwise it is
    the largest resident set a sampler thread saw every ``interval`` seconds while the phase ran (a lower bound: a
    spike shorter than the interval can be missed). The whole-process peak is VmHWM itself. On CUDA each phase has
    the allocator's peak (``max_memory_allocated``, reset per phase: that counter is the process's own) and the whole
    is their maximum; the process's CPU peak is recorded beside it. The file-backed part of the sampled peak
    (``RssFile``: clean mmap'd pages the kernel may drop) is kept too. Phases nest: an inner one pauses its outer one.
    """

    def __init__(self, device="cpu", interval: float = 0.02):
        self.cuda, self.interval = str(device).startswith("cuda"), interval
        self.phases: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._start_hwm = self._sampled = 0
        self._highest = self._file_at_highest = 0  # the highest sample of the whole run, and its file-backed part
        self._started = 0.0
        self._stop = None
        self._thread = None

    def _sample(self, stop) -> None:
        while not stop.wait(self.interval):
            rss, file = proc_status_bytes("VmRSS") or 0, proc_status_bytes("RssFile") or 0
            self._sampled = max(self._sampled, rss)
            if rss > self._highest:
                self._highest, self._file_at_highest = rss, file

    def _begin(self, name: str) -> None:
        import threading
        import time

        self._name, self._started = name, time.perf_counter()
        self._start_hwm, self._sampled = proc_status_bytes("VmHWM") or 0, proc_status_bytes("VmRSS") or 0
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self._sampled:  # Linux: a sampler for the phase's own peak
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, args=(self._stop,), daemon=True)
            self._thread.start()

    def _finish(self) -> None:
        import time

        peak = self.current()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.phases[self._name] = max(self.phases.get(self._name, 0), peak)
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._started
        self._name = None

    def current(self) -> int:
        """The running phase's peak so far, in bytes (0 outside a phase)."""
        if self._name is None:
            return 0
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        hwm = proc_status_bytes("VmHWM") or 0
        return hwm if hwm > self._start_hwm else max(self._sampled, proc_status_bytes("VmRSS") or 0)

    def phase(self, name: str):
        """A context manager around phase ``name``; an inner phase pauses the running one until it ends."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            outer = self._name
            if outer is not None:
                self._finish()
            self._begin(name)
            try:
                yield self
            finally:
                self._finish()
                if outer is not None:
                    self._begin(outer)

        return scope()

    def record(self) -> dict:
        """``{"peak_mib", "phases_mib", "phases_seconds", "measured", ...}`` for training.json (MiB, one decimal; the
        running phase's peak so far and the seconds of the phases that ended)."""
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        phases = dict(self.phases)
        if self._name is not None:
            phases[self._name] = max(phases.get(self._name, 0), self.current())
        out = {"measured": "cuda" if self.cuda else "rss", "phases_mib": {k: mib(v) for k, v in phases.items()},
               "phases_seconds": {k: round(v, 2) for k, v in self.seconds.items()}}
        hwm = proc_status_bytes("VmHWM")
        if self.cuda:
            out["peak_mib"] = mib(max(phases.values(), default=0))
            out["process_rss_peak_mib"] = mib(hwm) if hwm is not None else None
        else:
            out["peak_mib"] = mib(hwm) if hwm is not None else mib(max(phases.values(), default=0))
            out["rss_file_mib_at_sampled_peak"] = mib(self._file_at_highest)
        return out
