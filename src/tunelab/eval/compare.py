"""``tunelab compare``: a paired A/B comparison of two runs (or models) on the same examples.

Both systems are scored on the same examples (:func:`tunelab.eval.evaluate.evaluate`), the
per-example scores are paired by example id, and :func:`paired_test` reports

* the difference B - A of the mean score with a paired-bootstrap confidence interval
  (examples resampled with replacement, the same resample for A and B);
* a p-value: McNemar's exact test when the scores are right/wrong (classification, benchmark
  questions; scipy's binomial test on the discordant pairs), else the paired bootstrap's
  two-sided p-value (the share of resampled differences of the centred data at least as
  extreme as the observed one);
* the examples where the two disagree;
* on classification data, the TF-IDF + logistic-regression baseline
  (:mod:`tunelab.eval.classical`, trained on run A's training split, else run B's, or on
  ``--train FILE``) scored on the same examples, and each of A and B tested against it the same
  way (``baseline`` in the result).

The result is written to ``<run A>/eval/compare-<A>-vs-<B>-<source>.json``; ``tunelab
report`` shows it.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunelab.errors import UserError
from tunelab.eval.classical import BASELINE
from tunelab.eval.metrics import paired_test
from tunelab.fsutil import atomic_write_text

__all__ = ["compare", "paired_test"]


def _examples(doc: dict[str, Any], system: str) -> dict[str, dict]:
    """One system's rows of an evaluation's examples file, by example id."""
    path = Path(str(doc["path"])[: -len(".json")] + ".examples.jsonl")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {r["id"]: r for r in rows if r.get("system", system) == system}


def _is_run(target: str | Path) -> bool:
    p = Path(target)
    return (p / "config.yaml").is_file() or (p / "tunelab.json").is_file() and (p.parent / "config.yaml").is_file()


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
    # the TF-IDF baseline is scored once, beside the target whose training data it can be fitted on
    fit_on = "a" if req.train or _is_run(target_a) else "b" if _is_run(target_b) else None
    docs_a = evaluate(target_a, replace(req, tfidf=fit_on == "a", train=req.train if fit_on == "a" else None),
                      checkpoint=checkpoint, out_dir=scratch / f"compare-{name_a}", console=console)
    docs_b = evaluate(target_b, replace(req, tfidf=fit_on == "b", train=req.train if fit_on == "b" else None),
                      checkpoint=checkpoint, out_dir=scratch / f"compare-{name_b}", console=console)
    results = []
    for da, db in zip(docs_a, docs_b, strict=True):
        sys_a, sys_b = next(iter(da["systems"])), next(iter(db["systems"]))
        ea, eb = _examples(da, sys_a), _examples(db, sys_b)
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
        baseline = _baseline(da if fit_on == "a" else db if fit_on == "b" else None, ea, eb, ids)
        if baseline is not None:
            doc["baseline"] = baseline
        path = scratch / f"compare-{name_a}-vs-{name_b}-{da['name']}.json"
        atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        doc["path"] = str(path)
        results.append(doc)
        _print(doc, console)
    return results


def _baseline(doc: dict | None, ea: dict[str, dict], eb: dict[str, dict], ids: list[str]) -> dict[str, Any] | None:
    """The TF-IDF baseline's figures on the paired examples and A's and B's paired tests against it (difference =
    the system's accuracy - the baseline's)."""
    if doc is None or BASELINE not in doc["systems"]:
        return None
    eo = _examples(doc, BASELINE)
    both = [i for i in ids if i in eo]
    if not both:
        return None
    base = [eo[i]["score"] for i in both]
    return {"name": BASELINE, "description": doc["systems"][BASELINE]["description"],
            "headline": doc["systems"][BASELINE]["headline"],
            "a": paired_test(base, [ea[i]["score"] for i in both], binary=True),
            "b": paired_test(base, [eb[i]["score"] for i in both], binary=True)}


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
    if doc.get("baseline"):
        b = doc["baseline"]
        base_table = Table(title=f"against {b['name']}: {b['description']}")
        for col in ("system", "accuracy", f"{b['name']}", "system - baseline", f"{doc['confidence']:.0%} CI", "p"):
            base_table.add_column(col, justify="right")
        for side in ("a", "b"):
            t = b[side]
            base_table.add_row(side.upper(), f"{t['mean_b']:.4f}", f"{t['mean_a']:.4f}", f"{t['difference']:+.4f}",
                               f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]", f"{t['p_value']:.3g}")
        console.print(base_table)
    verdict = "significant" if doc["significant"] else "not significant"
    console.print(f"A = {doc['a']['target']}, B = {doc['b']['target']}: the difference is [bold]{verdict}[/] "
                  f"at the {1 - doc['confidence']:.2f} level. Written: {doc['path']}")
