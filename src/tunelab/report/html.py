"""``tunelab report RUN [RUN ...]``: one self-contained HTML page (and a Markdown twin) per report.

Everything is read from the run directories (and, for a run made by ``tunelab demo``, the
demo's ``results.json`` and ``generations.jsonl`` two folders up):

1. before vs after: the headline metrics of every system (base 0-shot, base k-shot, the TF-IDF
   + logistic-regression baseline ``tfidf-lr``, tuned) of every evaluation in ``eval/``, with one
   plain sentence saying whether the tuned model beats the TF-IDF baseline and by how many
   points (``versus_baseline``), and the demo's base/tuned figures;
2. the runs side by side when there are several;
3. per run: config and data summary; train/validation loss and LR curves
   (``metrics.jsonl``); training's own evaluation of a classification run (``summary.json``:
   accuracy, macro-F1, per-class table, confusion matrix); a preference or reward run's pair metrics
   (``metrics.jsonl``: margin and pair accuracy over the steps, train and validation, and the last
   values of every pair metric); confusion matrix and per-class F1 of classification evaluations;
   the forgetting table (benchmarks scored on the base and the tuned model: overall and per
   category); A/B results (``eval/compare-*.json``); sample generations side by side.

The report is built once as a list of sections of blocks (text, table, image) and rendered
twice: HTML (jinja2, figures embedded as base64 PNG, no external file or script) and Markdown
(figures written beside it in ``<name>_files/``).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from tunelab import metrics_log
from tunelab.errors import UserError, require
from tunelab.fsutil import atomic_write_bytes, atomic_write_text
from tunelab.report import plots
from tunelab.rundocs import (
    PAIR_METRICS,
    TRADEOFF_HEADERS,
    baseline_verdict,
    fmt_change,
    pair_history,
    run_row,
    tradeoff_rows,
    trained_evaluations,
)

__all__ = ["build_report", "write_report"]


@dataclass
class Block:
    kind: str  # text | table | image | note
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    png: bytes = b""
    name: str = ""


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


# --------------------------------------------------------------------------- reading a run


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _evaluations(run: Path) -> tuple[list[dict], list[dict]]:
    """(evaluation results, A/B comparisons) in ``run/eval`` (and its compare-*/ folders)."""
    evals, comps = [], []
    folder = run / "eval"
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        doc = _json(f)
        if not isinstance(doc, dict):
            continue
        doc["path"] = str(f)
        if "p_value" in doc:
            comps.append(doc)
        elif "systems" in doc:
            evals.append(doc)
    return evals, comps


def demo_results(run: Path) -> tuple[dict | None, list[dict]]:
    """The demo's ``results.json`` (and generations) when ``run`` is the demo's run."""
    for folder in (run.parent.parent, run.parent):
        res = _json(folder / "results.json")
        if isinstance(res, dict) and "base" in res and "tuned" in res:
            named = Path(str(res.get("run_dir", ""))).name
            if named in ("", run.name):
                return res, _jsonl(folder / "generations.jsonl")
    return None, []


# --------------------------------------------------------------------------- formatting


_PERCENT = {"accuracy", "macro_f1", "micro_f1", "weighted_f1", "exact_match", "f1", "token_accuracy", "rouge1",
            "rouge2", "rougeL", "constrained_accuracy", "ci_low", "ci_high", "precision", "recall", "unparsed_rate"}


def fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if key in ("accuracy", "exact_match", "token_accuracy", "constrained_accuracy", "ci_low", "ci_high",
               "unparsed_rate", "pair_accuracy"):
        return f"{v:.1%}"
    if key in ("loss", "eval_loss", "train_loss"):
        return f"{v:.4f}"
    if key in ("bleu", "chrf", "perplexity"):
        return f"{v:.2f}"
    if key in ("lr",):
        return f"{v:.2e}"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:,.1f}"


def _short(text: Any, n: int = 160) -> str:
    s = str(text if text is not None else "").replace("\n", " ⏎ ")
    return s if len(s) <= n else s[: n - 1] + "…"


# --------------------------------------------------------------------------- sections


def _before_after(runs: list[Path]) -> Section:
    sec = Section("Before vs after")
    for run in runs:
        res, _ = demo_results(run)
        if res:
            keys = [k for k in ("accuracy", "macro_f1", "n_unparsed") if k in res["base"] or k in res["tuned"]]
            sec.blocks.append(Block("text", text=f"{run.name}: the demo's held-out evaluation (results.json)."))
            sec.blocks.append(Block("table", headers=["system", *keys], rows=[
                ["base (before)", *[fmt(k, res["base"].get(k)) for k in keys]],
                ["tuned (after)", *[fmt(k, res["tuned"].get(k)) for k in keys]],
                ["change", *[_delta(k, res["base"].get(k), res["tuned"].get(k)) for k in keys]],
                *[[label, *[fmt(k, res[key].get(k)) for k in keys]] for key, label in
                  (("tfidf", "TF-IDF + LR (no model)"), ("heuristic", "heuristic: most clicked")) if key in res],
            ]))
        evals, _ = _evaluations(run)
        for doc in evals:
            keys: list[str] = []
            for s in doc["systems"].values():
                keys += [k for k in s["headline"] if k not in keys]
            rows = [[name, *[fmt(k, s["headline"].get(k)) for k in keys]] for name, s in _ordered(doc["systems"])]
            sec.blocks.append(Block("text", text=f"{run.name}: {doc['name']} ({doc['task']}, {doc.get('source', '')}, "
                                                 f"{doc.get('data', {}).get('evaluated') or doc['systems'][next(iter(doc['systems']))]['metrics'].get('n', '?')} examples)"))
            sec.blocks.append(Block("table", headers=["system", *keys], rows=rows))
            if doc.get("versus_baseline"):
                sec.blocks.append(Block("text", text=baseline_verdict(doc["versus_baseline"])))
        for name, m in trained_evaluations(run).items():
            sec.blocks.append(Block("text", text=f"{run.name}: training's own evaluation ({name}, step "
                                                 f"{m.get('step', '?')}, {m.get('n', '?')} examples of the eval data)."))
            sec.blocks.append(Block("table", headers=["system", "accuracy", "macro_f1"], rows=[
                ["tuned (end of training)", fmt("accuracy", m.get("accuracy")), fmt("macro_f1", m.get("macro_f1"))]]))
    if not sec.blocks:
        sec.blocks.append(Block("note", text="No evaluation yet: run `tunelab eval RUN --data FILE --baselines` "
                                             "to add base-vs-tuned figures."))
    return sec


def _trained_blocks(run: Path, name: str, m: dict) -> list[Block]:
    """Training's own evaluation of a classification run (``summary.json``): accuracy, macro-F1, the
    per-class table and the confusion matrix."""
    out = [Block("table", headers=["accuracy", "macro_f1", "micro_f1", "weighted_f1", "unparsed", "examples"],
                 rows=[[fmt("accuracy", m.get("accuracy")), fmt("f1", m.get("macro_f1")), fmt("f1", m.get("micro_f1")),
                        fmt("f1", m.get("weighted_f1")), fmt("n", m.get("n_unparsed")), fmt("n", m.get("n"))]])]
    per_class = m.get("per_class") or {lab: {"f1": f1} for lab, f1 in (m.get("per_class_f1") or {}).items()}
    if per_class:
        out.append(Block("table", headers=["class", "precision", "recall", "f1", "support"], rows=[
            [label, fmt("f1", pc.get("precision")), fmt("f1", pc.get("recall")), fmt("f1", pc.get("f1")),
             pc.get("support", "-")] for label, pc in per_class.items()]))
    if m.get("confusion") and m.get("labels"):
        labels = list(m["labels"])
        cols = labels + ["<unparsed>", "<other>"]
        keep = [j for j, _ in enumerate(cols) if j < len(labels) or any(row[j] for row in m["confusion"])]
        out.append(Block("image", name=f"confusion-{run.name}-{name}", text="confusion matrix (training's evaluation)",
                         png=plots.confusion([[row[j] for j in keep] for row in m["confusion"]], labels,
                                             [cols[j] for j in keep], title=f"{run.name}: {name}, end of training")))
    if per_class:
        out.append(Block("image", name=f"f1-{run.name}-{name}", text="per-class F1 (training's evaluation)",
                         png=plots.bars({"tuned": {lab: pc.get("f1", 0.0) for lab, pc in per_class.items()}},
                                        title=f"{run.name}: {name}, per-class F1", ylabel="F1")))
    return out


def _ordered(systems: dict) -> list[tuple[str, dict]]:
    """Baselines first (the base model's, then the TF-IDF baseline), then the scored model."""
    return sorted(systems.items(), key=lambda kv: (0 if kv[0].startswith("base") else 1 if kv[0] == "tfidf-lr"
                                                   else 2, kv[0]))


def _delta(key: str, a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return "-"
    d = b - a
    if key in ("accuracy", "exact_match", "constrained_accuracy"):
        return f"{d * 100:+.1f} pts"
    return f"{d:+,}" if isinstance(d, int) else f"{d:+.3f}"


def _runs_table(runs: list[Path]) -> Section:
    rows = [run_row(r) for r in runs]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.get("metrics", {}) if k not in keys]
    cols = ["name", "model", "method", "lr", "batch", "steps", "train_loss", "eval_loss"]
    cols += [c for c in ("pair_accuracy", "margin") if any(r.get(c) is not None for r in rows)]
    return Section("Runs", [Block("table", headers=cols + keys, rows=[
        [fmt(c, r.get(c)) for c in cols] + [fmt(k.split("/")[-1], r["metrics"].get(k)) for k in keys] for r in rows])])


def _config_section(run: Path) -> list[Block]:
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    t, m, d = cfg.get("train", {}), cfg.get("method", {}), cfg.get("data", {})
    rows = [["model", cfg.get("model", {}).get("path")],
            ["method", ", ".join(f"{k}={v}" for k, v in m.items())],
            ["train", ", ".join(f"{k}={t.get(k)}" for k in ("lr", "schedule", "batch_size", "grad_accum", "epochs",
                                                             "max_steps", "precision", "seed") if t.get(k) is not None)],
            ["data files", ", ".join(str(s.get("path")) for s in d.get("train", []))],
            ["max length / packing", f"{d.get('max_length')} / {d.get('packing')}"]]
    blocks = [Block("table", headers=["config", "value"], rows=rows)]
    data = _json(run / "data.json")
    if data:
        blocks.append(Block("table", headers=["data", "value"], rows=[
            ["train samples", fmt("n", data.get("train_samples"))], ["eval samples", fmt("n", data.get("eval_samples"))],
            ["train tokens", fmt("n", data.get("train_tokens"))], ["truncated", fmt("n", data.get("truncated"))],
            ["rejected", f"{data.get('rejected', 0)} {data.get('rejected_by_reason') or ''}"]]))
    summary = _json(run / "summary.json")
    if summary:
        blocks.append(Block("table", headers=["training", "value"], rows=[
            ["stopped", summary.get("stop_reason")], ["steps", fmt("n", summary.get("step"))],
            ["train time", f"{summary.get('train_seconds')} s"], ["tokens/s", fmt("x", summary.get("tokens_per_s"))],
            ["best eval loss", fmt("loss", summary.get("best_eval_loss"))]]))
    return blocks


def _curves(run: Path) -> list[Block]:
    recs = metrics_log.read(run / "metrics.jsonl")
    train = [r for r in recs if r.get("kind") == "train" and isinstance(r.get("loss"), int | float)]
    evals = [r for r in recs if r.get("kind") == "eval" and isinstance(r.get("eval_loss"), int | float)]
    if not train:
        return [Block("note", text="No training metrics (metrics.jsonl is empty or missing).")]
    series = {"train": ([r["step"] for r in train], [r["loss"] for r in train])}
    if evals:
        series["validation"] = ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
    out = [Block("image", png=plots.curves(series, title="loss", ylabel="loss per target token"), name="loss",
                 text="train and validation loss")]
    lrs = [r for r in train if isinstance(r.get("lr"), int | float)]
    if lrs:
        out.append(Block("image", png=plots.curves({"lr": ([r["step"] for r in lrs], [r["lr"] for r in lrs])},
                                                   title="learning rate", ylabel="lr"), name="lr", text="learning rate"))
    return out


def _pair_blocks(run: Path) -> list[Block]:
    """A preference or reward run's pair metrics (``metrics.jsonl``): margin and pair accuracy over the
    steps (train records: the pairs since the previous record; validation: every evaluation), and the
    last value of each pair metric. Empty for a run that logs none."""
    history = pair_history(run)
    if not any(history.values()):
        return []
    out: list[Block] = []
    for metric, ylabel in (("margin", "mean reward margin (chosen - rejected)"),
                           ("pair_accuracy", "pairs with chosen > rejected")):
        series = {label: ([s for s, _ in points], [v for _, v in points])
                  for label, points in (("train", history["train"].get(metric)),
                                        ("validation", history["eval"].get(metric))) if points}
        if series:
            out.append(Block("image", name=f"{metric}-{run.name}", text=f"{metric} over steps",
                             png=plots.curves(series, title=metric.replace("_", " "), ylabel=ylabel)))
    rows = []
    for source, label in (("eval", "validation"), ("train", "train (last record)")):
        series = history[source]
        if series:
            step = max(points[-1][0] for points in series.values())
            last = {m: points[-1][1] for m, points in series.items() if points[-1][0] == step}
            rows.append([label, step, *[fmt(m, last.get(m)) for m in PAIR_METRICS]])
    shown = [i for i, m in enumerate(PAIR_METRICS) if any(r[2 + i] != "-" for r in rows)]
    out.insert(0, Block("table", headers=["final pair metrics", "step", *[PAIR_METRICS[i] for i in shown]],
                        rows=[[r[0], r[1], *[r[2 + i] for i in shown]] for r in rows]))
    return out


def _classification_blocks(run: Path, doc: dict) -> list[Block]:
    out: list[Block] = []
    f1s: dict[str, dict[str, float]] = {}
    for name, s in _ordered(doc["systems"]):
        m = s["metrics"]
        modes = [k for k in ("head", "constrained", "generated", "tfidf") if k in m]
        if modes and name in ("tuned", "model"):
            out.append(Block("table", headers=["mode", "accuracy", "macro_f1", "micro_f1", "weighted_f1", "unparsed"],
                             rows=[[mode, fmt("accuracy", m[mode]["accuracy"]), fmt("f1", m[mode]["macro_f1"]),
                                    fmt("f1", m[mode]["micro_f1"]), fmt("f1", m[mode]["weighted_f1"]),
                                    fmt("n", m[mode]["n_unparsed"])] for mode in modes]))
            main = m[m.get("primary", modes[0])]
            out.append(Block("table", headers=["class", "precision", "recall", "f1", "support"], rows=[
                [label, fmt("f1", pc["precision"]), fmt("f1", pc["recall"]), fmt("f1", pc["f1"]), pc["support"]]
                for label, pc in main["per_class"].items()]))
            cols = list(main["labels"]) + ["<unparsed>", "<other>"]
            keep = [j for j, c in enumerate(cols) if j < len(main["labels"]) or any(row[j] for row in main["confusion"])]
            out.append(Block("image", name=f"confusion-{doc['name']}", text=f"confusion matrix ({m.get('primary')})",
                             png=plots.confusion([[row[j] for j in keep] for row in main["confusion"]], main["labels"],
                                                 [cols[j] for j in keep], title=f"{doc['name']}: {name}, {m.get('primary')}")))
        if modes:
            main = m[m.get("primary", modes[0])]
            f1s[name] = {label: pc["f1"] for label, pc in main["per_class"].items()}
    if f1s:
        out.append(Block("image", name=f"f1-{doc['name']}", text="per-class F1",
                         png=plots.bars(f1s, title=f"{doc['name']}: per-class F1", ylabel="F1")))
    return out


def _forgetting(doc: dict) -> list[Block]:
    systems = doc["systems"]
    base = systems.get("base")
    tuned = systems.get("tuned")
    if not base or not tuned:
        return []
    b, t = base["metrics"], tuned["metrics"]
    rows = [["overall", f"{fmt('accuracy', b['accuracy'])} [{fmt('ci_low', b['ci_low'])}, {fmt('ci_high', b['ci_high'])}]",
             f"{fmt('accuracy', t['accuracy'])} [{fmt('ci_low', t['ci_low'])}, {fmt('ci_high', t['ci_high'])}]",
             _delta("accuracy", b["accuracy"], t["accuracy"]), b["n"]]]
    for cat in b.get("per_category", {}):
        bc, tc = b["per_category"][cat], t["per_category"].get(cat)
        if tc:
            rows.append([cat, fmt("accuracy", bc["accuracy"]), fmt("accuracy", tc["accuracy"]),
                         _delta("accuracy", bc["accuracy"], tc["accuracy"]), bc["n"]])
    return [Block("text", text=f"Forgetting on {doc['name']} ({doc['metrics_note'] if 'metrics_note' in doc else 'log-likelihood of the answer letter'}, "
                               f"{b.get('k_shot', 0)}-shot, {b['confidence']:.0%} Wilson intervals, chance {b.get('chance', 0.25):.0%}):"),
            Block("table", headers=["", "base", "tuned", "change", "questions"], rows=rows)]


def _tradeoff_blocks(doc: dict) -> list[Block]:
    """eval.forgetting: the task metric and the general measures, base vs tuned, with intervals."""
    out = [Block("text", text=f"{doc['method']} on {doc['base_model']}: task metric and general ability before and "
                              f"after tuning ({doc['confidence']:.0%} intervals; the change's interval is a paired "
                              "bootstrap over the same examples)."),
           Block("table", headers=TRADEOFF_HEADERS, rows=tradeoff_rows(doc))]
    bars = {side: {m["name"]: m[side]["value"] for m in doc["measures"] if m.get(side) and m["metric"] == "accuracy"}
            for side in ("base", "tuned")}
    if any(bars.values()):
        out.append(Block("image", name="forgetting-accuracy", text="accuracy, base vs tuned",
                         png=plots.bars(bars, title="accuracy: base vs tuned", ylabel="accuracy")))
    return out


def _tradeoff_across(docs: dict[str, dict]) -> list[Block]:
    """One point per run: the task gain against the change of each general measure."""
    names: list[str] = []
    for doc in docs.values():
        names += [m["name"] for m in doc["measures"] if m["name"] not in names]
    rows = []
    for run, doc in docs.items():
        by = {m["name"]: m for m in doc["measures"]}
        rows.append([run, *[fmt_change(by[n]["metric"], by[n].get("change"), by[n].get("change_ci")) if n in by
                            else "-" for n in names]])
    out = [Block("text", text="Change from the base model (tuned - base) of every run, with paired intervals."),
           Block("table", headers=["run", *names], rows=rows)]
    task = next((n for n in names if n.startswith("task")), None)
    for n in names:
        if n == task:
            continue
        points = {}
        for run, doc in docs.items():
            by = {m["name"]: m for m in doc["measures"]}
            if task in by and n in by and "change" in by[task] and "change" in by[n]:
                points[run] = (by[n]["change"], by[task]["change"])
        if len(points) > 1:
            out.append(Block("image", name=f"tradeoff-{n}", text=f"task change vs {n} change",
                             png=plots.scatter(points, xlabel=f"{n}: tuned - base", ylabel=f"{task}: tuned - base",
                                               title=f"trade-off: {task} vs {n}")))
    return out


def _ab_blocks(comps: list[dict]) -> list[Block]:
    out = []
    for c in comps:
        out.append(Block("table", headers=["source", "A", "B", "mean A", "mean B", "B - A", "CI", "p", "test", "verdict"],
                         rows=[[c["name"], c["a"]["name"], c["b"]["name"], f"{c['mean_a']:.4f}", f"{c['mean_b']:.4f}",
                                f"{c['difference']:+.4f}", f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]",
                                f"{c['p_value']:.3g}", c["test"], "significant" if c["significant"] else "not significant"]]))
        if c.get("baseline"):
            b = c["baseline"]
            out.append(Block("text", text=f"Against {b['name']} ({b['description']}), on the same examples:"))
            out.append(Block("table", headers=["system", "accuracy", b["name"], "system - baseline", "CI", "p",
                                               "verdict"], rows=[
                [c[side]["name"], f"{t['mean_b']:.4f}", f"{t['mean_a']:.4f}", f"{t['difference']:+.4f}",
                 f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]", f"{t['p_value']:.3g}",
                 ("beats it" if t["difference"] > 0 else "does not beat it")
                 + (", significant" if t["significant"] else ", not significant")]
                for side, t in ((side, b[side]) for side in ("a", "b"))]))
        if c.get("disagreements"):
            out.append(Block("table", headers=["id", "reference", "A", "B"], rows=[
                [d["id"], _short(d.get("reference"), 60), _short(d["a"], 80), _short(d["b"], 80)]
                for d in c["disagreements"][:10]]))
    return out


