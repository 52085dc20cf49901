"""train.cpu_tuning's malloc modes (glibc only): each runs in its own process, as mallopt is process-wide."""

from __future__ import annotations

import ctypes.util
import json
import platform
import subprocess
import sys
import types

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or ctypes.util.find_library("c") is None,
                                reason="mallopt is glibc's")

PROBE = """
import json, sys, types, torch
from tunelab.train.cpu_tuning import apply_cpu_tuning
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
cfg = types.SimpleNamespace(cpu_tuning=True, threads=1)
mode = apply_cpu_tuning(cfg, "cpu", sharded=sys.argv[1] == "sharded")["malloc"]
torch.ones(1)
before = rss()
held = [torch.ones(2**18 * k) for k in range(1, 25)]  # 1 to 24 MiB, 300 MiB in all, alive together
peak = rss()
del held
print(json.dumps({"mode": mode, "held_mib": peak - before, "kept_mib": rss() - before}))
"""


def _probe(kind: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, kind], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_a_sharded_engine_returns_freed_memory_where_one_process_keeps_it_for_the_next_step():
    lean, keep = _probe("sharded"), _probe("one")
    assert lean["mode"].startswith("returns freed memory") and keep["mode"].startswith("keeps freed memory")
    assert lean["held_mib"] > 250 and keep["held_mib"] > 250  # the blocks were touched
    assert lean["kept_mib"] < 20  # every block went back to the kernel
    assert keep["kept_mib"] > 200  # the blocks up to 32 MiB stay in the heap for reuse


# A step's buffers, allocated, touched and freed over and over (6 "layers" of 4 sizes, 288 MiB): the page
# faults of the 4th round say whether the allocator kept the freed memory or handed it back to be faulted in
# again (one fault per page).
REUSE_PROBE = """
import json, resource, sys, types, torch
from tunelab.train.cpu_tuning import apply_cpu_tuning
cfg = types.SimpleNamespace(cpu_tuning=True, threads=1)
mode = apply_cpu_tuning(cfg, "cpu", sharded=True)["malloc"]
def one_round():
    held = [torch.ones(2**18 * k) for k in [4, 8, 16, 20] * 6]
    del held
for _ in range(3):
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_round()
print(json.dumps({"mode": mode, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _env(**extra) -> dict[str, str]:
    import os

    return {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, **extra}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="PyPI's tbb has Linux wheels for x86_64 only")
def test_the_ranks_of_a_sharded_engine_run_with_tbbs_allocator_which_reuses_freed_memory(monkeypatch):
    from tunelab.errors import UserError
    from tunelab.train import cpu_tuning
    from tunelab.train.cpu_tuning import rank_environment, scalable_malloc_libraries

    libraries = scalable_malloc_libraries()
    assert libraries is not None, "make setup installs tbb (the [tbb] extra)"
    on = types.SimpleNamespace(cpu_tuning=True, threads=None)
    monkeypatch.delenv("TUNELAB_MALLOC", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/user-own.so")
    env = rank_environment(on, sharded=True)
    assert env == {"LD_PRELOAD": " ".join([*libraries, "/usr/lib/user-own.so"])}  # ahead of the user's, not instead
    monkeypatch.setenv("LD_PRELOAD", f"{libraries[1]}:/usr/lib/user-own.so")  # the user's already has one of them
    assert rank_environment(on, sharded=True) == env
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/user-own.so")
    assert rank_environment(on, sharded=False) == {}  # DDP keeps glibc's (faster for it)
    assert rank_environment(types.SimpleNamespace(cpu_tuning=False, threads=None), sharded=True) == {}
    monkeypatch.setenv("TUNELAB_MALLOC", "glibc")
    assert rank_environment(on, sharded=True) == {}
    monkeypatch.delenv("TUNELAB_MALLOC")
    monkeypatch.setattr(cpu_tuning, "GPU_NODES", {**cpu_tuning.GPU_NODES, "nvidia": ("/",)})  # a GPU's node
    assert rank_environment(on, sharded=True) == {}  # the GPU's ranks: not on the CPU, glibc's
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # ... unless hidden
    assert rank_environment(on, sharded=True) == env
    monkeypatch.setenv("TUNELAB_MALLOC", "jemalloc")
    with pytest.raises(UserError, match="TUNELAB_MALLOC=jemalloc is not an allocator tunelab knows"):
        rank_environment(on, sharded=False)
    monkeypatch.setenv("TUNELAB_MALLOC", "tbb")
    monkeypatch.setattr(cpu_tuning, "scalable_malloc_libraries", lambda: None)
    with pytest.raises(UserError, match="PyPI's tbb is not installed"):
        rank_environment(on, sharded=True)

    def probe(**extra) -> dict:
        done = subprocess.run([sys.executable, "-c", REUSE_PROBE], capture_output=True, text=True, check=True,
                              env=_env(**extra))
        return json.loads(done.stdout)

    tbb, glibc = probe(LD_PRELOAD=" ".join(libraries)), probe()
    assert tbb["mode"].startswith("TBB") and glibc["mode"].startswith("returns freed memory")
    pages = 288 * 2**20 // 4096
    assert glibc["faults"] > 0.9 * pages  # every page faulted in again, round after round
    assert tbb["faults"] < 0.05 * pages, tbb  # TBB's cache has learnt the sizes: the memory is reused
