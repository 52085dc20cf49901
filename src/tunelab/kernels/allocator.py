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

oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1,024 shapes) is left as it
is. It used to grow with every new matmul shape that packed rows brought (a new row length,
segment length or count of labelled tokens), and the heap fragmented under ever-new block
sizes: the standard benchmark's process grew from 1.5 to 3.0 GB over its epoch. Training now
pads those shapes to a few sizes (``tunelab.data.batching.PAD_MULTIPLE``,
``tunelab.kernels.attention.SHAPE_MULTIPLE``, ``tunelab.objectives.causal_lm.ROW_MULTIPLE``), and
the same run stays at 1.55-1.57 GB (measured 2026-11-24, ``docs/benchmarks.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 2**30  # free memory at the top of the heap is kept up to 1 GiB

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds for training (once per process); returns whether they were set."""
    global _done
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
