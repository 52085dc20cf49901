"""The training allocator settings: memory freed by one step is reused by the next, not faulted in again."""

import subprocess
import sys

import pytest

from tunelab.kernels.allocator import keep_freed_memory

# One "step": blocks of 1 to 22 MiB alive together (like activations), freed at the end; five steps.
STEPS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from tunelab.kernels.allocator import keep_freed_memory
    assert keep_freed_memory()
def step():
    held = [torch.ones(2**18 * k) for k in range(1, 25, 3)]
    del held
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_cuts_page_faults_of_repeated_steps():
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
    default, kept = _faults("default"), _faults("keep")
    assert kept < 0.5 * default, (default, kept)  # measured here: 45,309 vs 14,592

