"""The classification recipes of ``tunelab advise`` against TF-IDF + LR on the three shared sets.

For each shared set (``../shared/data/classification/{thucnews_headlines,chnsenticorp_htl,sst2}``,
their own train / test files) this trains the recipe that ``tunelab.search.recipes.recipe_for``
picks for the set's shape (the same sections ``tunelab advise`` prints), scores it on the whole
test file, and puts it beside:

* TF-IDF + logistic regression (``tunelab.eval.classical``: character 1-3-grams for Chinese,
  word 1-2-grams otherwise) trained on the same training rows and scored on the same test rows;
* the base SmolLM2-135M-Instruct asked zero-shot (``tunelab eval --baselines``' ``base 0-shot``:
  the classification prompt, greedy answer parsed to a label) on the first ``--zero-shot-rows``
  test rows (generation is the slow part; 0 skips it).

The figures: accuracy, macro-F1, the loop's training time (``summary.json`` ``train_seconds``) and
the whole ``fine_tune`` wall time, and the host's bf16 / fp32 matmul GFLOP/s before and after.

Usage::

    python benchmarks/bench_recipes.py                       # every set, prints a markdown table
    python benchmarks/bench_recipes.py --sets sst2 --zero-shot-rows 0 --out results.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml
from bench_micro_threads import matmul_gflops

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "classification"
SETS = ("thucnews_headlines", "chnsenticorp_htl", "sst2")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tfidf(train: list[dict], test: list[dict]) -> dict:
    from tunelab.eval.classical import TrainingText, fit_baseline
    from tunelab.eval.metrics import classification_metrics

    started = time.perf_counter()
    pipe, settings = fit_baseline(TrainingText([r["text"] for r in train], [str(r["label_text"]) for r in train],
                                               "train.jsonl"))
    pred = [str(p) for p in pipe.predict([r["text"] for r in test])]
    labels = sorted({str(r["label_text"]) for r in train})
    m = classification_metrics([str(r["label_text"]) for r in test], pred, labels)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "seconds": round(time.perf_counter() - started, 1),
            "features": settings["features"]}


def train_recipe(name: str, recipe, folder: Path, workdir: Path, threads: int | None) -> tuple[dict, Path]:
    from tunelab.config import load_config
    from tunelab.search.recipes import recipe_sections
    from tunelab.train.recipe import fine_tune

    cfg = recipe_sections(recipe)
    cfg["run"] = {"name": name, "output_dir": str(workdir)}
    # the reader takes `label_text` (the class name) over the integer `label`
    cfg["data"] = {**cfg["data"], "train": [{"path": str(folder / "train.jsonl")}],
                   "eval": [{"path": str(folder / "test.jsonl")}]}
    cfg["train"] = {"seed": 0, "eval_every": 0, "save_every": 0, **cfg["train"],
                    **({"threads": threads} if threads else {})}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.perf_counter()
    out = fine_tune(*load_config(path))
    wall = time.perf_counter() - started
    m = out.summary["eval_metrics"]
    return ({"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "test_rows": m["n"],
             "train_seconds": out.summary["train_seconds"], "wall_seconds": round(wall, 1),
             "steps": out.summary["step"], "config": cfg}, out.run_dir)


def zero_shot(run_dir: Path, folder: Path, rows: int) -> dict | None:
    from tunelab.eval.evaluate import EvalRequest, evaluate

    req = EvalRequest(data=[str(folder / "test.jsonl")], limit=rows, baselines=True, few_shot=0, tfidf=False,
                      labels=None, modes=("generated",))
    doc = evaluate(run_dir, req, out_dir=run_dir / "zero_shot")[0]
    base = doc["systems"].get("base 0-shot")
    return None if base is None else {"accuracy": base["metrics"]["accuracy"], "rows": rows,
                                      "macro_f1": base["metrics"].get("macro_f1")}


def main() -> None:
    from tunelab.search.recipes import recipe_for, shape_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--zero-shot-rows", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {"host_before": matmul_gflops(args.threads or 2), "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            folder = SHARED / name
            train, test = read(folder / "train.jsonl"), read(folder / "test.jsonl")
            shape = shape_of([r["text"] for r in train], [str(r["label_text"]) for r in train])
            recipe = recipe_for(shape)
            row = {"shape": shape.describe(), "tfidf": tfidf(train, test), "recipe": recipe.name if recipe else None}
            if recipe is not None and recipe.model is not None:  # a TF-IDF recipe trains nothing
                row["tuned"], run_dir = train_recipe(name, recipe, folder, Path(tmp), args.threads)
                if args.zero_shot_rows:
                    row["zero_shot"] = zero_shot(run_dir, folder, args.zero_shot_rows)
            results["sets"][name] = row
            print(json.dumps({name: row}, default=str))
    results["host_after"] = matmul_gflops(args.threads or 2)
    print("| set | shape | TF-IDF + LR | base 0-shot | recipe | tuned | macro-F1 | training time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["sets"].items():
        t, z = r.get("tuned") or {}, r.get("zero_shot") or {}
        zero = "{:.1%} ({} rows)".format(z["accuracy"], z["rows"]) if z else "-"
        tuned = ("{:.1%}".format(t["accuracy"]), "{:.3f}".format(t["macro_f1"]),
                 "{:.1f} min".format(t["train_seconds"] / 60)) if t else ("-", "-", "-")
        print(f"| {name} | {r['shape']} | {r['tfidf']['accuracy']:.1%} | {zero} | {r['recipe'] or '-'} | "
              + " | ".join(tuned) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
