"""Keep freed CPU memory in the process instead of handing it back to the kernel at every step.

A training step allocates and frees the same blocks over and over (activations, logits chunks,
gradients). glibc's malloc serves blocks above its mmap threshold (dynamic, 128 KiB to 32 MiB)
with fresh ``mmap`` pages and gives heap memory back above its trim threshold, so each step
page-faults the same memory in again: 66,000 minor faults per 512-token row of a SmolLM2 LoRA
step (about 260 MB of pages zeroed by the kernel), 17,000 with the settings below (measured with
``getrusage``). The peak stays what the step needs; memory freed at the end of a step is kept for
the next one.

Our own because it is one ``mallopt`` call; PyTorch has no CPU caching allocator that does it.
Only glibc (Linux) has ``mallopt``; elsewhere this does nothing.

It also bounds oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, unless the user
set it). bf16 matrix products on CPU run through oneDNN, which keeps one primitive per shape, up
to 1,024 by default. Packed rows bring new shapes with every segment length, so that cache grows
all through training. On the standard SmolLM2 LoRA workload, live memory grew by about 13 MB per
row, which is +1.2 GB peak RSS over one epoch. A row reuses its own shapes across its 30 layers,
so 128 primitives keep the step time (0.85-0.98 s per row either way) and cut the growth to
about 7 MB per row, which then stops at the cap. A capacity of 8 slowed steps by 50% (measured
2026-11-24). It must be set before the first oneDNN product, so ``fine_tune`` calls this before
training.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 2**30  # free memory at the top of the heap is kept up to 1 GiB

_done = False


ONEDNN_CACHE = "128"


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds for training (once per process) and bound oneDNN's primitive
    cache; returns whether the malloc thresholds were set."""
    global _done
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
