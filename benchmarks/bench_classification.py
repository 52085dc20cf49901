"""all-MiniLM-L6-v2 on SST-2: a head on the frozen encoder vs full fine-tuning.

The figure in docs/tasks.md: ``task: classification`` on the ``all-minilm-l6-v2`` alias (mean
pooling), the first ``--train-rows`` rows of ``../shared/data/classification/sst2/train.jsonl``,
scored on all 872 rows of ``test.jsonl`` (the GLUE validation split) after training. Accuracy
and macro-F1 come from the run's last evaluation; the time is the loop's training time
(``summary.json`` ``train_seconds``) and the whole ``fine_tune`` call's wall time.

Usage::

    python benchmarks/bench_classification.py                 # both runs, prints a markdown table
    python benchmarks/bench_classification.py --train-rows 256 --out benchmarks/results/classification_minilm.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "classification" / "sst2"

RUNS = {
    "head (frozen encoder, linear head)": {"method": {"name": "head", "dropout": 0.0},
                                           "train": {"lr": 1e-2, "epochs": 5, "batch_size": 32}},
    "full fine-tuning": {"method": {"name": "full"},
                         "train": {"lr": 5e-5, "epochs": 3, "batch_size": 16, "warmup_ratio": 0.1}},
}


def one_run(name: str, spec: dict, train_rows: int, workdir: Path) -> dict:
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    cfg = {
        "task": "classification",
        "run": {"name": name.split(" ")[0], "output_dir": str(workdir)},
        "model": {"path": "all-minilm-l6-v2"},
        "data": {"train": [{"path": str(SST2 / "train.jsonl"), "limit": train_rows}],
                 "eval": [{"path": str(SST2 / "test.jsonl")}], "max_length": 128},
        "method": spec["method"],
        "train": {"precision": "fp32", "seed": 0, "schedule": "linear", **spec["train"]},
    }
    path = workdir / f"{cfg['run']['name']}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    config, sources = load_config(path)
    started = time.perf_counter()
    out = fine_tune(config, sources)
    wall = time.perf_counter() - started
    m = out.summary["eval_metrics"]
    return {"run": name, "train_rows": train_rows, "eval_rows": m["n"], "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"], "steps": out.summary["step"], "train_seconds": out.summary["train_seconds"],
            "wall_seconds": round(wall, 1), "trainable_parameters": sum(
                p.numel() for p in out.model.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--only", choices=["head", "full"], default=None, help="run only one of the two")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in RUNS.items():
            if args.only is None or name.startswith(args.only):
                results.append(one_run(name, spec, args.train_rows, Path(tmp)))
    print("| run | trained parameters | steps | accuracy | macro-F1 | train time | fine_tune wall time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['run']} | {r['trainable_parameters']:,} | {r['steps']} | {r['accuracy']:.4f} | "
              f"{r['macro_f1']:.4f} | {r['train_seconds']:.1f} s | {r['wall_seconds']:.1f} s |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
