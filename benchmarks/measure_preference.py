"""Preference tuning of SmolLM2-135M-Instruct, measured (issue #19; the table in docs/preference.md).

``dpo_en_demo.json`` (300 pairs) is split 250 / 50 with a seeded shuffle (seed 0). On the 250, one
epoch of LoRA (r 16, alpha 32, all linear layers, lr 5e-5, cosine, 2 pairs x 4 accumulation, max
length 512, the config's default precision) with each of:

* ``dpo`` (beta 0.1), ``orpo`` (beta 0.1), ``simpo`` (beta 2.0, gamma 0.5);
* ``dpo`` + ``objectives.l2sp`` (the trade-off: less drift from the base for less gain);
* ``task: reward`` (a scalar head, Bradley-Terry).

Every run goes through the CLI, as a user runs it: ``tunelab train`` (with ``eval.forgetting``:
held-out pair accuracy and the mean assistant-token loss on 100 alpaca records never trained on,
base and tuned, with paired intervals) and ``tunelab eval RUN --data heldout.json`` (pair accuracy
summed and per token, mean margins); every evaluation in bf16. The base model is scored the same way (``tunelab eval
smollm2-135m-instruct``). Figures go to ``benchmarks/results/preference-quality-<stamp>.json`` and,
with ``--out``, between the ``bench:preference-quality`` markers of a markdown file.

Usage::

    python benchmarks/measure_preference.py --out docs/preference.md      # about 30 min on 2 cores
    python benchmarks/measure_preference.py --runs dpo,reward --limit 40  # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_micro_threads import matmul_gflops  # noqa: E402 - benchmarks/, beside this script
from docs_section import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PAIRS = SHARED / "preference" / "llamafactory_demo" / "dpo_en_demo.json"
GENERAL = SHARED / "instruct" / "llamafactory_demo" / "alpaca_en_demo.json"
RESULTS_DIR = REPO / "benchmarks" / "results"
MARK_START, MARK_END = "<!-- bench:preference-quality:start -->", "<!-- bench:preference-quality:end -->"
MODEL = "smollm2-135m-instruct"
BASE_NAMES = {MODEL: "SmolLM2-135M-Instruct"}

LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
TRAIN = {"lr": 5.0e-5, "schedule": "cosine", "warmup_ratio": 0.1, "batch_size": 2, "grad_accum": 4, "epochs": 1,
         "seed": 0}
RUNS = {
    "dpo": {"task": "preference", "preference": {"loss": "dpo", "beta": 0.1}},
    "orpo": {"task": "preference", "preference": {"loss": "orpo", "beta": 0.1}},
    "simpo": {"task": "preference", "preference": {"loss": "simpo", "beta": 2.0, "gamma": 0.5}},
    "dpo+l2sp": {"task": "preference", "preference": {"loss": "dpo", "beta": 0.1},
                 "objectives": {"l2sp": {"weight": 1.0}}},
    "reward": {"task": "reward", "train": {"lr": 1.0e-4}},
}


def split(work: Path, limit: int | None) -> tuple[Path, Path]:
    pairs = json.loads(PAIRS.read_text())
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    train, held = [pairs[i] for i in order[:250]], [pairs[i] for i in order[250:300]]
    if limit:
        train, held = train[:limit], held[: max(10, limit // 5)]
    paths = work / "train.json", work / "heldout.json"
    for path, rows in zip(paths, (train, held), strict=True):
        path.write_text(json.dumps(rows, ensure_ascii=False))
    return paths


def cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"tunelab {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def pair_scores(target: str, held: Path, out: Path) -> dict:
    # the runs' max length (a run's own eval uses it; the alias's default would truncate replies differently)
    cli("eval", target, "--data", str(held), "--task", "preference", "--dtype", "bfloat16", "--max-length", "512",
        "--out", str(out))
    doc = json.loads(next(out.glob("*.json")).read_text())
    system = doc["systems"]
    return next(iter(system.values())) if "pair_accuracy" not in system else system


def train(name: str, spec: dict, work: Path, train_file: Path, held: Path, model: str = MODEL) -> dict:
    cfg = {
        "task": spec["task"], "run": {"name": name.replace("+", "-"), "output_dir": str(work / "runs")},
        "model": {"path": model},
        "data": {"train": [{"path": str(train_file)}], "eval": [{"path": str(held)}], "max_length": 512},
        "method": LORA, "train": {**TRAIN, **spec.get("train", {})},
        **{k: v for k, v in spec.items() if k in ("preference", "objectives")},
    }
    if spec["task"] == "preference":
        cfg["eval"] = {"dtype": "bfloat16", "forgetting": {"general": [str(GENERAL)], "general_limit": 100}}
    path = work / f"{cfg['run']['name']}.json"
    path.write_text(json.dumps(cfg))
    started = time.perf_counter()
    cli("train", str(path))
    wall = time.perf_counter() - started
    run = work / "runs" / cfg["run"]["name"]
    summary = json.loads((run / "summary.json").read_text())
    out = {"run": name, "wall_s": round(wall, 1), "train_s": summary.get("train_seconds"),
           "tokens_per_s": summary.get("tokens_per_s"), "peak_rss_mib": summary.get("peak_rss_mib"),
           "scores": pair_scores(str(run), held, work / "eval" / cfg["run"]["name"])}
    forgetting = run / "forgetting.json"
    if forgetting.is_file():
        out["forgetting"] = json.loads(forgetting.read_text())
    return out


def _metrics(system: dict) -> dict:
    """A system's metrics in an eval JSON (``{"metrics": {...}}``)."""
    return system.get("metrics", system)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _general(r: dict) -> tuple[str, str]:
    """The general-loss change and its verdict from forgetting.json."""
    for m in (r.get("forgetting") or {}).get("measures", []):
        if m.get("kind") == "general_loss" and m.get("base") and m.get("tuned"):
            ci = m.get("change_ci")
            verdict = ("within noise" if not m.get("significant") else "better" if m.get("better") else "worse")
            interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
            return (f"{_num(m['base']['value'])} → {_num(m['tuned']['value'])}",
                    f"{m['change']:+.3f}{interval}, {verdict}")
    return "-", "-"


