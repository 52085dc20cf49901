"""Forgetting, measured: the table of ``docs/forgetting.md``.

SmolLM2-135M-Instruct is tuned hard on a narrow task, generative classification of THUCNews
headlines (``../shared/data/classification/thucnews_headlines``: the category names in the
prompt, the category as the answer), once per *variant*:

* ``naive``: the task alone;
* ``l2sp``, ``ewc``, ``distill``: the same run with ``objectives.<variant>`` (weights from the flags);
* ``replay``: ``objectives.replay`` with general instruction data (alpaca records
  ``0..--replay-records-1``) mixed into every step at ``--replay`` of its rows.

Every run has ``eval.forgetting``: the base and the tuned model on the THUCNews test headlines
(accuracy, Wilson interval), an MMLU subset (``--mmlu-limit`` questions round-robin over the
subjects, 0-shot letter log-likelihood, Wilson interval) and the held-out alpaca loss (records
900.. of ``alpaca_en_demo.json``, never used for replay; bootstrap interval). Changes carry a
paired bootstrap interval. The table reports both sides for each variant: the task gain kept
and the general ability lost, and for each regulariser the share of naive's general-ability
loss it recovered.

An objective that leaves no trace in the training metrics (``penalty`` for L2-SP / EWC, a
distillation term for distill) is flagged in the table: it did not act in this build.

Usage::

    python benchmarks/bench_forgetting.py --out docs/forgetting.md           # the standard budget
    python benchmarks/bench_forgetting.py --variants naive,replay --steps 40 --train 320 \\
        --task-test 100 --mmlu-limit 100 --general-limit 50                  # a few minutes
    python benchmarks/bench_forgetting.py --model tiny-random-llama --variants naive,replay \\
        --steps 2 --train 16 --task-test 8 --mmlu-limit 8 --general-limit 8  # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from docs_section import write_section  # benchmarks/docs_section.py, beside this script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
SHARED = REPO.parent / "shared" / "data"
ALPACA = SHARED / "instruct" / "llamafactory_demo" / "alpaca_en_demo.json"
THUCNEWS = SHARED / "classification" / "thucnews_headlines"
MMLU = SHARED / "benchmarks" / "mmlu" / "mmlu.zip"
RESULTS_DIR = REPO / "benchmarks" / "results"
GENERAL_START = 900  # alpaca records from here on are the held-out general set
MARK_START, MARK_END = "<!-- bench:forgetting:start -->", "<!-- bench:forgetting:end -->"
PROMPT = "Classify the news headline into one of these categories: {labels}.\n\nHeadline: {text}"
VARIANTS = ("naive", "l2sp", "ewc", "distill", "replay")


def _split_alpaca(workdir: Path, replay_records: int, general_limit: int) -> tuple[Path, Path]:
    """Alpaca records 0.. for replay and 900.. held out for the general loss (files in ``workdir``)."""
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    if replay_records > GENERAL_START:
        raise SystemExit(f"--replay-records {replay_records}: at most {GENERAL_START} (records {GENERAL_START}.. are held out)")
    replay, general = workdir / "alpaca_replay.json", workdir / "alpaca_heldout.json"
    replay.write_text(json.dumps(rows[:replay_records], ensure_ascii=False))
    general.write_text(json.dumps(rows[GENERAL_START : GENERAL_START + general_limit], ensure_ascii=False))
    return replay, general


def balanced_test(workdir: Path, n: int) -> Path:
    """The first ``n`` THUCNews test headlines taken round-robin over the classes (the file is sorted by
    class: its first rows are all one class, which would make the task metric one class's recall)."""
    by_label: dict[int, list[str]] = {}
    for line in (THUCNEWS / "test.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            by_label.setdefault(json.loads(line)["label"], []).append(line)
    picked, queues = [], [by_label[k] for k in sorted(by_label)]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    out = workdir / "thucnews_test_balanced.jsonl"
    out.write_text("\n".join(picked) + "\n", encoding="utf-8")
    return out


def variant_config(args, variant: str, replay_file: Path, general_file: Path) -> dict[str, Any]:
    objectives: dict[str, Any] = {}
    if variant == "l2sp":
        objectives["l2sp"] = {"weight": args.l2sp}
    elif variant == "ewc":
        objectives["ewc"] = {"weight": args.ewc, "data": [{"path": str(replay_file), "limit": args.ewc_samples}],
                             "samples": args.ewc_samples}
    elif variant == "distill":
        objectives["distill"] = {"weight": args.distill, "data": [{"path": str(replay_file)}]}
    elif variant == "replay":
        objectives["replay"] = {"data": [{"path": str(replay_file), "name": "alpaca"}], "ratio": args.replay}
    method = {"name": "full"} if args.method == "full" else {"name": "lora", "r": 16, "alpha": 32}
    return {
        "task": "generative_classification",
        "run": {"name": variant, "output_dir": str(args.workdir / "runs")},
        "model": {"path": args.model},
        "data": {"train": [{"path": str(THUCNEWS / "train.jsonl"), "limit": args.train}],
                 "eval": [{"path": str(balanced_test(args.workdir, args.task_test))}],
                 "max_length": args.max_length, "packing": False},
        "method": method,
        "classification": {"prompt": PROMPT},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_steps": args.steps,
                  "schedule": "constant", "warmup_steps": 0, "precision": args.precision, "seed": args.seed},
        "objectives": objectives,
        "eval": {"forgetting": {"benchmarks": [{"path": str(MMLU), "limit": args.mmlu_limit}],
                                "general": [str(general_file)], "general_limit": args.general_limit,
                                "batch_size": args.eval_batch_size, "max_length": args.max_length * 2}},
    }


def _acted(run_dir: Path, variant: str) -> bool:
    """Whether the objective left a trace in the train metrics (the build may lack its implementation)."""
    if variant in ("naive",):
        return True
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in rows if r.get("kind") == "train" for k in r}
    if variant == "replay":
        return any(k.startswith("loss/replay") for k in keys)
    if variant in ("l2sp", "ewc"):
        return "penalty" in keys or any(variant in k for k in keys)
    return any("distill" in k or "kl" in k.lower() for k in keys)


