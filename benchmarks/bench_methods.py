"""Every fine-tuning method on the same budget: the table of ``docs/methods.md``.

For each method (``--methods``; full fine-tuning is the reference row) two jobs run, each in its
own subprocess (``--worker``) so that its peak RSS is its own:

* **alpaca**: ``fine_tune`` on the first ``--records`` records of
  ``../shared/data/instruct/llamafactory_demo/alpaca_en_demo.json`` for ``--steps`` optimiser
  steps, then the eval loss (mean cross-entropy per assistant token) on records 900.. of the
  same file (``--eval-records``). Reported: trainable parameters (count and % of the model),
  peak RSS of the worker (``VmHWM``), dataset tokens/s over the training steps, eval loss.
* **thucnews**: generative classification of THUCNews headlines
  (``../shared/data/classification/thucnews_headlines``): the first ``--cls-train`` training
  rows become chats (the 10 category names in the prompt, the category as the answer),
  ``fine_tune`` for the same ``--steps``, then greedy answers for the first ``--cls-test`` test
  rows, parsed against the category names (``tunelab.eval.metrics``). Reported: accuracy and
  macro-F1 (an unparsable answer counts as wrong).

Every method uses the same data, steps, batch, schedule and seed; only its own options and its
learning rate (the usual one for the method, in ``METHODS``) differ.

Usage::

    python benchmarks/bench_methods.py                            # the standard budget, all methods
    python benchmarks/bench_methods.py --out docs/methods.md      # ... and write the table into the docs
    python benchmarks/bench_methods.py --steps 2 --records 16 --eval-records 8 --cls-train 16 --cls-test 8 \\
        --methods full lora --model tiny-random-llama             # smoke run
    python benchmarks/bench_methods.py --counts                   # trainable parameters only, ~1 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from docs_section import write_section  # benchmarks/docs_section.py, beside this script

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ALPACA = SHARED / "instruct" / "llamafactory_demo" / "alpaca_en_demo.json"
THUCNEWS = SHARED / "classification" / "thucnews_headlines"
RESULTS_DIR = REPO / "benchmarks" / "results"
EVAL_START = 900
MARK_START, MARK_END = "<!-- bench:methods:start -->", "<!-- bench:methods:end -->"

# method -> (method config, learning rate): the usual LR of each method family.
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "full": ({"name": "full"}, 2e-5),
    "freeze": ({"name": "freeze", "layers": 2}, 1e-4),
    "bitfit": ({"name": "freeze", "bitfit": True}, 1e-3),
    "lora": ({"name": "lora", "r": 16, "alpha": 32}, 2e-4),
    "dora": ({"name": "lora", "r": 16, "alpha": 32, "dora": True}, 2e-4),
    "rslora": ({"name": "lora", "r": 16, "alpha": 32, "rslora": True}, 2e-4),
    "loraplus": ({"name": "lora", "r": 16, "alpha": 32, "loraplus_lr_ratio": 16}, 2e-4),
    "qlora": ({"name": "qlora", "r": 16, "alpha": 32}, 2e-4),
    "prefix": ({"name": "prefix", "virtual_tokens": 16}, 1e-2),
    "prompt": ({"name": "prompt", "virtual_tokens": 16}, 3e-2),
    "ptuning": ({"name": "ptuning", "virtual_tokens": 16}, 1e-2),
    "ia3": ({"name": "ia3"}, 3e-3),
    "adapter": ({"name": "adapter", "placement": "pfeiffer", "size": 64}, 1e-3),
    "adapter_houlsby": ({"name": "adapter", "placement": "houlsby", "size": 64}, 1e-3),
    "llama_adapter": ({"name": "llama_adapter", "prompt_length": 10, "layers": 8}, 9e-3),
}
VIRTUAL = {"prefix", "prompt", "ptuning"}


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameters, tied ones once; a 4-bit weight counts its logical size, not its bytes."""
    trainable = total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        n = state.shape.numel() if state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _config(spec: dict[str, Any], data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    method, lr = METHODS[spec["method"]]
    return {
        "run": {"name": spec["method"], "output_dir": str(run_dir)},
        "model": {"path": spec["model"]},
        "data": {**data, "max_length": spec["max_length"], "packing": spec["method"] not in VIRTUAL, "cache": False},
        "method": method,
        "train": {"lr": lr, "max_steps": spec["steps"], "epochs": None, "batch_size": spec["batch_size"],
                  "grad_accum": spec["grad_accum"], "schedule": "cosine", "warmup_ratio": 0.03, "seed": 42,
                  "precision": spec["precision"], "save_total_limit": 1},
    }


def _labels(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted({r["label_text"] for r in rows})


def _chat(text: str, labels: list[str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Classify this news headline into one of: {', '.join(labels)}. "
             f"Answer with the category only.\nHeadline: {text}"}]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (method, task) job in this process; prints its result as JSON."""
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    tmp = Path(spec["tmp"])
    console = Console(quiet=True)
    if spec["task"] == "alpaca":
        data = {"train": [{"path": str(ALPACA), "limit": spec["records"]}]}
        ev = tmp / "alpaca_eval.json"
        rows = json.loads(ALPACA.read_text(encoding="utf-8"))[EVAL_START : EVAL_START + spec["eval_records"]]
        ev.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        data["eval"] = [{"path": str(ev)}]
        cfg, _ = load_config(None, base=_config(spec, data, tmp / "runs"))
        out = fine_tune(cfg, console=console)
        trainable, total = _parameter_counts(out.model)
        return {"trainable": trainable, "parameters": total,
                "trainable_percent": round(100 * trainable / total, 4), "tokens_per_s": out.summary["tokens_per_s"],
                "eval_loss": out.summary["best_eval_loss"], "peak_rss_mib": round(_peak_rss_mib(), 1),
                "train_seconds": out.summary["train_seconds"]}

    from tunelab.eval.metrics import classification_metrics, parse_label
    from tunelab.ship.inference import Loaded, generate_batch

    labels = _labels(THUCNEWS / "train.jsonl")
    train = [json.loads(line) for line in (THUCNEWS / "train.jsonl").read_text(encoding="utf-8").splitlines()][: spec["cls_train"]]
    test = [json.loads(line) for line in (THUCNEWS / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    test = test[:: max(1, len(test) // spec["cls_test"])][: spec["cls_test"]]  # spread over the classes
    chats = tmp / "thucnews_train.jsonl"
    chats.write_text("".join(json.dumps({"messages": _chat(r["text"], labels) + [
        {"role": "assistant", "content": r["label_text"]}]}, ensure_ascii=False) + "\n" for r in train), encoding="utf-8")
    cfg, _ = load_config(None, base=_config(spec, {"train": [{"path": str(chats), "format": "messages"}]}, tmp / "runs"))
    out = fine_tune(cfg, console=console)
    loaded = Loaded(out.model.eval(), out.tokenizer, spec["method"])
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=out.summary["precision"] == "bf16"):  # as trained
        replies = generate_batch(loaded, [_chat(r["text"], labels) for r in test], max_new_tokens=8, batch_size=16)
    predicted = [parse_label(reply, labels) for reply in replies]
    scores = classification_metrics([r["label_text"] for r in test], predicted, labels)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "unparsed": scores["n_unparsed"],
            "n": scores["n"]}


def count_only(model_path: str, names: list[str]) -> str:
    """Trainable parameters of every method on ``model_path``, without training (one process)."""
    import copy
    import gc

    import torch
    from pydantic import TypeAdapter

    from tunelab import methods
    from tunelab.models.load import load_model

    parse = TypeAdapter(methods.MethodConfig).validate_python
    base = load_model(model_path)
    lines = ["| method | config | trainable | % |", "| --- | --- | ---: | ---: |"]
    for name in names:
        cfg = parse(METHODS[name][0])
        options = methods.load_options(cfg, torch.float32)
        model = methods.get(cfg.name).apply(load_model(model_path, **options) if options else copy.deepcopy(base), cfg)
        trainable, total = _parameter_counts(model)
        shown = ", ".join(f"{k}: {v}" for k, v in METHODS[name][0].items())
        lines.append(f"| {name} | `{{{shown}}}` | {trainable:,} | {100 * trainable / total:.3f} |")
        del model
        gc.collect()
    return "\n".join(lines)


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**spec, "tmp": tmp})],
                              capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| method | trainable | % | peak RSS (MiB) | tokens/s | alpaca eval loss | THUCNews acc | macro-F1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        a, c = r.get("alpaca", {}), r.get("thucnews", {})

        def f(d, k, fmt):
            return "error" if "error" in d else (fmt.format(d[k]) if d.get(k) is not None else "-")

        lines.append(f"| {r['method']} | {f(a, 'trainable', '{:,}')} | {f(a, 'trainable_percent', '{:.3f}')} | "
                     f"{f(a, 'peak_rss_mib', '{:,.0f}')} | {f(a, 'tokens_per_s', '{:,.0f}')} | {f(a, 'eval_loss', '{:.4f}')} | "
                     f"{f(c, 'accuracy', '{:.1%}')} | {f(c, 'macro_f1', '{:.3f}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--tasks", nargs="+", default=["alpaca", "thucnews"], choices=["alpaca", "thucnews"])
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per job (the same for every method)")
    p.add_argument("--records", type=int, default=512, help="alpaca training records")
    p.add_argument("--eval-records", type=int, default=99, help="alpaca evaluation records (from record 900)")
    p.add_argument("--cls-train", type=int, default=1000, help="THUCNews training headlines")
    p.add_argument("--cls-test", type=int, default=200, help="THUCNews test headlines scored")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--counts", action="store_true", help="only count trainable parameters (no training), print the table")
    p.add_argument("--out", type=Path, help="write the table into this markdown file between the bench:methods markers")
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    if args.counts:
        print(count_only(args.model, args.methods))
        return 0

    base = {"model": args.model, "steps": args.steps, "records": args.records, "eval_records": args.eval_records,
            "cls_train": args.cls_train, "cls_test": args.cls_test, "max_length": args.max_length,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "precision": args.precision}
    results = []
    for method in args.methods:
        row: dict[str, Any] = {"method": method, "config": METHODS[method][0], "lr": METHODS[method][1]}
        for task in args.tasks:
            started = time.perf_counter()
            row[task] = run_job({**base, "method": method, "task": task})
            print(f"{method:16s} {task:9s} {time.perf_counter() - started:6.1f} s  {row[task]}", flush=True)
        results.append(row)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {"benchmark": "methods", "when": stamp, "budget": base, "machine": platform.machine(),
              "cpus": os.cpu_count(), "results": results}
    out_json = RESULTS_DIR / f"methods-{stamp}.json"
    out_json.write_text(json.dumps(record, indent=2))
    text = table(results)
    print(text)
    print(f"results: {out_json}")
    if args.out:
        budget = (f"\n_{args.model}, {args.steps} steps x {args.batch_size} x {args.grad_accum} rows, "
                  f"{args.records} alpaca records, {args.cls_train}/{args.cls_test} THUCNews headlines; "
                  f"`benchmarks/results/{out_json.name}`_\n\n")
        if not write_section(args.out, MARK_START, MARK_END, budget + text + "\n"):
            print(f"{args.out}: no {MARK_START} ... {MARK_END} markers; table not written", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
