"""Cost of the objectives that keep what the model knew (L2-SP, EWC, distillation) on SmolLM2-135M.

LoRA (r 16, every linear layer) on the first 64 rows of ``alpaca_en_demo.json`` (``--max-length``,
``--batch-size``, bf16 autocast where the CPU has it), a few optimiser steps per run. Per run: the median
seconds per optimiser step (from ``metrics.jsonl``, first step excluded) and the set-up time
before the loop (model load, data, and for EWC the Fisher estimation; the difference to the
``none`` run is the objective's own set-up cost). The figures in docs/objectives.md come from it.

Usage::

    python benchmarks/bench_objectives.py --steps 4 --fisher-samples 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "instruct" / "llamafactory_demo" / "alpaca_en_demo.json"


def main() -> None:
    from rich.console import Console

    from tunelab.config import TuneConfig
    from tunelab.train.recipe import fine_tune

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--fisher-samples", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", default="none,l2sp,ewc,distill")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    objectives = {"none": {}, "l2sp": {"l2sp": {"weight": 1.0}},
                  "ewc": {"ewc": {"weight": 1.0, "samples": args.fisher_samples}},
                  "distill": {"distill": {"weight": 1.0}}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            cfg = TuneConfig.model_validate({
                "run": {"name": name, "output_dir": tmp}, "model": {"path": args.model},
                "data": {"train": [{"path": str(ALPACA), "limit": 64}], "max_length": args.max_length},
                "method": {"name": "lora", "r": 16, "alpha": 32},
                "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 2e-4},
                "objectives": objectives[name]})
            start = time.perf_counter()
            out = fine_tune(cfg, console=Console(quiet=True))
            wall = time.perf_counter() - start
            recs = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
            elapsed = [r["elapsed_s"] for r in recs if r["kind"] == "train"]
            per_step = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:], strict=False))
            setup = wall - out.summary["train_seconds"]
            rows.append((name, per_step, setup))
            print(json.dumps({"run": name, "s_per_step": round(per_step, 3), "setup_s": round(setup, 1),
                              "precision": out.summary["precision"]}), flush=True)
    base = dict((n, s) for n, s, _ in rows).get("none")
    print("\n| objective | s / step | vs none | set-up s |\n| --- | --- | --- | --- |")
    for name, s, setup in rows:
        print(f"| {name} | {s:.2f} | {s / base:.2f}x | {setup:.1f} |" if base else f"| {name} | {s:.2f} | | {setup:.1f} |")


if __name__ == "__main__":
    main()
