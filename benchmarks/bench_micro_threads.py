"""A/B of ``train.micro_batch_threads`` on the standard LoRA workload, in one invocation.

Runs tunelab's side of ``bench_lora.py`` (same workload, same worker code, one subprocess per
run) with ``train.micro_batch_threads: 1`` and ``2`` alternated (1, 2, then 2, 1, ...), so that a
machine whose speed drifts affects both arms alike. Before and after the runs it measures the
host's bf16 and fp32 matrix-multiply rate (a 2048 x 2048 product, the same torch threads), which
says how fast the machine was while the A/B ran.

Usage::

    python benchmarks/bench_micro_threads.py                      # 3 repeats of each arm
    python benchmarks/bench_micro_threads.py --repeats 2 --records 256
    python benchmarks/bench_micro_threads.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_lora as bl  # benchmarks/bench_lora.py, beside this script
from docs_section import write_section

MARK_START, MARK_END = "<!-- bench:micro-threads:start -->", "<!-- bench:micro-threads:end -->"
MATMUL_N = 2048


def matmul_gflops(threads: int, n: int = MATMUL_N, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of an ``n x n`` by ``n x n`` product in bf16 and fp32 (median of ``repeats``; of one product where
    one takes over a second: a CPU without native bf16 (an AVX2 EPYC) took 53 s for one 2048-squared bf16 product)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        torch.mm(a, b)
        first = time.perf_counter() - t0
        if first > 1.0:  # too slow to repeat, and warm already at that size
            out[name] = round(2 * n**3 / first / 1e9, 1)
            continue
        for _ in range(2):
            torch.mm(a, b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        out[name] = round(2 * n**3 / statistics.median(times) / 1e9, 1)
    return out


def markdown_section(result: dict) -> str:
    runs = result["runs"]
    lines = [
        "",
        f"Measured {result['timestamp']} with `python benchmarks/bench_micro_threads.py "
        f"{' '.join(result['argv'])}`".rstrip() + f" (result file `{result['result_file']}`).",
        "",
        f"Workload: the standard one (`bench_lora.py`, tunelab's side) over {result['workload']['records']} records, "
        f"{result['workload']['threads']} torch threads; arms alternated, {result['repeats']} runs each.",
        "",
        "| run | micro_batch_threads | dataset tokens/s | training time (s) | peak RSS (MiB) | eval loss | "
        "1-min load average before / after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['micro_batch_threads']} | {r['tokens_per_s']:,.0f} | {r['train_seconds']:.1f} | "
                     f"{r['peak_rss_mib']:,.0f} | {r['eval_loss']:.4f} | "
                     f"{r['load_avg_1min'][0]:.1f} / {r['load_avg_1min'][1]:.1f} |")
    s = result["summary"]
    lines += [
        "",
        f"Median dataset tokens/s: {s['1']['median_tokens_per_s']:,.0f} with 1, {s['2']['median_tokens_per_s']:,.0f} "
        f"with 2 (2 / 1 = {s['ratio_2_over_1']:.3f}x); paired ratios per repeat: "
        f"{', '.join(f'{x:.3f}' for x in s['paired_ratios'])}.",
        "",
        f"Host matmul ({MATMUL_N} x {MATMUL_N}, {result['workload']['threads']} threads): before "
        f"bf16 {result['matmul_before']['bf16']:,.0f} / fp32 {result['matmul_before']['fp32']:,.0f} GFLOP/s, after "
        f"bf16 {result['matmul_after']['bf16']:,.0f} / fp32 {result['matmul_after']['fp32']:,.0f} GFLOP/s.",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['logical_cores']} logical cores; "
        f"torch {result['machine']['torch']}, transformers {result['machine']['transformers']}, "
        f"peft {result['machine']['peft']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=512, help="training records: the first N of the file")
    p.add_argument("--eval-records", type=int, default=99, help=f"evaluation records, from record {bl.EVAL_START}")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per sample (and per packed row)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model alias or folder")
    p.add_argument("--data", type=Path, default=bl.DATA_FILE, help="the alpaca demo file")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each arm")
    p.add_argument("--results-dir", type=Path, default=bl.RESULTS_DIR, help="where the JSON result file goes")
    p.add_argument("--out", type=Path, help="rewrite the marked section of this markdown file (docs/benchmarks.md)")
    args = p.parse_args(argv)

    threads = args.threads or bl.default_threads()
    before = matmul_gflops(threads)
    print(f"[ab] matmul before: {before} GFLOP/s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="tunelab-ab-"))
    runs = []
    try:
        train_path, eval_path = bl.prepare_data(args, workdir)
        spec = {"model": args.model, "train_path": str(train_path), "eval_path": str(eval_path),
                "max_length": args.max_length, "threads": threads, "ours_batch_size": 1, "workdir": str(workdir)}
        bl.launch("prepare", spec, workdir)
        for rep in range(args.repeats):
            for arm in ((1, 2) if rep % 2 == 0 else (2, 1)):
                run_dir = workdir / f"r{rep}-t{arm}"
                run_dir.mkdir()
                load_before = os.getloadavg()[0]
                r = bl.launch("ours", {**spec, "workdir": str(run_dir), "ours_train": {"micro_batch_threads": arm}},
                              run_dir)
                assert r["micro_batch_threads"] == arm, r
                runs.append({"repeat": rep, **{k: r[k] for k in (
                    "micro_batch_threads", "tokens_per_s", "train_seconds", "peak_rss_mib", "eval_loss",
                    "train_tokens", "optimiser_steps", "grad_accum")},
                             "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
                print(f"[ab] repeat {rep} micro_batch_threads {arm}: {r['tokens_per_s']:.0f} tokens/s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    after = matmul_gflops(threads)
    print(f"[ab] matmul after: {after} GFLOP/s", flush=True)

    by_arm = {arm: [r for r in runs if r["micro_batch_threads"] == arm] for arm in (1, 2)}
    paired = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(by_arm[1], by_arm[2], strict=True)]
    summary = {str(arm): {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                          "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rs)} for arm, rs in by_arm.items()}
    summary["ratio_2_over_1"] = summary["2"]["median_tokens_per_s"] / summary["1"]["median_tokens_per_s"]
    summary["paired_ratios"] = paired

    stamp = dt.datetime.now().astimezone()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    result_file = args.results_dir / f"micro-threads-{stamp.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        shown = str(result_file.resolve().relative_to(bl.REPO))
    except ValueError:
        shown = str(result_file)
    result = {
        "timestamp": stamp.isoformat(timespec="seconds"), "argv": list(sys.argv[1:] if argv is None else argv),
        "result_file": shown, "repeats": args.repeats,
        "workload": {"model": args.model, "records": args.records, "eval_records": args.eval_records,
                     "max_length": args.max_length, "threads": threads},
        "machine": bl.machine_details(), "matmul_before": before, "matmul_after": after,
        "runs": runs, "summary": summary,
    }
    result_file.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"[ab] result: {result_file}")
    if args.out:
        write_section(args.out, MARK_START, MARK_END, markdown_section(result), append=True)
        print(f"[ab] updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
