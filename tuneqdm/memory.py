"""Process-level memory hygiene for CPU training.

glibc raises its mmap threshold each time a large block is freed, so after a few steps most activation tensors come
from the heap and their memory is not returned between steps; on an SD-1.5-size UNet this fragmentation added about
0.8 GiB to the peak RSS (measured: 3.80 -> 3.01 GiB, benchmarks/train_memory.py). Pinning the threshold makes every
tensor above it its own mapping, returned to the OS as soon as it is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold (no effect and False on other C libraries or platforms)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False
