"""AdamW step time: torch's per-tensor loop (its CPU default), ``foreach`` and ``fused``.

``build_optimizer(..., fused=True)`` (single process and DDP) uses the fused kernel; this measures
why. Parameter shapes are SmolLM2-135M's: every trainable tensor of full fine-tuning (134.5M), of
``method: freeze`` with the top 15 layers (53.1M, the demo) and of LoRA r=16 on every linear layer
(4.9M). Each variant steps 3 times, then the median of ``--steps`` timed steps; the host's bf16 and
fp32 matmul rate is measured before and after.

Usage::

    python benchmarks/bench_optimizer.py              # prints the table
    python benchmarks/bench_optimizer.py --threads 2 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_micro_threads import matmul_gflops  # benchmarks/, beside this script

HIDDEN, INTER, LAYERS, VOCAB, KV = 576, 1536, 30, 49152, 192  # SmolLM2-135M


def layer_shapes() -> list[tuple[int, ...]]:
    return [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
            (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER), (HIDDEN,), (HIDDEN,)]


def workloads() -> dict[str, list[tuple[int, ...]]]:
    lora = []
    for out_f, in_f in [s for s in layer_shapes() if len(s) == 2]:
        lora += [(16, in_f), (out_f, 16)]
    return {
        "full fine-tuning (134.5M)": [(VOCAB, HIDDEN), (HIDDEN,)] + layer_shapes() * LAYERS,
        "top 15 layers (53.1M)": layer_shapes() * 15,
        "LoRA r=16, all linear (4.9M)": lora * LAYERS,
    }


def step_seconds(shapes, steps: int, **kwargs) -> float:
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kwargs)
    for _ in range(3):
        optimizer.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before = matmul_gflops(args.threads)
    rows = []
    for name, shapes in workloads().items():
        n = sum(torch.Size(s).numel() for s in shapes)
        loop, foreach, fused = (step_seconds(shapes, args.steps, **kw)
                                for kw in ({"foreach": False}, {"foreach": True}, {"fused": True}))
        rows.append(f"| {name} | {n / 1e6:.1f}M | {loop * 1e3:.1f} | {foreach * 1e3:.1f} | {fused * 1e3:.1f} | "
                    f"{loop / fused:.1f}x |")
    after = matmul_gflops(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; host GFLOP/s before bf16 {before['bf16']} / fp32 "
          f"{before['fp32']}, after bf16 {after['bf16']} / fp32 {after['fp32']}\n")
    print("| trainable tensors | parameters | loop (ms/step) | foreach (ms/step) | fused (ms/step) | fused vs loop |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