def markdown(result: dict) -> str:
    head = ("model", "pair acc. (sum)", "pair acc. (per token)", "mean margin (sum)", "mean margin (per token)",
            "general loss base → tuned", "change", "train time", "tokens/s")
    base = _metrics(result["base"])
    lines = ["", f"Measured {result['timestamp']} on {result['machine']} (host matmul bf16 "
             f"{result['host_gflops']['bf16']} / fp32 {result['host_gflops']['fp32']} GFLOP/s, all cores) with "
             f"`python benchmarks/measure_preference.py {' '.join(result['argv'])}`; result file "
             f"`{result['result_file']}`. Held-out: {result['held_out']} pairs; general loss: 100 alpaca records; "
             "margins in log-probability (nats) for the causal LMs, in score units for the reward model.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
             f"| base ({BASE_NAMES.get(result.get('model', MODEL), result.get('model'))}) | "
             f"{_pct(base.get('pair_accuracy'))} | "
             f"{_pct(base.get('pair_accuracy_normalised'))} | {_num(base.get('margin'))} | "
             f"{_num(base.get('margin_normalised'))} | - | - | - | - |"]
    for r in result["runs"]:
        s = _metrics(r["scores"])
        general, change = _general(r)
        lines.append(f"| {r['run']} | {_pct(s.get('pair_accuracy'))} | {_pct(s.get('pair_accuracy_normalised'))} | "
                     f"{_num(s.get('margin'))} | {_num(s.get('margin_normalised'))} | {general} | {change} | "
                     f"{r['train_s'] or 0:.0f} s | {r['tokens_per_s'] or 0:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--limit", type=int, help="train on this many pairs only (a quick look; not for the docs)")
    p.add_argument("--out", type=Path, help="write the table into this markdown file (bench:preference-quality)")
    p.add_argument("--from-json", type=Path, help="no runs: write the table of an earlier result file")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the result JSON goes")
    p.add_argument("--model", default=MODEL, help="the base model (alias or folder; the docs' table: the default)")
    a = p.parse_args()
    if a.from_json is not None:
        result = json.loads(a.from_json.read_text())
        print(markdown(result))
        if a.out is not None:
            write_section(a.out, MARK_START, MARK_END, markdown(result), append=True)
        return
    gflops = matmul_gflops(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="tunelab-pref-quality-") as tmp:
        work = Path(tmp)
        train_file, held = split(work, a.limit)
        held_out = len(json.loads(held.read_text()))
        base = pair_scores(a.model, held, work / "eval" / "base")
        print(f"[measure] base: {base}", flush=True)
        runs = []
        for name in a.runs.split(","):
            runs.append(train(name, RUNS[name], work, train_file, held, a.model))
            print(f"[measure] {name}: {runs[-1]['scores']} in {runs[-1]['wall_s']} s", flush=True)
    stamp = dt.datetime.now(dt.timezone.utc)
    a.results_dir.mkdir(parents=True, exist_ok=True)
    result_file = a.results_dir / f"preference-quality-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    result = {"timestamp": stamp.strftime("%Y-%m-%d %H:%M UTC"), "argv": sys.argv[1:], "host_gflops": gflops,
              "machine": f"{os.cpu_count()} CPUs", "held_out": held_out, "model": a.model, "base": base,
              "runs": runs, "result_file": str(result_file.resolve().relative_to(REPO)
                                               if result_file.resolve().is_relative_to(REPO) else result_file)}
    result_file.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    if a.out is not None and not a.limit and a.model == MODEL:
        write_section(a.out, MARK_START, MARK_END, markdown(result), append=True)


if __name__ == "__main__":
    main()
