"""Process-global CPU tuning for training, opt-in by ``train.cpu_tuning``.

Everything training changes about the process lives here, so that it is one switch and recorded
in the run's ``env.json`` (:func:`apply_cpu_tuning` returns what it set):

* torch intra-op threads: ``train.threads``, else (with tuning) the physical cores shared among
  this machine's processes (:func:`default_threads`);
* glibc ``malloc`` thresholds (:func:`keep_freed_memory`): a training step allocates and frees
  the same large blocks over and over (activations, logits chunks, gradients); with glibc's
  defaults blocks above its (dynamic) mmap threshold get fresh ``mmap`` pages and heap memory
  above the trim threshold is handed back, so every step page-faults the same memory in again.
  With the thresholds raised, memory freed by one step is reused by the next; the peak stays what
  a step needs. Our own because it is one ``mallopt`` call; PyTorch has no CPU caching allocator
  that does it. Only glibc (Linux) has ``mallopt``; elsewhere nothing is set. Under a sharded
  engine (FSDP, DeepSpeed ZeRO), chosen to save memory, the opposite (:func:`return_freed_memory`):
  a fixed 128 KiB mmap threshold, so every block above it goes back to the kernel when freed. With
  glibc's dynamic threshold (or ours) the per-layer all-gather buffers, gradient shards and
  activations of different sizes fragment the heap, and a rank's RSS grew step after step
  (FSDP, 362M Llama, 2 ranks: 3.9 GiB after one step, 6.1 GiB after five; with 128 KiB 4.3 GiB
  from the second step on, ``docs/scaling.md``);
* the ranks of a sharded engine that tunelab launches itself, where PyPI's ``tbb`` is installed
  (``make setup`` installs it), run with TBB's scalable allocator in place of glibc's malloc
  (:func:`rank_environment`: ``LD_PRELOAD`` of ``libtbbmalloc_proxy``). glibc's 128 KiB threshold
  keeps the heap flat but hands every freed block back, and the next layer page-faults it in again
  (the kernel zeroing those pages was a quarter of a 2-rank FSDP run's time); TBB's allocator keeps
  freed large blocks in a cache sized to the working set, for little more memory (the figures:
  ``docs/scaling.md``). Ours is only the choice; the allocator is Intel's. ``TUNELAB_MALLOC=glibc``
  keeps glibc's;
* the GIL switch interval while micro-batches run in worker threads
  (``train.micro_batch_threads``, :func:`shorten_switch_interval`): a thread back from a matrix
  product waits less for the other's Python work.

Measurements behind each: ``docs/benchmarks.md``; ``benchmarks/bench_allocator.py`` counts the page
faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 2**30  # free memory at the top of the heap is kept up to 1 GiB
LEAN_THRESHOLD = 128 * 2**10  # glibc's initial default for both, fixed: freed blocks above it go back at once
SWITCH_INTERVAL_S = 1e-4  # the GIL hand-over interval while micro-batch workers run (Python's default: 5 ms)

_malloc_mode: str | None = None  # the mode mallopt last set in this process


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when it is set (a cap from the user, a launcher or a parallel test runner), else
    the physical cores shared among this machine's processes."""
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and int(cap) > 0:
        return int(cap)
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def set_threads(threads: int | None) -> int:
    """torch threads: as configured, else :func:`default_threads`; returns the count set."""
    import torch  # lazy, as below: tunelab train's launcher imports this module and never needs torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads


def _mallopt(mode: str, mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's malloc thresholds (this disables its dynamic threshold for the rest of the process; a
    later call may set other values); returns whether they are set."""
    global _malloc_mode
    if _malloc_mode == mode:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    if mallopt(M_MMAP_THRESHOLD, mmap_threshold) and mallopt(M_TRIM_THRESHOLD, trim_threshold):
        _malloc_mode = mode
        return True
    return False


def keep_freed_memory() -> bool:
    """glibc's malloc for speed: blocks up to 32 MiB from the heap, up to 1 GiB of freed heap kept."""
    return _mallopt("keep", MMAP_THRESHOLD, TRIM_THRESHOLD)


def return_freed_memory() -> bool:
    """glibc's malloc for memory (sharded engines): blocks above 128 KiB mapped and unmapped each time."""
    return _mallopt("lean", LEAN_THRESHOLD, LEAN_THRESHOLD)


TBB_MALLOC = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")  # the allocator, then the proxy that replaces malloc


def scalable_malloc_libraries() -> list[str] | None:
    """The paths of TBB's scalable allocator and its malloc-replacing proxy from PyPI's ``tbb`` (installed
    into the environment's ``lib/``), or None where it is not installed. The allocator is listed first: the
    proxy needs it and has no search path of its own, and a preloaded library satisfies it by name."""
    try:
        files = distribution("tbb").files or []
    except PackageNotFoundError:
        return None
    found = {Path(str(f)).name: Path(str(f.locate())).resolve() for f in files if Path(str(f)).name in TBB_MALLOC}
    if set(found) != set(TBB_MALLOC) or not all(p.is_file() for p in found.values()):
        return None
    return [str(found[name]) for name in TBB_MALLOC]


