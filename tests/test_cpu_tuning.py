"""train.cpu_tuning's malloc modes (glibc only): each runs in its own process, as mallopt is process-wide."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys

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