def _samples(run: Path, evals: list[dict], demo_gens: list[dict], n: int = 8) -> list[Block]:
    out = []
    if demo_gens:
        out.append(Block("table", headers=["prompt", "gold", "base reply", "tuned reply"], rows=[
            [_short(g.get("prompt"), 140), g.get("gold"), _short(g.get("base_reply"), 80), _short(g.get("tuned_reply"), 80)]
            for g in demo_gens[:n]]))
    for doc in evals:
        if doc["task"] not in ("generation", "classification"):
            continue
        rows = _jsonl(Path(doc["path"][: -len(".json")] + ".examples.jsonl"))
        systems = [s for s, _ in _ordered(doc["systems"])]
        by_id: dict[str, dict[str, dict]] = {}
        for r in rows:
            by_id.setdefault(r["id"], {})[r["system"]] = r
        table = []
        for per in list(by_id.values())[:n]:
            first = next(iter(per.values()))
            table.append([_short(first.get("prompt"), 120), _short(first.get("reference"), 60),
                          *[_short(_prediction(per.get(s, {})), 80) for s in systems]])
        if table:
            out.append(Block("text", text=f"{doc['name']}: first {len(table)} examples"))
            out.append(Block("table", headers=["prompt", "reference", *systems], rows=table))
    return out


