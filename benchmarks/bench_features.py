"""Head training on a frozen encoder: the backbone in every epoch vs cached features vs scikit-learn's LR.

Three runs of ``task: classification``, ``method: head`` (linear head, ``unfreeze_top: 0``) on the same
rows, fp32, one after the other in this process:

* ``backbone in the loop``: ``method.cache_features: false``, every epoch runs the encoder;
* ``cached features``: the default; the features are computed once (``features_seconds``, from
  ``env.json``; read back from the cache when an earlier run made them) and the epochs run the head only;
* ``sklearn LR``: ``method.fit: sklearn`` on the same cached features, no training loop.

The figures: the loop's time (``summary.json`` ``train_seconds``) and its time per epoch, the feature
time, the whole ``fine_tune`` wall time, and the accuracy of the last evaluation. The feature cache
lives in a temporary folder (``TUNELAB_CACHE`` is left alone: the model alias stays where it is), so the
first cached run always computes the features.

Usage::

    python benchmarks/bench_features.py --quick      # tiny-random-llama on 64 synthetic rows: seconds
    python benchmarks/bench_features.py --data ../shared/data/classification/chnsenticorp_htl \\
        --model all-minilm-l6-v2 --train-rows 2000 --eval-rows 500 --epochs 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "classification"


def synthetic(path: Path, n: int, seed: int) -> Path:
    """A learnable two-class file: the last word is a colour or an animal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["colour", "animal"])
        word = rng.choice(["red", "blue", "green"] if label == "colour" else ["cat", "dog", "horse"])
        rows.append({"text": " ".join([rng.choice(["the", "a", "old", "we", "saw"]) for _ in range(4)] + [word]),
                     "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RUNS = {
    "backbone in the loop": {"cache_features": False},
    "cached features": {},
    "sklearn LR": {"fit": "sklearn"},
}


def one_run(name: str, method: dict, args, train: Path, test: Path, workdir: Path) -> dict:
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    cfg = {
        "task": "classification",
        "run": {"name": name.split(" ")[0], "output_dir": str(workdir / "runs")},
        "model": {"path": args.model},
        "data": {"train": [{"path": str(train), "limit": args.train_rows}],
                 "eval": [{"path": str(test), "limit": args.eval_rows}], "max_length": args.max_length},
        "method": {"name": "head", "dropout": 0.0, **method},
        "train": {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size, "precision": "fp32",
                  "seed": 0, "schedule": "constant", "eval_every": 0},
    }
    path = workdir / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config, sources = load_config(path)
    started = time.perf_counter()
    out = fine_tune(config, sources)
    wall = time.perf_counter() - started
    env = json.loads((out.run_dir / "env.json").read_text())
    features = env.get("features") or {}
    m = out.summary.get("eval_metrics", {})
    train_s = out.summary["train_seconds"]
    return {"run": name, "model": args.model, "train_rows": args.train_rows, "epochs": args.epochs,
            "steps": out.summary["step"], "train_seconds": train_s,
            "seconds_per_epoch": round(train_s / args.epochs, 3) if out.summary["step"] else None,
            "features_seconds": features.get("seconds"), "features_from_cache": features.get("from_cache"),
            "wall_seconds": round(wall, 2), "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-random-llama on 64 synthetic rows (seconds)")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--data", type=Path, default=SHARED / "chnsenticorp_htl",
                        help="a folder with train.jsonl and test.jsonl")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from tunelab.models import features

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            args.model, args.train_rows, args.eval_rows, args.epochs, args.max_length = "tiny-random-llama", 64, 32, 2, 32
            train, test = synthetic(work / "train.jsonl", 64, 0), synthetic(work / "test.jsonl", 32, 1)
        else:
            train, test = args.data / "train.jsonl", args.data / "test.jsonl"
        features.cache_dir = lambda: work / "feature-cache"  # a cold feature cache for the first cached run
        results = [one_run(name, method, args, train, test, work) for name, method in RUNS.items()]

    print(f"{args.model}, {args.train_rows} training rows, {args.eval_rows} evaluation rows, {args.epochs} epochs, "
          f"max_length {args.max_length}, batch {args.batch_size}, fp32")
    print("| run | steps | loop time | per epoch | features | fine_tune wall time | accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        per = f"{r['seconds_per_epoch']:.3f} s" if r["seconds_per_epoch"] is not None else "-"
        feats = "-" if r["features_seconds"] is None else (
            f"{r['features_seconds']:.2f} s" + (" (cache)" if r["features_from_cache"] else ""))
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        print(f"| {r['run']} | {r['steps']} | {r['train_seconds']:.2f} s | {per} | {feats} | {r['wall_seconds']:.2f} s | "
              f"{acc} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
