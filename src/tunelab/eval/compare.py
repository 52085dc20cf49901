"""``tunelab compare``: a paired A/B comparison of two runs (or models) on the same examples.

Both systems are scored on the same examples (:func:`tunelab.eval.evaluate.evaluate`), the
per-example scores are paired by example id, and :func:`paired_test` reports

* the difference B - A of the mean score with a paired-bootstrap confidence interval
  (examples resampled with replacement, the same resample for A and B);
* a p-value: McNemar's exact test when the scores are right/wrong (classification, benchmark
  questions; scipy's binomial test on the discordant pairs), else the paired bootstrap's
  two-sided p-value (the share of resampled differences of the centred data at least as
  extreme as the observed one);
* the examples where the two disagree.

The result is written to ``<run A>/eval/compare-<A>-vs-<B>-<source>.json``; ``tunelab
report`` shows it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.stats import binomtest

from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_text

__all__ = ["compare", "paired_test"]


def paired_test(a: list[float], b: list[float], *, binary: bool | None = None, n_resamples: int = 5000,
                confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired difference ``mean(b) - mean(a)`` with a bootstrap interval and a p-value (see the module docstring)."""

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise UserError(f"compare: need the same, non-zero number of paired scores (got {x.size} and {y.size})")
    if binary is None:
        binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    d = y - x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_resamples, d.size))
    boot = d[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    out: dict[str, Any] = {"n": int(d.size), "mean_a": float(x.mean()), "mean_b": float(y.mean()),
                           "difference": float(d.mean()), "ci_low": float(np.quantile(boot, alpha)),
                           "ci_high": float(np.quantile(boot, 1 - alpha)), "confidence": confidence}
    if binary:
        b_only = int(((x == 0) & (y == 1)).sum())  # B right, A wrong
        a_only = int(((x == 1) & (y == 0)).sum())
        p = 1.0 if a_only + b_only == 0 else float(binomtest(b_only, a_only + b_only, 0.5).pvalue)
        out.update(test="mcnemar-exact", a_only_correct=a_only, b_only_correct=b_only, p_value=p)
    else:
        centred = (d - d.mean())[idx].mean(axis=1)
        p = float((np.abs(centred) >= abs(d.mean()) - 1e-12).mean())
        out.update(test="paired-bootstrap", p_value=max(p, 1.0 / n_resamples))
    out["significant"] = out["p_value"] < 1 - confidence
    return out


def _examples(doc: dict[str, Any]) -> dict[str, dict]:
    path = Path(str(doc["path"])[: -len(".json")] + ".examples.jsonl")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {r["id"]: r for r in rows}


def _disagree(ra: dict, rb: dict) -> bool:
    for key in ("generated", "constrained", "head", "pred", "prediction"):
        if key in ra or key in rb:
            return ra.get(key) != rb.get(key)
    return ra["score"] != rb["score"]


def compare(target_a: str | Path, target_b: str | Path, req, *, checkpoint: str = "final",
            out: str | Path | None = None, max_examples: int = 50, console: Console | None = None) -> list[dict]:
    """Score both targets on ``req``'s data sources, then test each source's paired difference."""
    from tunelab.eval.evaluate import evaluate, slug

    console = console or Console()
    if req.baselines:
        raise UserError("compare: --baselines does not apply; compare two runs, or a run with its base model")
    name_a, name_b = slug(Path(str(target_a)).name), slug(Path(str(target_b)).name)
    if name_a == name_b:
        name_b += "-b"
    scratch = Path(out) if out else (Path(target_a) / "eval" if (Path(target_a) / "config.yaml").is_file()
                                     else Path("eval_results"))
    docs_a = evaluate(target_a, req, checkpoint=checkpoint, out_dir=scratch / f"compare-{name_a}", console=console)
    docs_b = evaluate(target_b, req, checkpoint=checkpoint, out_dir=scratch / f"compare-{name_b}", console=console)
    results = []
    for da, db in zip(docs_a, docs_b, strict=True):
        ea, eb = _examples(da), _examples(db)
        ids = [i for i in ea if i in eb]
        test = paired_test([ea[i]["score"] for i in ids], [eb[i]["score"] for i in ids],
                           binary=da["task"] in ("classification", "benchmark"))
        metric = {"classification": "accuracy", "benchmark": "accuracy", "generation": "token F1",
                  "lm": "mean token loss (lower is better)"}[da["task"]]
        disagreements = [{"id": i, "reference": ea[i].get("reference", ea[i].get("answer")),
                          "a": _shown(ea[i]), "b": _shown(eb[i]), "score_a": ea[i]["score"], "score_b": eb[i]["score"]}
                         for i in ids if _disagree(ea[i], eb[i])]
        doc = {"source": da["source"], "name": da["name"], "task": da["task"], "metric": metric,
               "a": {"target": str(target_a), "name": name_a, "headline": next(iter(da["systems"].values()))["headline"]},
               "b": {"target": str(target_b), "name": name_b, "headline": next(iter(db["systems"].values()))["headline"]},
               "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **test,
               "n_disagree": len(disagreements), "disagreements": disagreements[:max_examples]}
        path = scratch / f"compare-{name_a}-vs-{name_b}-{da['name']}.json"
        atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        doc["path"] = str(path)
        results.append(doc)
        _print(doc, console)
    return results


def _shown(row: dict) -> Any:
    for key in ("generated", "constrained", "head", "pred", "prediction"):
        if key in row:
            return row[key]
    return row["score"]


def _print(doc: dict, console: Console) -> None:
    table = Table(title=f"A/B on {doc['name']} ({doc['n']} paired examples, {doc['metric']})")
    for col in ("A", "B", "B - A", f"{doc['confidence']:.0%} CI", "p", "test", "disagree"):
        table.add_column(col, justify="right")
    table.add_row(f"{doc['mean_a']:.4f}", f"{doc['mean_b']:.4f}", f"{doc['difference']:+.4f}",
                  f"[{doc['ci_low']:+.4f}, {doc['ci_high']:+.4f}]", f"{doc['p_value']:.3g}", doc["test"],
                  str(doc["n_disagree"]))
    console.print(table)
    verdict = "significant" if doc["significant"] else "not significant"
    console.print(f"A = {doc['a']['target']}, B = {doc['b']['target']}: the difference is [bold]{verdict}[/] "
                  f"at the {1 - doc['confidence']:.2f} level. Written: {doc['path']}")