def rank_environment(train_cfg, *, sharded: bool) -> dict[str, str]:
    """Environment variables for the ranks tunelab's launcher starts: under a sharded engine on the CPU
    (``train.cpu_tuning`` on, Linux, no GPU, ``tbb`` installed, ``TUNELAB_MALLOC`` unset or ``tbb``;
    ``glibc`` keeps glibc's, another value is a user error), TBB's
    scalable allocator preloaded (``LD_PRELOAD``, ahead of any the user set). A preload must be in place
    before the process starts, so it is the launcher's; ranks started by torchrun or accelerate get it from
    ``LD_PRELOAD`` set by the user (``docs/scaling.md``)."""
    choice = os.environ.get("TUNELAB_MALLOC", "")
    if choice not in ("", "glibc", "tbb"):
        raise UserError(f"TUNELAB_MALLOC={choice} is not an allocator tunelab knows. Use glibc or tbb, or unset it")
    if not (sharded and getattr(train_cfg, "cpu_tuning", True) and sys.platform.startswith("linux")):
        return {}
    if choice == "glibc" or gpu_visible():
        return {}
    preload = with_scalable_malloc(os.environ.get("LD_PRELOAD", ""))
    if preload is None:
        if choice == "tbb":
            raise UserError("TUNELAB_MALLOC=tbb, but PyPI's tbb is not installed. pip install 'tunelab[tbb]' "
                            "(Linux x86-64), or unset TUNELAB_MALLOC")
        return {}
    return {"LD_PRELOAD": preload}


def with_scalable_malloc(ld_preload: str) -> str | None:
    """``LD_PRELOAD`` value ``ld_preload`` with TBB's allocator ahead of it (None where tbb is not installed).
    ld.so splits the value at spaces and colons; a library already in it is not listed twice."""
    libraries = scalable_malloc_libraries()
    if libraries is None:
        return None
    user = [lib for lib in re.split(r"[ :]+", ld_preload) if lib and lib not in libraries]
    return " ".join([*libraries, *user])


#: The device nodes a GPU driver makes: NVIDIA's, and AMD's (ROCm).
GPU_NODES = {"nvidia": ("/dev/nvidiactl", "/dev/nvidia0"), "amd": ("/dev/kfd",)}


def gpu_visible() -> bool:
    """Whether the ranks would find a GPU, told without importing torch (2.5 CPU-seconds in a launcher that
    needs nothing else of it): a GPU driver's device node that ``CUDA_VISIBLE_DEVICES`` (or, for AMD,
    ``HIP_VISIBLE_DEVICES``) set to nothing does not hide. A GPU that a CPU build of torch cannot use counts
    too; its ranks then keep glibc's allocator, as on a GPU."""
    def hidden(*names: str) -> bool:
        return any(os.environ.get(n) in ("", "-1") for n in names)

    def present(vendor: str) -> bool:
        return any(Path(p).exists() for p in GPU_NODES[vendor])

    return (present("nvidia") and not hidden("CUDA_VISIBLE_DEVICES")) or \
        (present("amd") and not hidden("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"))


def scalable_malloc_loaded() -> bool:
    """Whether this process runs TBB's malloc proxy (preloaded by :func:`rank_environment` or the user)."""
    try:
        return TBB_MALLOC[1].split(".so")[0] in Path("/proc/self/maps").read_text()
    except OSError:  # no /proc: not Linux
        return False


def apply_cpu_tuning(train_cfg, device: str, *, sharded: bool = False) -> dict[str, Any]:
    """Apply the process-wide settings ``train_cfg`` (``TrainSection``) asks for on ``device``
    (``"cpu"`` / ``"cuda"``); returns what was set, for the run's ``env.json``. ``sharded``: the run's engine
    shards the model to save memory, and malloc returns freed memory instead of keeping it.

    ``train.threads`` is always honoured (it is an explicit setting); everything else only with
    ``train.cpu_tuning``. The switch interval is not changed here but by the loop's worker threads,
    through :func:`shorten_switch_interval`.
    """
    enabled = bool(getattr(train_cfg, "cpu_tuning", True))
    if enabled or train_cfg.threads:
        threads = set_threads(train_cfg.threads)
    else:
        import torch  # lazy (see set_threads)

        threads = torch.get_num_threads()  # torch's own default
    malloc = "default"
    if scalable_malloc_loaded():  # glibc's thresholds would tune an allocator this process does not use
        malloc = "TBB scalable allocator (libtbbmalloc_proxy preloaded)"
    elif enabled and device == "cpu" and (return_freed_memory if sharded else keep_freed_memory)():
        malloc = (f"returns freed memory (mmap and trim threshold {LEAN_THRESHOLD}: a sharded engine)" if sharded
                  else f"keeps freed memory (mmap threshold {MMAP_THRESHOLD}, trim threshold {TRIM_THRESHOLD})")
    return {
        "enabled": enabled,
        "threads": threads,
        "threads_source": "train.threads" if train_cfg.threads else ("physical cores" if enabled else "torch default"),
        "malloc": malloc,
        "switch_interval_s_in_micro_batch_workers": SWITCH_INTERVAL_S if enabled else sys.getswitchinterval(),
    }


def shorten_switch_interval(enabled: bool = True) -> Callable[[], None]:
    """While micro-batch worker threads run: hand the GIL over every :data:`SWITCH_INTERVAL_S` (when
    ``enabled``, i.e. ``train.cpu_tuning``); returns the function that puts the previous interval back."""
    if not enabled:
        return lambda: None
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return lambda: sys.setswitchinterval(previous)
