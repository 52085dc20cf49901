"""The advisor's predicted peak memory against the measured peak, per method, on SmolLM2-135M.

Predicted: :func:`tunelab.search.advise.estimate_method` (1- and 2-layer probes of the
architecture, extrapolated to 30 layers). Measured: the same training step on the real model
(:func:`tunelab.search.advise.measure_step_memory`): the peak of live tensor bytes. Each method
runs in its own subprocess, which also reports its process's RSS growth from before the model
was built to the high-water mark (``VmHWM``), for comparison with what the OS sees.

    python benchmarks/bench_advise.py                      # every method, a Markdown table
    python benchmarks/bench_advise.py --methods lora full --batch-size 2 --max-length 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return float("nan")


def worker(method: str, model: str, batch: int, length: int, precision: str, checkpointing: bool) -> dict:
    import torch

    from tunelab.config import load_config
    from tunelab.search.advise import Probes, _probe_config, estimate_method, measure_step_memory
    from tunelab.train.precision import resolve_precision

    precision = resolve_precision(precision, torch.device("cpu"))
    cfg = load_config(None, base={"task": "classification" if method == "head" else "sft", "model": {"path": model},
                                  "method": {"name": method}, "data": {"train": [{"path": "unused.jsonl"}],
                                                                       "max_length": length},
                                  "train": {"batch_size": batch}})[0]
    t0 = time.perf_counter()
    probes = Probes(model)
    try:
        predicted, trainable, params = estimate_method(cfg, method, probes, precision=precision,
                                                       checkpointing=checkpointing)
    finally:
        probes.close()
    t_pred = time.perf_counter() - t0
    rss0 = _status("VmRSS:")
    t0 = time.perf_counter()
    measured, _, _ = measure_step_memory(_probe_config(cfg, method, checkpointing=checkpointing, precision=precision,
                                                       model_path=model), precision)
    return {"method": method, "precision": precision, "checkpointing": checkpointing, "trainable": trainable,
            "parameters": params, "predicted": predicted.peak, "measured": measured.peak,
            "weights": measured.weights, "gradients": measured.gradients, "optimizer": measured.optimizer,
            "activations": measured.activations, "predicted_activations": predicted.activations,
            "rss_growth": _status("VmHWM:") - rss0, "seconds_predict": round(t_pred, 1),
            "seconds_measure": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        row = worker(args.worker, args.model, args.batch_size, args.max_length, args.precision, args.checkpointing)
        print(json.dumps(row))
        return
    from tunelab.methods import METHODS

    rows = []
    for method in args.methods or list(METHODS):
        cmd = [sys.executable, __file__, "--worker", method, "--model", args.model, "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--precision", args.precision,
               *(["--checkpointing"] if args.checkpointing else [])]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{method}: failed\n{out.stderr[-1500:]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    mib = 2**20
    print("| method | trainable | weights | gradients | optimiser | activations | measured peak | predicted peak "
          "| error | process RSS growth |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        err = 100 * (r["predicted"] / r["measured"] - 1)
        print(f"| {r['method']} | {r['trainable']:,} | {r['weights'] / mib:,.1f} | {r['gradients'] / mib:,.1f} | "
              f"{r['optimizer'] / mib:,.1f} | {r['activations'] / mib:,.1f} | {r['measured'] / mib:,.1f} | "
              f"{r['predicted'] / mib:,.1f} | {err:+.1f}% | {r['rss_growth'] / mib:,.0f} |")


if __name__ == "__main__":
    main()