def _prediction(row: dict) -> str:
    """What a system answered: its generation, else its constrained or head label."""
    for key in ("prediction", "constrained", "head", "pred"):
        if row.get(key) is not None:
            return str(row[key])
    return ""


def build_report(runs: list[str | Path]) -> tuple[str, list[Section]]:
    """The report's title and sections for ``runs`` (see the module docstring)."""
    require("matplotlib", extra="report", verb="tunelab report")  # the figures: fail before reading anything
    paths = [Path(r) for r in runs]
    for p in paths:
        if not (p / "config.yaml").is_file():
            raise UserError(f"{p}: not a run directory (no config.yaml). Pass runs/<name> folders")
    sections = [_before_after(paths)]
    if len(paths) > 1:
        sections.append(_runs_table(paths))
    for run in paths:
        sections.append(Section(f"Run {run.name}", [Block("text", text=str(run))]))
        sections.append(Section("Config and data", _config_section(run), 3))
        sections.append(Section("Training curves", _curves(run), 3))
        pairs = _pair_blocks(run)
        if pairs:
            sections.append(Section("Preference pairs", pairs, 3))
        for name, m in trained_evaluations(run).items():
            sections.append(Section(f"Classification: {name} (training's evaluation)", _trained_blocks(run, name, m), 3))
        evals, comps = _evaluations(run)
        for doc in evals:
            if doc["task"] == "classification":
                sections.append(Section(f"Classification: {doc['name']}", _classification_blocks(run, doc), 3))
            if doc["task"] == "benchmark":
                blocks = _forgetting(doc)
                if blocks:
                    sections.append(Section(f"Forgetting: {doc['name']}", blocks, 3))
        tradeoff = _json(run / "forgetting.json")
        if isinstance(tradeoff, dict) and tradeoff.get("measures"):
            sections.append(Section("Forgetting trade-off (base vs tuned)", _tradeoff_blocks(tradeoff), 3))
        if comps:
            sections.append(Section("A/B comparisons", _ab_blocks(comps), 3))
        _, gens = demo_results(run)
        samples = _samples(run, evals, gens)
        if samples:
            sections.append(Section("Sample generations", samples, 3))
    docs = {p.name: _json(p / "forgetting.json") for p in paths}
    docs = {k: v for k, v in docs.items() if isinstance(v, dict) and v.get("measures")}
    if len(docs) > 1:
        sections.insert(1, Section("Forgetting trade-off across runs", _tradeoff_across(docs)))
    title = "tunelab report: " + ", ".join(p.name for p in paths)
    return title, sections