def run_variant(args, variant: str, replay_file: Path, general_file: Path) -> dict[str, Any]:
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.fsutil import atomic_write_text
    from tunelab.train.recipe import fine_tune

    cfg = variant_config(args, variant, replay_file, general_file)
    run_dir = args.workdir / "runs" / variant
    path = args.workdir / f"{variant}.yaml"
    import yaml

    atomic_write_text(path, yaml.safe_dump(cfg, allow_unicode=True))
    started = time.perf_counter()
    if not (run_dir / "forgetting.json").is_file():  # a finished variant is not re-run
        fine_tune(*load_config(path), resume=(run_dir / "config.yaml").is_file(), console=Console(quiet=args.quiet))
    doc = json.loads((run_dir / "forgetting.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"variant": variant, "objectives": cfg["objectives"], "acted": _acted(run_dir, variant),
            "seconds": round(time.perf_counter() - started, 1), "train_seconds": summary.get("train_seconds"),
            "measures": doc["measures"]}


# --------------------------------------------------------------------------- the table


def _m(row: dict, kind: str) -> dict | None:
    for m in row["measures"]:
        if (kind == "task" and m["kind"] == "task") or (kind == "benchmark" and m["kind"] == "benchmark") or (
                kind == "loss" and m["kind"] == "general_loss"):
            return m
    return None


def _pct(v):
    return "-" if v is None else f"{v:.1%}"


def _cell(m: dict | None, side: str) -> str:
    if not m or not m.get(side):
        return "-"
    s = m[side]
    if m["metric"] == "accuracy":
        return f"{s['value']:.1%} [{s['ci_low']:.1%}, {s['ci_high']:.1%}]"
    return f"{s['value']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _delta(m: dict | None) -> str:
    if not m or "change" not in m:
        return "-"
    lo, hi = m["change_ci"] or (None, None)
    if m["metric"] == "accuracy":
        return f"{m['change'] * 100:+.1f} pts [{lo * 100:+.1f}, {hi * 100:+.1f}]" if lo is not None else \
            f"{m['change'] * 100:+.1f} pts"
    return f"{m['change']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo is not None else f"{m['change']:+.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per variant, the task side and the general side (base value in the first row)."""
    naive = next((r for r in rows if r["variant"] == "naive"), None)
    first = rows[0]
    lines = [
        "| variant | THUCNews accuracy | task change | MMLU accuracy | MMLU change | alpaca loss (held out) | "
        "loss change | task gain kept | general loss recovered |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| base model | {_cell(_m(first, 'task'), 'base')} | | {_cell(_m(first, 'benchmark'), 'base')} | | "
        f"{_cell(_m(first, 'loss'), 'base')} | | | |",
    ]
    for r in rows:
        task, mmlu, loss = _m(r, "task"), _m(r, "benchmark"), _m(r, "loss")
        kept = recovered = "-"
        if naive is not None and r is not naive:
            nt, nl = _m(naive, "task"), _m(naive, "loss")
            if task and nt and nt.get("change"):
                kept = _pct(task["change"] / nt["change"])
            if loss and nl and nl.get("change"):
                recovered = _pct(1 - loss["change"] / nl["change"])
        name = r["variant"] + ("" if r["acted"] else " (objective did not act in this build)")
        lines.append(f"| {name} | {_cell(task, 'tuned')} | {_delta(task)} | {_cell(mmlu, 'tuned')} | {_delta(mmlu)} | "
                     f"{_cell(loss, 'tuned')} | {_delta(loss)} | {kept} | {recovered} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--method", default="full", choices=["full", "lora"])
    p.add_argument("--lr", type=float, default=1e-4, help="a high LR for full fine-tuning: the task is learnt hard")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--train", type=int, default=1200, help="THUCNews training headlines")
    p.add_argument("--task-test", type=int, default=300, help="THUCNews test headlines scored")
    p.add_argument("--mmlu-limit", type=int, default=300, help="MMLU questions (round-robin over subjects)")
    p.add_argument("--general-limit", type=int, default=100, help="held-out alpaca records (from record 900)")
    p.add_argument("--replay-records", type=int, default=500, help="alpaca records 0.. used as replay / reference data")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--l2sp", type=float, default=0.01, help="objectives.l2sp.weight")
    p.add_argument("--ewc", type=float, default=5000.0, help="objectives.ewc.weight")
    p.add_argument("--ewc-samples", type=int, default=256, help="alpaca samples for EWC's Fisher")
    p.add_argument("--distill", type=float, default=1.0, help="objectives.distill.weight")
    p.add_argument("--replay", type=float, default=0.25, help="objectives.replay.ratio")
    p.add_argument("--workdir", type=Path, default=None, help="runs and data files (default: a fresh folder under /tmp)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", type=Path, help="write the table into this markdown file between the bench:forgetting markers")
    p.add_argument("--quiet", action="store_true", help="no training output")
    args = p.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.workdir is None:
        import tempfile

        args.workdir = Path(tempfile.mkdtemp(prefix="bench-forgetting-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    replay_file, general_file = _split_alpaca(args.workdir, args.replay_records, args.general_limit)

    rows = []
    for v in variants:
        started = time.perf_counter()
        rows.append(run_variant(args, v, replay_file, general_file))
        print(f"{v:8s} {time.perf_counter() - started:7.1f} s", flush=True)

    budget = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "quiet")}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_json = args.results_dir / f"forgetting-{stamp}.json"
    out_json.write_text(json.dumps({"benchmark": "forgetting", "when": stamp, "budget": budget,
                                    "machine": platform.machine(), "cpus": os.cpu_count(), "results": rows}, indent=2))
    text = table(rows)
    print(text)
    print(f"results: {out_json}")
    if args.out:
        note = (f"\n_{args.model}, {args.method} fine-tuning at lr {args.lr:g}, {args.steps} steps x {args.batch_size} x "
                f"{args.grad_accum} rows, {args.train} THUCNews headlines ({args.task_test} test headlines scored, round-robin over the classes), MMLU {args.mmlu_limit} "
                f"questions 0-shot, {args.general_limit} held-out alpaca records; 95% intervals (Wilson / bootstrap; "
                f"changes: paired bootstrap); `benchmarks/results/{out_json.name}`_\n\n")
        if not write_section(args.out, MARK_START, MARK_END, note + text + "\n"):
            print(f"{args.out}: no {MARK_START} ... {MARK_END} markers; table not written", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
