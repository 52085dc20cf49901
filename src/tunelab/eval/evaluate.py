"""``tunelab eval``: score a run (or any model) on data files and benchmarks, with baselines.

:func:`evaluate` is the one entry function. For every data source (a data file or a
multiple-choice benchmark) it scores each *system* and writes one result file:

* ``tuned`` (or ``model`` for a plain model): the target itself;
* with ``baselines``: ``base 0-shot`` (the base model the run was tuned from) and
  ``base k-shot`` (the base model with ``few_shot`` training examples of the run shown as
  earlier turns of the conversation), so the table answers "did tuning beat prompting?";
  and on classification data ``tfidf-lr`` (:mod:`tunelab.eval.classical`: TF-IDF + logistic
  regression trained on the run's own training split, or on ``train``), with the paired test
  of the target against it (``versus_baseline`` in the result), so the table also answers
  "did tuning beat a ten-second classical model?". A plain model (not a run) gets only
  ``tfidf-lr``, and only with ``train``.

Results go to ``<run>/eval/<source>.json`` (metrics per system, settings, data counts) and
``<run>/eval/<source>.examples.jsonl`` (one line per example and system: prompt, reference,
prediction, score), which ``tunelab compare`` and ``tunelab report`` read. For a target that
is not a run, ``out_dir`` (default ``eval_results/<target name>``) takes their place.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from tunelab.data.formats import read_records, summarize_rejects
from tunelab.data.tasks import generative_records
from tunelab.errors import UserError, first_line
from tunelab.eval import tasks as eval_kinds
from tunelab.eval.choice import load_benchmark
from tunelab.eval.classical import BASELINE, describe, score_baseline, training_text
from tunelab.eval.generate import GenerationSettings
from tunelab.eval.metrics import paired_test
from tunelab.eval.tasks import detect_task, gold_label, label_set
from tunelab.fsutil import atomic_write_text
from tunelab.models.classifier import is_decoder
from tunelab.objectives.classification import answer_budget
from tunelab.rundocs import baseline_verdict, label_prompts
from tunelab.ship.inference import SCORE, base_model_folder, load_for_inference, select_task, weights_folder

__all__ = ["BenchmarkRequest", "EvalRequest", "evaluate", "headline", "load_target"]


@dataclass
class BenchmarkRequest:
    path: str
    k_shot: int = 0
    limit: int | None = None
    split: str = "auto"
    subjects: list[str] | None = None


@dataclass
class EvalRequest:
    """What to evaluate and how (the ``eval:`` config section and ``tunelab eval``'s flags)."""

    data: list[str] = field(default_factory=list)
    format: str = "auto"
    task: str = "auto"
    metrics: list[str] | None = None
    labels: list[str] | None = None
    limit: int | None = None
    benchmarks: list[BenchmarkRequest] = field(default_factory=list)
    baselines: bool = False
    few_shot: int = 3
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    max_length: int = 1024
    modes: tuple[str, ...] = ("constrained", "generated")
    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype the scored models are loaded in
    prompt: str | None = None  # classification: a template with {labels} and {text} (a run uses its own)
    train: str | None = None  # the TF-IDF baseline's training file (default: the run's own training split)
    tfidf: bool | None = None  # score the TF-IDF baseline on classification data (None: with ``baselines``)


@dataclass
class Target:
    """A model to score: a loaded causal LM, or a classification head with its labels."""

    name: str
    model: Any
    tokenizer: Any
    description: str
    base_model: str | None = None
    id2label: dict[int, str] | None = None
    max_length: int | None = None  # a run's data.max_length: its head saw texts cut to it
    multitask: Any = None  # a multi-task run as loaded (its heads and shared LM): a view per data file, _view
    reward: bool = False  # a reward model (one score per prompt + reply): it scores preference pairs only


# --------------------------------------------------------------------------- loading


DTYPES = ("float32", "bfloat16", "float16")


def load_target(target: str | Path, *, checkpoint: str = "final", name: str = "tuned", dtype: str = "float32") -> Target:
    """A run directory, a weights folder, an alias, a HF folder or a .gguf file, ready to score.

    A classification run (any method: a head on an encoder, LoRA on a causal LM, ...) loads as
    :func:`tunelab.ship.inference.load_for_inference` loads it for ``tunelab predict``, with its
    labels; a multi-task run keeps its heads and shared LM, and :func:`_view` picks the one that
    scores a data file.
    """
    import torch

    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype {dtype!r}. Choose one of {', '.join(DTYPES)}")
    folder = weights_folder(target, checkpoint)
    loaded = load_for_inference(target, checkpoint=checkpoint, dtype=getattr(torch, dtype))
    label = name if folder is not None else "model"
    run_dir = _run_dir(target)
    max_length = _run_max_length(run_dir) if run_dir is not None else None
    if loaded.tasks:  # a multi-task run: its shared LM (sft / generative tasks) unless a head's labels fit the data
        lm_task = next((t for t in loaded.tasks if t not in loaded.model.specs), None)
        lm = select_task(loaded, lm_task) if lm_task is not None else None
        return Target(label, lm.model if lm else None, loaded.tokenizer, lm.description if lm else loaded.description,
                      loaded.base_model, max_length=max_length, multitask=loaded)
    id2label = loaded.id2label if loaded.kind == "classification" else None
    return Target(label, loaded.model, loaded.tokenizer, loaded.description, loaded.base_model, id2label, max_length,
                  reward=loaded.kind == SCORE)


def _run_max_length(run_dir: Path) -> int | None:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return (cfg.get("data") or {}).get("max_length")


def _view(t: Target, kind: str, labels: list[str]) -> Target:
    """What scores a data file of ``kind``: the target itself, or for a multi-task run the head whose label
    set holds the data's labels (classification), else its shared LM."""
    loaded = t.multitask
    if loaded is None:
        return t
    heads = loaded.model.specs
    if EVAL_KINDS[kind].head_scores:
        fits = [n for n in heads if set(labels) <= set(heads[n].labels)]
        if len(fits) > 1:
            raise UserError(f"eval: the labels of the data {labels} fit several heads of {loaded.description} "
                            f"({', '.join(fits)}). Score one with: tunelab predict RUN --task NAME --data FILE --out OUT")
        if fits:
            head = select_task(loaded, fits[0])
            return Target(t.name, head.model, head.tokenizer, head.description, t.base_model, head.id2label,
                          t.max_length)
    if t.model is None:
        raise UserError(f"{loaded.description}: every task of this multi-task run is a classification head and none "
                        f"has the labels of the data ({', '.join(labels) or 'no labels'}). Score a head with: "
                        "tunelab predict RUN --task NAME --data FILE --out OUT")
    return t


def _generates(model_id: str) -> bool:
    """Whether a base model can answer a prompt (a causal LM, not an encoder such as all-MiniLM)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_model_folder(model_id))
    except (OSError, ValueError):  # a .gguf or a layout AutoConfig does not read: loading it decides
        return True
    return is_decoder(config)


def _run_dir(target: str | Path) -> Path | None:
    p = Path(target)
    if (p / "config.yaml").is_file():
        return p
    if (p / "tunelab.json").is_file() and (p.parent / "config.yaml").is_file():
        return p.parent
    return None


def _train_shots(run_dir: Path | None, k: int, task: str | None = None) -> list:
    """The first ``k`` training records of the run (the few-shot baseline's examples); of a multi-task
    run, those of ``task``'s training file."""

    if run_dir is None or k <= 0:
        return []
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    specs = cfg["data"]["train"]
    spec = next((s for s in specs if task is not None and s.get("task") == task), specs[0])
    return read_records(spec["path"], format=spec.get("format", "auto"), columns=spec.get("columns") or None,
                        limit=k).records[:k]


def _prompt_for(run_dir: Path | None, req: EvalRequest, labels: list[str]) -> dict[str, Any] | None:
    """The classification prompt a data file is asked with: the run's (``classification.prompt`` with the
    run's labels, as training rendered it; of a multi-task run, the task whose labels hold the data's),
    else ``--prompt`` with the data's labels; None: each row's text as it is."""
    if req.prompt is not None:
        for field_name in ("{labels}", "{text}"):
            if field_name not in req.prompt:
                raise UserError(f"--prompt: the template has no {field_name} (got {req.prompt!r}). Write e.g. "
                                "'Classify into one of: {labels}.\n\nText: {text}\n\nAnswer with the label only.'")
    specs = label_prompts(run_dir) if run_dir is not None else {}
    fits = {n: s for n, s in specs.items() if set(labels) <= set(s["labels"])}
    chosen = next(iter(fits.items()), None) or (next(iter(specs.items())) if len(specs) == 1 else None)
    if chosen is not None:
        name, spec = chosen
        return {**spec, "task": name, "from_run": True, "prompt": req.prompt or spec["prompt"]}
    if req.prompt is not None:
        return {"task": None, "labels": list(labels), "prompt": req.prompt, "max_new_tokens": None, "from_run": False}
    return None


def _prompted(records: list, spec: dict[str, Any]) -> list:
    """Records asked with ``spec``'s prompt: user = the prompt with {labels} and {text}, answer = the gold label."""
    with_gold = [r if r.label is not None else replace(r, label=gold_label(r)) for r in records]
    return generative_records(with_gold, spec["labels"], spec["prompt"])


def _read(path: str, fmt: str, limit: int | None, console: Console):

    res = read_records(path, format=fmt, limit=limit)
    if res.rejects:
        console.print(f"[yellow]{path}: {len(res.rejects)} row(s) rejected[/] {summarize_rejects(res.rejects)}")
    if not res.records:
        raise UserError(f"{path}: no usable row to evaluate ({len(res.rejects)} rejected). Check the file")
    return res


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class EvalKind:
    """What ``--task`` (``eval.task``) names: how a data file is scored and which figures head its table."""

    name: str
    score: Callable[..., dict] | None  # (target, records, request, labels, shots, console) -> result
    headline: Callable[[dict[str, Any]], dict[str, float]]
    labelled: bool = False  # a label set is read from the data
    prompted: bool = True  # rows are prompts with a reference reply (not plain text)
    head_scores: bool = False  # a classification head (a model with id2label) can score it


def _score_lm(t: Target, records, req: EvalRequest, labels, shots, console) -> dict:
    return eval_kinds.eval_lm(t.model, t.tokenizer, records, batch_size=req.generation.batch_size,
                              max_length=req.max_length, console=console)


def _score_generation(t: Target, records, req: EvalRequest, labels, shots, console) -> dict:
    return eval_kinds.eval_generation(t.model, t.tokenizer, records, req.generation, shots=shots,
                                      metrics=req.metrics, console=console)


def _score_classification(t: Target, records, req: EvalRequest, labels, shots, console) -> dict:
    if t.id2label is not None:
        return eval_kinds.classify_with_head(t.model, t.tokenizer, records, t.id2label,
                                             batch_size=req.generation.batch_size, max_length=req.max_length,
                                             console=console)
    return eval_kinds.eval_classification(t.model, t.tokenizer, records, labels, req.generation, shots=shots,
                                          modes=req.modes, console=console)


def _score_pairs(t: Target, records, req: EvalRequest, labels, shots, console) -> dict:
    return eval_kinds.eval_pairs(t.model, t.tokenizer, records, batch_size=req.generation.batch_size,
                                 max_length=req.max_length, console=console)


def _classification_headline(metrics: dict[str, Any]) -> dict[str, float]:
    m = metrics.get(metrics.get("primary", "generated"), {})
    out = {"accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1")}
    if "constrained" in metrics and metrics.get("primary") != "constrained":
        out["constrained_accuracy"] = metrics["constrained"]["accuracy"]
    return {k: v for k, v in out.items() if v is not None}


EVAL_KINDS = {k.name: k for k in (
    EvalKind("lm", _score_lm, lambda m: {k: m[k] for k in ("loss", "perplexity", "token_accuracy")}, prompted=False),
    EvalKind("generation", _score_generation,
             lambda m: {k: m[k] for k in ("exact_match", "f1", "bleu", "rougeL", "chrf") if k in m}),
    EvalKind("classification", _score_classification, _classification_headline, labelled=True, head_scores=True),
    EvalKind("preference", _score_pairs, lambda m: {k: m[k] for k in ("pair_accuracy", "pair_accuracy_normalised",
                                                                      "margin") if k in m}, prompted=False),
    EvalKind("benchmark", None, lambda m: {k: m[k] for k in ("accuracy", "ci_low", "ci_high")}),
)}
DATA_KINDS = tuple(k for k, v in EVAL_KINDS.items() if v.score is not None)  # what a data file can be scored as


def asked_kind(name: str) -> EvalKind | None:
    """The kind ``--task`` names; None for ``auto`` (detected from each file's rows)."""
    if name == "auto":
        return None
    if name not in DATA_KINDS:
        raise UserError(f"--task: unknown task {name!r}. Choose auto, {', '.join(DATA_KINDS)}")
    return EVAL_KINDS[name]


def _score_data(t: Target, records, kind: str, req: EvalRequest, labels: list[str], shots, console) -> dict:
    how = EVAL_KINDS[kind]
    if t.reward and how.score is not _score_pairs:
        raise UserError(f"eval: {t.description} is a reward model; it scores preference pairs only (got task "
                        f"{kind!r}). Give a file of pairs (chosen / rejected replies), or --task preference")
    if t.id2label is not None and not how.head_scores:
        raise UserError(f"eval: {t.description} is a classification head; it can only score classification data "
                        f"(got task {kind!r}). Use --task classification")
    return how.score(t, records, req, labels, shots, console)


def _score_source(t: Target, s: dict[str, Any], req: EvalRequest, k: int | None, run_dir: Path | None, shots: list,
                  console) -> dict:
    """Score one data source on one system. Classification data with a prompt (the run's, or ``--prompt``) is
    asked as training asked it: the prompt with the labels and the text, the run's label order, and the
    answer length of training's own evaluation; a classification head reads the plain text."""
    view = _view(t, s["task"], s["labels"]) if k is None else t
    records, labels, spec = s["records"], s["labels"], s["prompt"]
    if spec is not None and view.id2label is None:
        if k:
            shots = _prompted(_train_shots(run_dir, k, spec["task"]), spec)
        records = _prompted(records, spec)
        labels = list(spec["labels"]) + [lab for lab in labels if lab not in spec["labels"]]
        if spec["from_run"]:
            budget = answer_budget(view.tokenizer, spec["labels"], spec["max_new_tokens"])
            req = replace(req, generation=replace(req.generation, max_new_tokens=budget))
    max_length = min(req.max_length, view.max_length) if view.max_length else req.max_length
    return _score_data(view, records, s["task"], replace(req, max_length=max_length), labels, shots, console)


def headline(kind: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The few numbers a table shows for a result: the primary figures of its kind."""
    return EVAL_KINDS.get(kind, EVAL_KINDS["generation"]).headline(metrics)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "eval"


def evaluate(target: str | Path, req: EvalRequest, *, checkpoint: str = "final", out_dir: str | Path | None = None,
             console: Console | None = None) -> list[dict[str, Any]]:
    """Score ``target`` (and its baselines) on every data source of ``req``; write and return the results."""
    console = console or Console()
    if not req.data and not req.benchmarks:
        raise UserError("eval: nothing to evaluate. Pass --data FILE and/or --benchmark ZIP_OR_FOLDER")
    asked = asked_kind(req.task)
    run_dir = _run_dir(target)
    out = Path(out_dir) if out_dir else (run_dir / "eval" if run_dir else Path("eval_results") / slug(Path(str(target)).name))

    sources: list[dict[str, Any]] = []
    for path in req.data:
        res = _read(path, req.format, req.limit, console)
        kind = asked.name if asked is not None else detect_task(res.records, req.labels)
        labels = label_set(res.records, req.labels) if EVAL_KINDS[kind].labelled else []
        prompt = _prompt_for(run_dir, req, labels) if EVAL_KINDS[kind].labelled else None
        sources.append({"kind": "data", "name": slug(Path(path).stem), "path": path, "task": kind,
                        "records": res.records, "labels": labels, "rows": res.rows, "rejected": len(res.rejects),
                        "prompt": prompt})

    for b in req.benchmarks:
        bench = load_benchmark(b.path)
        sources.append({"kind": "benchmark", "name": slug(f"{bench.name}-{b.k_shot}shot"), "path": b.path,
                        "task": "benchmark", "bench": bench, "request": b})

    systems = [("tuned", None)]
    tfidf = req.baselines if req.tfidf is None else req.tfidf
    if req.train is not None and not tfidf:
        raise UserError(f"--train: {req.train} is the TF-IDF baseline's training data, which only --baselines "
                        "scores. Add --baselines")
    if req.baselines:
        if run_dir is None and req.train is None:
            raise UserError(f"--baselines: {target} is not a run directory, so it has no base model or training "
                            "data. Pass a run directory, or --train FILE for the TF-IDF baseline alone")
        if run_dir is not None:
            systems += [("base 0-shot", 0), (f"base {req.few_shot}-shot", req.few_shot)]
        else:
            console.print(f"[yellow]--baselines[/]: {target} is not a run, so it has no base model to prompt: "
                          f"only the TF-IDF baseline is scored (trained on {req.train})")
    results: dict[str, dict[str, Any]] = {s["name"]: {} for s in sources}
    examples: dict[str, list[dict]] = {s["name"]: [] for s in sources}
    base_loaded: Target | None = None
    tuned: Target | None = None
    for sys_name, k in systems:
        if k is None:
            tuned = load_target(target, checkpoint=checkpoint, dtype=req.dtype)
            t = tuned
            sys_label = t.name
        else:
            if base_loaded is None:
                base_id = tuned.base_model if tuned else None
                if base_id is None:
                    raise UserError(f"--baselines: {target} does not name its base model (no tunelab.json)")
                if not _generates(base_id):
                    console.print(f"[yellow]--baselines: skipped[/]: the base model {base_id} is an encoder; it "
                                  "cannot answer a prompt, so the base model is not scored")
                    break
                tuned.model = tuned.multitask = None  # free the tuned weights before loading the base
                base_loaded = load_target(base_id, name="base", dtype=req.dtype)
            t = base_loaded
            sys_label = sys_name
        shots = _train_shots(run_dir, k) if k else []
        console.print(f"[bold]{sys_label}[/]: {t.description}" + (f", {len(shots)} training example(s) in the prompt" if shots else ""))
        for s in sources:
            t0 = time.perf_counter()
            if s["kind"] == "benchmark":
                if k:  # few-shot prompting is the benchmark's own k-shot; one base row is enough
                    continue
                from tunelab.eval.choice import score_benchmark

                b = s["request"]
                r = score_benchmark(t.model, t.tokenizer, s["bench"], k_shot=b.k_shot, limit=b.limit, split=b.split,
                                    subjects=b.subjects, batch_size=req.generation.batch_size, console=console)
                rows = r.pop("per_question")
                sys_key = "base" if k == 0 and sys_label.startswith("base") else sys_label
                res = {"metrics": r, "examples": [{**x, "score": float(x["correct"])} for x in rows]}
            else:
                sys_key = sys_label
                res = _score_source(t, s, req, k, run_dir, shots, console)
            res["metrics"]["seconds"] = round(time.perf_counter() - t0, 2)
            results[s["name"]][sys_key] = {"description": t.description, "metrics": res["metrics"],
                                           "headline": headline(s["task"], res["metrics"])}
            examples[s["name"]] += [{"system": sys_key, **x} for x in res["examples"]]

    if tfidf:
        for s in sources:
            if s["kind"] == "data" and s["task"] == "classification":
                _score_tfidf(s, run_dir, req, results[s["name"]], examples[s["name"]], console)

    return _write_results(target, sources, results, examples, req, checkpoint, out, console)


def _write_results(target, sources: list[dict[str, Any]], results: dict[str, dict[str, Any]],
                   examples: dict[str, list[dict]], req: EvalRequest, checkpoint: str, out: Path,
                   console: Console) -> list[dict[str, Any]]:
    """One ``<source>.json`` (every system's metrics) and ``<source>.examples.jsonl`` per data source, printed."""
    written = []
    for s in sources:
        doc = {
            "name": s["name"], "target": str(target), "task": s["task"], "source": s["path"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "data": {"rows": s.get("rows"), "evaluated": len(s["records"]) if "records" in s else None,
                     "rejected": s.get("rejected", 0), "labels": s.get("labels") or None},
            "settings": {"generation": asdict(req.generation), "few_shot": req.few_shot if req.baselines else 0,
                         "modes": list(req.modes), "checkpoint": checkpoint, "dtype": req.dtype,
                         **({"benchmark": asdict(s["request"])} if s["kind"] == "benchmark" else {})},
            "systems": results[s["name"]],
        }
        versus = _versus_baseline(results[s["name"]], examples[s["name"]])
        if versus is not None:
            doc["versus_baseline"] = versus
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{s['name']}.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(out / f"{s['name']}.examples.jsonl",
                          "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in examples[s["name"]]))
        doc["path"] = str(out / f"{s['name']}.json")
        written.append(doc)
        print_result(doc, console)
    return written


def _score_tfidf(s: dict[str, Any], run_dir: Path | None, req: EvalRequest, results: dict[str, Any],
                 examples: list[dict], console: Console) -> None:
    """The TF-IDF + logistic-regression system on one classification source (skipped, with the reason, when
    there is no training data to fit it on)."""
    t0 = time.perf_counter()
    try:
        train = training_text(run_dir, s["labels"], req.train, req.format)
        res = score_baseline(train, s["records"], s["labels"])
    except UserError as err:
        console.print(f"[yellow]{BASELINE} skipped[/] on {s['name']}: {first_line(err)}")
        return
    res["metrics"]["seconds"] = round(time.perf_counter() - t0, 2)
    results[BASELINE] = {"description": describe(res["metrics"]["baseline"]), "metrics": res["metrics"],
                         "headline": headline("classification", res["metrics"])}
    examples += [{"system": BASELINE, **x} for x in res["examples"]]
    console.print(f"[bold]{BASELINE}[/]: {results[BASELINE]['description']}")


def _versus_baseline(systems: dict[str, Any], examples: list[dict]) -> dict[str, Any] | None:
    """The scored target against the TF-IDF baseline on the same examples: the accuracy difference (target -
    baseline) with its paired-bootstrap interval and McNemar's exact p-value; None without the baseline."""
    target = next((k for k in ("tuned", "model") if k in systems), None)
    if BASELINE not in systems or target is None:
        return None
    by = {name: {x["id"]: x["score"] for x in examples if x["system"] == name} for name in (target, BASELINE)}
    ids = [i for i in by[target] if i in by[BASELINE]]
    if not ids:
        return None
    test = paired_test([by[BASELINE][i] for i in ids], [by[target][i] for i in ids], binary=True)
    return {"system": target, "baseline": BASELINE, "metric": "accuracy", **test,
            "beats_baseline": test["difference"] > 0}


def _fmt(key: str, v: Any) -> str:
    if not isinstance(v, float):
        return str(v)
    if key in ("bleu", "chrf"):
        return f"{v:.2f}"
    if key in ("loss", "perplexity"):
        return f"{v:.4f}" if key == "loss" else f"{v:.2f}"
    return f"{v:.1%}" if key in ("accuracy", "ci_low", "ci_high", "token_accuracy", "exact_match",
                                  "constrained_accuracy") else f"{v:.3f}"


def print_result(doc: dict[str, Any], console: Console) -> None:
    """One table per source: systems as rows, headline metrics as columns."""
    keys: list[str] = []
    for s in doc["systems"].values():
        keys += [k for k in s["headline"] if k not in keys]
    table = Table(title=f"{doc['name']} ({doc['task']}, {doc['source']})")
    table.add_column("system")
    for k in keys:
        table.add_column(k, justify="right")
    for name, s in doc["systems"].items():
        table.add_row(name, *[_fmt(k, s["headline"].get(k, "")) for k in keys])
    console.print(table)
    if doc.get("versus_baseline"):
        console.print(baseline_verdict(doc["versus_baseline"]), soft_wrap=True, markup=False)
    console.print(f"[dim]written: {doc['path']}[/]")


# --------------------------------------------------------------------------- after training


def request_from_config(section) -> EvalRequest:
    """An :class:`EvalRequest` from the ``eval:`` config section."""
    return EvalRequest(
        data=list(section.data), format=section.format, task=section.task, metrics=section.metrics,
        labels=section.labels, limit=section.limit, baselines=section.baselines, few_shot=section.few_shot,
        benchmarks=[BenchmarkRequest(b.path, b.k_shot, b.limit, b.split, b.subjects) for b in section.benchmarks],
        generation=GenerationSettings(max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                                      top_p=section.top_p, stop=tuple(section.stop), seed=section.seed,
                                      batch_size=section.batch_size),
        max_length=section.max_length, dtype=section.dtype, prompt=getattr(section, "prompt", None),
    )


def request_from_options(o) -> EvalRequest:
    """The request ``tunelab eval`` / ``compare`` options (:mod:`tunelab.eval.settings`) describe."""
    return EvalRequest(
        data=list(o.data), format=o.format, task=o.task, metrics=o.metrics, labels=o.labels,
        limit=o.limit, baselines=getattr(o, "baselines", False), few_shot=getattr(o, "few_shot", 3),
        benchmarks=[BenchmarkRequest(b, o.k_shot, o.limit, o.split, o.subjects) for b in o.benchmark],
        generation=GenerationSettings(max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                                      top_p=o.top_p, stop=tuple(o.stop), seed=o.seed,
                                      batch_size=o.batch_size),
        max_length=o.max_length, dtype=o.dtype,
        modes=("constrained", "generated") if o.mode == "both" else (o.mode,), prompt=o.prompt,
        train=getattr(o, "train", None),
    )