# --------------------------------------------------------------------------- rendering

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}h3{margin-top:1.3em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f5f8}
td{max-width:420px;overflow-wrap:anywhere}img{max-width:100%;margin:.4em 0}.note{color:#777;font-style:italic}
figure{margin:0 0 1em}figcaption{color:#555;font-size:.85em}
"""


def render_html(title: str, sections: list[Section]) -> str:
    env = jinja2.Environment(autoescape=True)
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    tpl = env.from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ css }}</style></head>
<body><h1>{{ title }}</h1>
{% for s in sections %}<h{{ s.level }}>{{ s.title }}</h{{ s.level }}>
{% for b in s.blocks %}{% if b.kind == 'text' %}<p>{{ b.text }}</p>
{% elif b.kind == 'note' %}<p class="note">{{ b.text }}</p>
{% elif b.kind == 'image' %}<figure><img alt="{{ b.text }}" src="data:image/png;base64,{{ b.png | b64 }}"><figcaption>{{ b.text }}</figcaption></figure>
{% elif b.kind == 'table' %}<table><thead><tr>{% for h in b.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{% for row in b.rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% endif %}{% endfor %}{% endfor %}
</body></html>
""")
    return tpl.render(title=title, sections=sections, css=_CSS)


def _md_cell(v: Any) -> str:
    return html.escape(str(v), quote=False).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section], assets: str) -> tuple[str, dict[str, bytes]]:
    """Markdown text and the figures it links to (``{relative path: png}``)."""
    lines, files = [f"# {title}", ""], {}
    for s in sections:
        lines += ["#" * s.level + " " + s.title, ""]
        for i, b in enumerate(s.blocks):
            if b.kind in ("text", "note"):
                lines += [f"_{b.text}_" if b.kind == "note" else b.text, ""]
            elif b.kind == "table":
                lines.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
                lines.append("|" + "---|" * len(b.headers))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                lines.append("")
            elif b.kind == "image":
                rel = f"{assets}/{len(files):02d}-{b.name or i}.png"
                files[rel] = b.png
                lines += [f"![{b.text}]({rel})", ""]
    return "\n".join(lines), files


def write_report(runs: list[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (default: in the first run's folder)."""
    title, sections = build_report(runs)
    html_path = Path(out) if out else Path(runs[0]) / "report.html"
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out: the report file must end in .html (got {html_path}). The Markdown twin is written beside it")
    md_path = html_path.with_suffix(".md")
    atomic_write_text(html_path, render_html(title, sections))
    assets = f"{html_path.stem}_files"
    text, files = render_markdown(title, sections, assets)
    for rel, data in files.items():
        atomic_write_bytes(html_path.parent / rel, data)
    atomic_write_text(md_path, text + "\n")
    return html_path, md_path
