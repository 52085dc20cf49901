"""Per-rank memory, speed and loss of the engines of ``train.distributed`` (issue #24).

Workload: full fine-tuning of a random-initialised Llama with SmolLM2-360M's shapes (hidden 960,
intermediate 2560, 32 layers, 15 heads / 5 KV heads, vocabulary 49,152, tied embeddings;
``--layers`` keeps fewer layers), bf16 autocast with fp32 master weights (``--precision fp32``: fp32 throughout), AdamW, ``--processes``
processes of ``tunelab train`` on this machine, ``--steps`` optimiser steps of
``--batch-size`` x ``--grad-accum`` rows per process of ``--max-length`` packed tokens from
``../shared/data/instruct/llamafactory_demo/alpaca_en_demo.json``. Each engine runs the same
config but ``train.distributed`` (and ``train.deepspeed``):

* ``ddp``, ``fsdp`` (FSDP2, decoder layers as units, reshard after forward), ``fsdp-keep`` (the same,
  gathered layers kept from forward to backward: ``train.fsdp.reshard_after_forward: false``), ``zero2``, ``zero3``,
  ``zero3-keep`` (``train.deepspeed.reshard_after_forward: false``) and ``zero3-offload`` (ZeRO-3 with the
  optimiser state and step on the CPU);
* ``fsdp-gloo`` / ``zero3-gloo``: ``fsdp`` / ``zero3`` with gloo's own collectives (``TUNELAB_COLLECTIVES=gloo``):
  on one machine the ranks of ``fsdp`` and ``zero*`` all-gather and reduce-scatter through ``/dev/shm``
  (``tunelab.train.shm_collectives``), and these rows are the same runs over loopback TCP (what two machines
  would use);
* ``fsdp-glibc``: ``fsdp`` with glibc's malloc (``TUNELAB_MALLOC=glibc``): the ranks of ``fsdp`` and
  ``zero*`` run with TBB's scalable allocator where ``tbb`` is installed
  (``tunelab.train.cpu_tuning.rank_environment``), and this row is the same run without it;
* ``ddp-lean``: DDP with the glibc settings the sharded engines get without TBB (``train.cpu_tuning``
  gives DDP glibc thresholds that keep freed memory for speed, sharded engines a fixed 128 KiB
  threshold that returns it: ``tunelab.train.cpu_tuning``), so that the memory ratios can be read both ways.

Figures per engine, read from each run's ``summary.json`` / ``metrics.jsonl``: the peak RSS of each
rank (``VmHWM``: loading the model included), training tokens/s over the whole run and after the first
step (the first step page-faults every buffer in: 58 of DDP's 108 s in a 5-step run), the loss of
the last step, the allocator (``env.json``); beside them, the host's 2048-squared matmul GFLOP/s in bf16 and fp32 on one thread
(each rank's share), before and after the runs. Targets: ZeRO-3's and FSDP's per-rank peak <= 0.6 x DDP's, tokens/s >= 0.7 x DDP's.

Each engine is compared with the DDP run of its own round. ``--repeats N`` runs N rounds of all the engines, interleaved
(ddp, fsdp, zero3, ddp, fsdp, zero3, ...) so that a host that slows down or speeds up over the minutes weighs on every
engine alike: the same host gave DDP 152.7-201.0 tokens/s after the first step in single runs an hour apart. The
summary table then gives each engine's median and range over the rounds and the median of its per-round ratios to DDP,
which is what the verdict reads.

Usage::

    python benchmarks/bench_scale.py                           # the full workload (about 6 GB per DDP rank)
    python benchmarks/bench_scale.py --layers 4 --steps 4 --max-length 256 --out docs/scaling.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import print_figures  # noqa: E402 - benchmarks/, beside this script
from bench_micro_threads import matmul_gflops  # noqa: E402
from docs_section import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_FILE = REPO.parent / "shared" / "data" / "instruct" / "llamafactory_demo" / "alpaca_en_demo.json"
RESULTS_DIR = REPO / "benchmarks" / "results"
MARK_START, MARK_END = "<!-- bench:scale:start -->", "<!-- bench:scale:end -->"
TARGET_PEAK, TARGET_TPS = 0.6, 0.7

ENGINES = {
    "ddp": {"distributed": "ddp"},
    "fsdp": {"distributed": "fsdp", "fsdp": {"reshard_after_forward": True}},
    # the gathered bf16 layers kept from forward to backward: one all-gather per layer and step instead of two
    "fsdp-keep": {"distributed": "fsdp", "fsdp": {"reshard_after_forward": False}},
    # fsdp with gloo's collectives (ENGINE_ENV) instead of shared memory's
    "fsdp-gloo": {"distributed": "fsdp", "fsdp": {"reshard_after_forward": True}},
    # fsdp with glibc's malloc (ENGINE_ENV) instead of TBB's scalable allocator
    "fsdp-glibc": {"distributed": "fsdp", "fsdp": {"reshard_after_forward": True}},
    "zero2": {"distributed": "deepspeed", "deepspeed": {"stage": 2}},
    "zero3": {"distributed": "deepspeed", "deepspeed": {"stage": 3}},
    # zero3 with DeepSpeed's gloo collectives (ENGINE_ENV) instead of shared memory's
    "zero3-gloo": {"distributed": "deepspeed", "deepspeed": {"stage": 3}},
    # every gathered layer kept from its forward to its backward (DeepSpeed's stage3_max_reuse_distance 1e9)
    "zero3-keep": {"distributed": "deepspeed", "deepspeed": {"stage": 3, "reshard_after_forward": False}},
    "zero3-offload": {"distributed": "deepspeed", "deepspeed": {"stage": 3, "offload_optimizer": "cpu"}},
    # tuning off (threads set as it would), glibc's own variables: cpu_tuning.return_freed_memory's thresholds
    "ddp-lean": {"distributed": "ddp", "cpu_tuning": False},
}
ENGINE_ENV = {"ddp-lean": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
              "fsdp-glibc": {"TUNELAB_MALLOC": "glibc"},
              "fsdp-gloo": {"TUNELAB_COLLECTIVES": "gloo"}, "zero3-gloo": {"TUNELAB_COLLECTIVES": "gloo"}}


def build_model(folder: Path, layers: int) -> int:
    """A random SmolLM2-360M-shaped Llama (``layers`` decoder layers) with the SmolLM2 tokenizer; its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models.registry import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=960, intermediate_size=2560, num_hidden_layers=layers,
                         num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_engine(name: str, model: Path, work: Path, a: argparse.Namespace, round_: int = 0) -> dict:
    records = a.batch_size * a.grad_accum * a.processes * a.steps * 4  # plenty of packed rows
    run_name = f"{name}-{round_}"
    cfg = {
        "run": {"name": run_name, "output_dir": str(work / "runs")},
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(DATA_FILE), "limit": records}], "max_length": a.max_length, "packing": True},
        "method": {"name": "full"},
        "train": {"lr": 1e-4, "log_every": 1, "batch_size": a.batch_size, "grad_accum": a.grad_accum, "max_steps": a.steps,
                  "precision": a.precision, "schedule": "constant", "processes": a.processes, "seed": 0,
                  **ENGINES[name]},
    }
    if cfg["train"].get("cpu_tuning") is False:  # the threads tuning would give each rank: its share of the cores
        import psutil

        cfg["train"]["threads"] = max(1, (psutil.cpu_count(logical=False) or 1) // a.processes)
    path = work / f"{run_name}.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **ENGINE_ENV.get(name, {})}
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(path)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        return {"engine": name, "round": round_,
                "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    run = work / "runs" / run_name
    summary = json.loads((run / "summary.json").read_text())
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "train"]  # logged every step (log_every 1)
    later = steps[1:]  # after the first step
    steady = sum(r["tokens"] for r in later) / (later[-1]["elapsed_s"] - steps[0]["elapsed_s"]) if later else None
    env = json.loads((run / "env.json").read_text())
    malloc, collectives = env["cpu_tuning"]["malloc"], env["distributed"].get("collectives", "gloo")  # DDP, ZeRO
    return {"engine": name, "round": round_, "peak_rss_mib": summary["peak_rss_mib"], "tokens_per_s": summary["tokens_per_s"],
            "tokens_per_s_after_first_step": round(steady, 1) if steady else None, "malloc": malloc,
            "collectives": collectives,
            "final_loss": steps[-1]["loss"], "losses": [r["loss"] for r in steps],
            "step_elapsed_s": [r["elapsed_s"] for r in steps], "train_seconds": summary["train_seconds"]}


# env.json's cpu_tuning.malloc, shortened for the table
MALLOC_NAMES = (("TBB", "TBB"), ("returns", "glibc (returns)"), ("keeps", "glibc (keeps)"))


def _verdict(ratio: float, target: float, lower_is_better: bool) -> str:
    ok = ratio <= target if lower_is_better else ratio >= target
    return f"{ratio:.2f}x ({'PASS' if ok else 'MISS'} {'<=' if lower_is_better else '>='} {target})"


def _same_round(results: list[dict], engine: str, round_: int) -> dict | None:
    return next((r for r in results if r["engine"] == engine and r.get("round", 0) == round_ and "error" not in r),
                None)


def rows(results: list[dict]) -> list[tuple[str, ...]]:
    """One row per run; each engine against the DDP (and ddp-lean) run of its own round."""
    several = any(r.get("round", 0) for r in results)
    out = []
    for r in results:
        label = f"{r['engine']} (round {r.get('round', 0) + 1})" if several else r["engine"]
        if "error" in r:
            out.append((label, "-", "-", "-", "-", "-", "-", "-", f"failed: {r['error'][:80]}"))
            continue
        ddp, lean = (_same_round(results, e, r.get("round", 0)) for e in ("ddp", "ddp-lean"))
        peak, steady = max(r["peak_rss_mib"]), r.get("tokens_per_s_after_first_step")
        verdict = ""
        if ddp is not None and r["engine"] in ("fsdp", "fsdp-keep", "zero3"):
            verdict = (f"peak {_verdict(peak / max(ddp['peak_rss_mib']), TARGET_PEAK, True)}, tokens/s "
                       f"{_verdict(r['tokens_per_s'] / ddp['tokens_per_s'], TARGET_TPS, False)}")
            if steady and ddp.get("tokens_per_s_after_first_step"):
                verdict += (f", after the first step "
                            f"{_verdict(steady / ddp['tokens_per_s_after_first_step'], TARGET_TPS, False)}")
            if lean is not None:
                verdict += f"; peak {peak / max(lean['peak_rss_mib']):.2f}x ddp-lean"
        malloc = next((short for start, short in MALLOC_NAMES if r.get("malloc", "").startswith(start)), "glibc")
        moved = "shm" if r.get("collectives", "").startswith("shared memory") else "gloo"
        out.append((label, malloc, moved, " + ".join(f"{x:,.0f}" for x in r["peak_rss_mib"]), f"{peak:,.0f}",
                    f"{r['tokens_per_s']:,.0f}", f"{steady:,.0f}" if steady else "-", f"{r['final_loss']:.4f}",
                    verdict))
    return out


HEADERS = ("engine", "malloc", "collectives", "peak RSS per rank (MiB)", "max rank (MiB)", "tokens/s", "tokens/s after step 1",
           "last-step loss", "vs DDP")
SUMMARY_HEADERS = ("engine", "rounds", "max rank (MiB), max", "tokens/s after step 1: median (range)",
                   "after step 1 / same round's DDP: each round", "verdict (medians)")


def summary_rows(results: list[dict]) -> list[tuple[str, ...]]:
    """Over the rounds of ``--repeats``: each engine's median and range, and the median of its per-round ratios to
    DDP (the run just before it on the same host), peak against peak and speed against speed."""
    from statistics import median

    out = []
    for engine in dict.fromkeys(r["engine"] for r in results):
        ok = [r for r in results if r["engine"] == engine and "error" not in r]
        if not ok:
            continue
        steady = [r["tokens_per_s_after_first_step"] for r in ok if r.get("tokens_per_s_after_first_step")]
        pairs = [(r, _same_round(results, "ddp", r["round"])) for r in ok]
        pairs = [(r, d) for r, d in pairs if d is not None and engine != "ddp"]
        speed = [r["tokens_per_s_after_first_step"] / d["tokens_per_s_after_first_step"] for r, d in pairs
                 if r.get("tokens_per_s_after_first_step") and d.get("tokens_per_s_after_first_step")]
        peak = [max(r["peak_rss_mib"]) / max(d["peak_rss_mib"]) for r, d in pairs]
        verdict = ""
        if engine in ("fsdp", "fsdp-keep", "zero3") and speed and peak:
            verdict = (f"peak {_verdict(median(peak), TARGET_PEAK, True)}, after the first step "
                       f"{_verdict(median(speed), TARGET_TPS, False)}")
        spread = f"{median(steady):,.1f} ({min(steady):,.1f}-{max(steady):,.1f})" if steady else "-"
        out.append((engine, f"{len(ok)} of {sum(r['engine'] == engine for r in results)}",
                    f"{max(max(r['peak_rss_mib']) for r in ok):,.0f}", spread,
                    ", ".join(f"{x:.2f}x" for x in speed) or "-", verdict))
    return out


def markdown(result: dict) -> str:
    w = result["workload"]
    lines = ["", f"Measured {result['timestamp']} on {result['machine']} with "
             f"`python benchmarks/bench_scale.py {' '.join(result['argv'])}`.", "",
             f"Workload: full fine-tuning of a random Llama with SmolLM2-360M's shapes and {w['layers']} decoder "
             f"layers ({w['parameters'] / 1e6:,.0f}M parameters), "
             f"{'bf16 autocast, fp32 masters' if w.get('precision', 'bf16') == 'bf16' else 'fp32'}, AdamW; {w['processes']} "
             f"processes, {w['steps']} steps of {w['batch_size']} x {w['grad_accum']} packed rows of "
             f"{w['max_length']} tokens per process. Host matmul (2048², one thread, before / after): bf16 "
             f"{result['host_gflops_1_thread']['before']['bf16']} / {result['host_gflops_1_thread']['after']['bf16']}, "
             f"fp32 {result['host_gflops_1_thread']['before']['fp32']} / "
             f"{result['host_gflops_1_thread']['after']['fp32']} GFLOP/s.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result["results"])]
    if any(r.get("round", 0) for r in result["results"]):
        lines += ["", f"Over the {result['workload']['repeats']} rounds (each against its round's DDP):", "",
                  "| " + " | ".join(SUMMARY_HEADERS) + " |", "|" + " --- |" * len(SUMMARY_HEADERS)]
        lines += ["| " + " | ".join(r) + " |" for r in summary_rows(result["results"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="fp32 on a CPU without native bf16 (the host figures say: an AVX2 EPYC multiplied bf16 at 0.3 "
                        "GFLOP/s)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all the engines, interleaved (see above)")
    p.add_argument("--out", type=Path, help="write the table into this markdown file (between the bench:scale markers)")
    a = p.parse_args()
    before = matmul_gflops(1)
    print(f"[bench] host matmul on 1 thread before: {before} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        # in a child process: this one would keep the model's freed 1.8 GB (362M, fp32) mapped beside DDP's ranks
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            parameters = pool.submit(build_model, work / "model", a.layers).result()
        results = []
        for round_ in range(a.repeats):
            for name in a.engines.split(","):
                results.append(run_engine(name, work / "model", work, a, round_))
                print(f"[bench] {results[-1]}", flush=True)
    after = matmul_gflops(1)
    result = {"timestamp": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "argv": sys.argv[1:], "results": results,
              "host_gflops_1_thread": {"before": before, "after": after},
              "workload": {"layers": a.layers, "parameters": parameters, "processes": a.processes, "steps": a.steps,
                           "batch_size": a.batch_size, "grad_accum": a.grad_accum, "max_length": a.max_length,
                           "repeats": a.repeats, "precision": a.precision}}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"scale-{stamp}.json").write_text(json.dumps(result, indent=2))
    print_figures("train.distributed", HEADERS, rows(results))
    if a.repeats > 1:
        print_figures(f"over {a.repeats} rounds", SUMMARY_HEADERS, summary_rows(results))
    if a.out is not None:
        write_section(a.out, MARK_START, MARK_END, markdown(result), append=True)


if __name__ == "__main__":
    main()
