"""Minor page faults of repeated training-like steps with and without ``train.cpu_tuning``'s malloc settings.

One "step" allocates blocks of 1 to 22 MiB that are alive together (like activations) and frees
them at the end; five steps are counted after a first one. Each mode runs in its own process
(``mallopt`` cannot be undone). With glibc's defaults each step faults its memory in again;
with :func:`tunelab.train.cpu_tuning.keep_freed_memory` the next step reuses it.

Usage::

    python benchmarks/bench_allocator.py             # prints both counts and their ratio
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

STEPS = """
import resource, sys, torch
sys.path.insert(0, sys.argv[2])
if sys.argv[1] == "keep":
    from tunelab.train.cpu_tuning import keep_freed_memory
    assert keep_freed_memory(), "mallopt is glibc's"
def step():
    held = [torch.ones(2**18 * k) for k in range(1, 25, 3)]
    del held
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode, str(SRC)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    default, kept = faults("default"), faults("keep")
    print(f"minor page faults over 5 steps: default malloc {default:,}, train.cpu_tuning {kept:,} "
          f"({kept / max(1, default):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
