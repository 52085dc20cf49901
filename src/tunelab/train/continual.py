"""``tunelab continual CONFIG``: tasks learnt one after another, every task scored after every stage.

A config with ``stages:`` (task A, then B, then C) runs one ordinary training run per stage,
each from the weights the stage before left:

* a stage's config is the top-level config with the stage's own sections merged over it
  (``data``, ``task``, ``method``, ``train``, ``objectives``, ``classification``, ``eval``;
  mappings merge key by key, lists replace, a ``method`` with another ``name`` replaces the
  method), validated as strictly as any config (errors name ``stages.<i> (<name>)``);
* stage k starts from stage k-1's weights: ``full`` / ``freeze`` runs hand on their
  ``final/`` folder; adapter methods (LoRA, DoRA, IA3...) are **merged** into their base after
  the stage (``ship.export`` in float32, ``stages/<k>/merged/``) and stage k trains a fresh
  adapter on that merged model (the sum of low-rank updates, as ReLoRA accumulates them). Methods
  that cannot merge (prefix, prompt tuning...) are refused with the reason;
* L2-SP, EWC and distillation anchor at the weights a run *starts* from, so in stage k they
  anchor at (or distil from) stage k-1's model. :func:`stage_objectives` is the one place where
  stage k's regulariser state is derived from stage k-1 (the replay buffer, EWC's reference
  data);
* replay with no ``objectives.replay.data`` replays the **buffer**: ``objectives.replay.buffer``
  training samples kept (seeded) from every finished stage, as that stage trained on them
  (generative classification: the chat with its own label list), in ``buffer/<k>.jsonl``.

After every stage (and for the base model before any), every task of the config is scored
with its task metric on its validation data (:func:`tunelab.eval.forgetting.task_metric`):
accuracy for generative classification, the *negative* mean target-token loss otherwise (so
higher is better everywhere). ``R[i][j]`` = metric on task j after stage i. Following Lopez-Paz
& Ranzato (2017, GEM), with T tasks:

* average accuracy ``ACC = 1/T * sum_j R[T-1][j]``;
* backward transfer ``BWT = 1/(T-1) * sum_{j<T-1} (R[T-1][j] - R[j][j])`` (negative: forgetting);
* forward transfer ``FWT = 1/(T-1) * sum_{j>0} (R[j-1][j] - b_j)``, where ``b_j`` is the score
  of the **base model** on task j (the paper uses a randomly initialised model; for fine-tuning
  a pre-trained model the base is the meaningful reference).

Everything lands in ``<run>/continual.json`` (state, matrix, summary) and ``continual.md``;
a finished stage is never re-run (an interrupted one resumes from its last checkpoint).
``--compare naive,ewc:5000,replay:0.3`` runs each variant into ``<run>/compare/<variant>/`` and
tabulates ACC / BWT / FWT side by side (``compare.json``, ``compare.md``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from tunelab import methods, tasks
from tunelab.config import StageSpec, load_config
from tunelab.data.templates import set_chat_template
from tunelab.data.workbench import prepare_records, record_row
from tunelab.errors import ConfigError, UserError
from tunelab.fsutil import atomic_write_text, check_name
from tunelab.train.run import make_folder

STAGE_KEYS = ("task", "data", "method", "train", "objectives", "classification", "eval")


# --------------------------------------------------------------------------- config


def _merge(base: Any, over: Any, key: str = "") -> Any:
    """Mappings merge key by key, anything else replaces; a method with another name replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        if key == "method" and "name" in over and over["name"] != base.get("name", "lora"):
            return copy.deepcopy(over)
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "stage"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found. Check the path, or start from examples/continual/news_then_hotels.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({getattr(err, 'problem', err)}). Fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections. See examples/continual/news_then_hotels.yaml")
    return raw


@dataclass
class ContinualPlan:
    """The resolved configs of every stage, and the continual run's folder."""

    name: str
    root: Path
    stages: list[Any]  # TuneConfig per stage (run dir, model path and regulariser state filled at run time)
    sources: list[dict[str, str]]
    raw: dict[str, Any]  # the file's dict (for the fingerprint and the variants)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_continual(path: str | Path | None, overrides: list[str] | None = None, *, raw: dict | None = None) -> ContinualPlan:
    """Read a ``stages:`` config and validate every stage's merged config (all problems at once)."""


    raw = copy.deepcopy(raw) if raw is not None else _read_yaml(Path(path))
    stages_raw = raw.pop("stages", None)
    source = str(path) if path is not None else "config"
    if not isinstance(stages_raw, list) or len(stages_raw) < 2:
        raise UserError(f"{source}: stages: a continual run needs a list of at least 2 stages (got "
                        f"{type(stages_raw).__name__ if not isinstance(stages_raw, list) else len(stages_raw)}). "
                        "Add stages: [{name: A, data: {train: [...]}}, {name: B, ...}]")
    problems: list[str] = []
    specs = []
    for i, st in enumerate(stages_raw):
        try:
            specs.append(StageSpec.model_validate(st))
        except ValidationError as exc:
            for e in exc.errors():
                where = ".".join(str(p) for p in e["loc"])
                if e["type"] == "unsafe_name":  # the stage name becomes a folder: check_name's wording says why
                    problems.append(f"stages.{i}.{where}: {e['msg']}")
                    continue
                problems.append(f"stages.{i}.{where}: {e['msg']} (got {str(e.get('input'))[:60]!r}). Stage keys: "
                                f"name, {', '.join(STAGE_KEYS)}")
    if problems:
        raise ConfigError(problems, source)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError([f"stages: names must be unique (got {names}). Rename the stages"], source)
    base_run = raw.get("run") or {}
    name = base_run.get("name", "run")
    try:  # the continual run's folder is <output_dir>/<name>: never outside output_dir, never output_dir itself
        check_name(name, "run.name")
    except UserError as err:
        raise ConfigError([str(err)], source) from None
    root = Path(base_run.get("output_dir", "runs")) / name
    configs, sources = [], []
    for i, spec in enumerate(specs):
        merged = copy.deepcopy(raw)
        for key in STAGE_KEYS:
            value = getattr(spec, key)
            if value is not None:
                merged[key] = _merge(merged.get(key, {}), value, key) if isinstance(value, dict) else value
        merged["run"] = {"name": f"{i:02d}-{_slug(spec.name)}", "output_dir": str(root / "stages")}
        try:
            cfg, src = load_config(None, overrides, base=merged)
        except ConfigError as err:
            problems += [f"stages.{i} ({spec.name}): {p}" for p in err.problems]
            continue
        configs.append(cfg)
        sources.append(src)
    if problems:
        raise ConfigError(problems, source)
    for i, cfg in enumerate(configs):
        _check_stage(i, names[i], cfg, source)
    return ContinualPlan(name, root, configs, sources, {**raw, "stages": stages_raw, "overrides": overrides or []})


def _check_stage(i: int, name: str, cfg, source: str) -> None:
    from tunelab.ship.export import merge_policy

    problems = []
    if not tasks.get(cfg.task).continual:
        problems.append(f"stages.{i} ({name}): task {cfg.task} trains a new class head per task; continual runs "
                        "support sft, pretrain and generative_classification (one model answers every task)")
    adapter = not methods.fact(cfg.method.name, "TRAINS_BASE")
    ok, reason = merge_policy(cfg.method.name)
    if adapter and not ok:
        problems.append(f"stages.{i} ({name}): method {cfg.method.name} cannot be merged into its base, so the next "
                        f"stage cannot start from it ({reason}). Use full, freeze, lora, dora or ia3")
    if not cfg.data.eval and cfg.data.eval_ratio == 0:
        problems.append(f"stages.{i} ({name}): no validation data, so the task cannot be scored after each stage. "
                        "Set data.eval or data.eval_ratio in the stage")
    if problems:
        raise ConfigError(problems, source)


# --------------------------------------------------------------------------- regulariser state between stages


@dataclass
class StageRun:
    """A finished stage: its config, run directory and the weights the next stage starts from."""

    index: int
    name: str
    cfg: Any
    run_dir: Path
    weights: Path  # a plain model folder: final/ (full, freeze) or merged/ (adapters)


def stage_objectives(prev: StageRun | None, cfg, root: Path, console: Console):
    """Stage k's ``objectives`` derived from stage k-1 (``prev``; None for the first stage).

    This is the one place where regulariser state crosses a stage boundary:

    * **anchor / teacher**: L2-SP and EWC anchor at the weights a run starts from and distillation's
      teacher is that starting model; a stage starts from ``prev.weights``, so they anchor at stage
      k-1 with no further setting;
    * **replay** without files: the buffers of all earlier stages (``buffer/*.jsonl``); the first
      stage has none, so replay is off there;
    * **EWC** without reference data: the Fisher is estimated on stage k-1's training data;
      online EWC across more stages (``gamma``: F = gamma * F_old + F_new) needs stage k-1's Fisher:
      it is passed on as ``ewc.fisher`` with ``ewc.online`` when the previous run wrote
      ``fisher.safetensors`` (the combined Fisher it trained with).
    """
    obj = cfg.objectives
    updates: dict[str, Any] = {}
    if obj.replay is not None and not obj.replay.data:
        buffers = sorted((root / "buffer").glob("*.jsonl")) if prev is not None else []
        if buffers:
            from tunelab.config import DatasetSpec

            updates["replay"] = obj.replay.model_copy(update={"data": [
                DatasetSpec(path=str(b), format="auto", name="replay") for b in buffers]})
        else:
            updates["replay"] = None
            console.print(f"[dim]{cfg.run.name}: replay is off in the first stage (no earlier stage to replay)[/]")
    if obj.ewc is not None and prev is not None:
        ewc_update: dict[str, Any] = {}
        if not obj.ewc.data:
            ewc_update["data"] = list(prev.cfg.data.train)
        fisher = prev.run_dir / "fisher.safetensors"
        if obj.ewc.fisher is None and fisher.is_file():  # online EWC: F = gamma * F_(k-1) + F on stage k-1's data
            ewc_update.update(fisher=str(fisher), online=True)
        if ewc_update:
            updates["ewc"] = obj.ewc.model_copy(update=ewc_update)
    return obj.model_copy(update=updates) if updates else obj


# --------------------------------------------------------------------------- the buffer


def _buffer_path(stage: StageRun, root: Path) -> Path:
    return root / "buffer" / f"{stage.index:02d}-{_slug(stage.name)}.jsonl"


def write_buffer(stage: StageRun, size: int, root: Path) -> Path | None:
    """Keep ``size`` training samples of ``stage`` (seeded), as the stage trained on them, for replay."""

    if size <= 0:
        return None
    prep = prepare_records(stage.cfg, None, Console(quiet=True), True)
    records = list(prep.train)
    if tasks.get(stage.cfg.task).labelled:  # the buffer keeps the chats the model was trained on
        from tunelab.data.tasks import generative_records, label_set, split_labelled

        labels = label_set(records, stage.cfg.classification.labels)
        records, _ = split_labelled(records, labels, "training")
        records = generative_records(records, labels, stage.cfg.classification.prompt)
    rng = random.Random(f"{stage.cfg.train.seed}:{stage.index}:buffer")
    kept = rng.sample(records, min(size, len(records)))
    path = _buffer_path(stage, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(record_row(r), ensure_ascii=False) + "\n" for r in kept))
    return path


# --------------------------------------------------------------------------- scores and transfer


def transfer_metrics(matrix: list[list[float | None]], base: list[float | None]) -> dict[str, float | None]:
    """ACC, BWT, FWT (Lopez-Paz & Ranzato 2017) of ``matrix[i][j]`` (task j after stage i); ``base[j]``
    is the base model's score on task j. Missing scores make the affected figure None."""
    t = len(matrix)
    last = matrix[-1]

    def mean(xs):
        xs = list(xs)
        return None if not xs or any(x is None for x in xs) else sum(xs) / len(xs)

    acc = mean(last)
    bwt = mean(last[j] - matrix[j][j] if last[j] is not None and matrix[j][j] is not None else None
               for j in range(t - 1)) if t > 1 else None
    fwt = mean(matrix[j - 1][j] - base[j] if matrix[j - 1][j] is not None and base[j] is not None else None
               for j in range(1, t)) if t > 1 else None
    return {"acc": acc, "bwt": bwt, "fwt": fwt}


def _score_all(stages, model, tokenizer, console) -> dict[str, dict[str, Any]]:
    """Every task's metric on one model: ``{task name: {metric, value (higher is better), raw...}}``."""
    from tunelab.eval.forgetting import task_metric

    out = {}
    for name, cfg in stages:
        if cfg.data.template not in ("auto", None):
            set_chat_template(tokenizer, cfg.data.template)
        m = task_metric(cfg, model, tokenizer, limit=None, batch_size=cfg.eval.batch_size, console=console)
        if m is None:
            out[name] = {"metric": None, "value": None}
            continue
        m.pop("per_example", None)
        value = m["value"] if m["higher_is_better"] else -m["value"]
        out[name] = {"metric": m["metric"] if m["higher_is_better"] else f"-{m['metric']}", "value": value,
                     "raw": m["value"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n": m["n"]}
    return out


def _score_model(path: str, stages, console) -> dict[str, dict[str, Any]]:
    import torch

    from tunelab.eval.evaluate import load_target

    target = load_target(path, dtype="float32")
    try:
        return _score_all(stages, target.model, target.tokenizer, console)
    finally:
        target.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the runner


def _state_path(root: Path) -> Path:
    return root / "continual.json"


def _load_state(plan: ContinualPlan) -> dict[str, Any]:
    path = _state_path(plan.root)
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("fingerprint") != plan.fingerprint:
            raise UserError(f"{plan.root}: a continual run from another config is here. Choose another run.name "
                            f"(--set run.name=NEW) or remove the folder")
        return state
    return {"fingerprint": plan.fingerprint, "task_names": [], "base": None, "stages": []}


def _save_state(root: Path, state: dict[str, Any]) -> None:
    make_folder(root, "run.output_dir")  # a file in the way: a one-line error, not NotADirectoryError
    atomic_write_text(_state_path(root), json.dumps(state, indent=2, ensure_ascii=False) + "\n")


def _carry_weights(cfg, run_dir: Path, console: Console) -> Path:
    """The plain model folder the next stage starts from (see the module docstring)."""
    if methods.fact(cfg.method.name, "TRAINS_BASE"):  # the final folder is a plain model already
        return run_dir / "final"
    merged = run_dir / "merged"
    if not (merged / "config.json").is_file():
        from tunelab.ship.export import export

        console.print(f"merging the {cfg.method.name} adapter into its base for the next stage -> {merged}")
        export(run_dir, merged, merge=True, dtype="fp32", force=True, verify=False)
    return merged


def _buffer_size(plan: ContinualPlan) -> int:
    sizes = [c.objectives.replay.buffer for c in plan.stages if c.objectives.replay is not None
             and not c.objectives.replay.data]
    return max(sizes, default=0)


def run_continual(plan: ContinualPlan, *, console: Console | None = None,
                  shared_first: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage, scoring every task after each; returns the ``continual.json`` doc.

    ``shared_first`` (``--compare``): a finished first stage of an earlier variant (its state
    entry and base scores) to reuse when this variant's first stage is the same.
    """
    from tunelab.train.recipe import fine_tune

    console = console or Console()
    state = _load_state(plan)
    names = [plan.raw["stages"][i]["name"] for i in range(len(plan.stages))]
    state["task_names"] = names
    tasks = list(zip(names, plan.stages, strict=True))
    if state["base"] is None:
        if shared_first is not None:
            state["base"] = shared_first["base"]
        else:
            console.rule("[bold]continual: base model on every task")
            state["base"] = _score_model(plan.stages[0].model.path, tasks, console)
        _save_state(plan.root, state)
    buffer_size = _buffer_size(plan)
    prev: StageRun | None = None
    for i, cfg in enumerate(plan.stages):
        done = state["stages"][i] if i < len(state["stages"]) else None
        if done is None and i == 0 and shared_first is not None and shared_first.get("config") == _stage_key(cfg):
            done = {**shared_first["stage"], "shared_from": shared_first["stage"]["run_dir"]}
            state["stages"].append(done)
            _save_state(plan.root, state)
        if done is not None and done.get("scores") is not None:
            console.print(f"[dim]stage {i} ({names[i]}): done, scores in {_state_path(plan.root)}[/]")
            prev = StageRun(i, names[i], _with_start(cfg, prev), Path(done["run_dir"]), Path(done["weights"]))
            if buffer_size and i < len(plan.stages) - 1 and not _buffer_path(prev, plan.root).is_file():
                write_buffer(prev, buffer_size, plan.root)  # a first stage shared from another variant
            continue
        console.rule(f"[bold]continual: stage {i} ({names[i]})")
        cfg = _with_start(cfg, prev)
        cfg = cfg.model_copy(update={"objectives": stage_objectives(prev, cfg, plan.root, console)})  # LEAD: the hook
        run_dir = cfg.run_dir
        finished = (run_dir / "summary.json").is_file()
        if not finished:
            resume = (run_dir / "config.yaml").is_file()  # an interrupted stage goes on from its last checkpoint
            fine_tune(cfg, plan.sources[i], resume=resume, console=console)
        weights = _carry_weights(cfg, run_dir, console)
        stage = StageRun(i, names[i], cfg, run_dir, weights)
        if buffer_size and i < len(plan.stages) - 1:
            write_buffer(stage, buffer_size, plan.root)
        entry = {"name": names[i], "run_dir": str(run_dir), "weights": str(weights), "model": cfg.model.path,
                 "objectives": {k: v for k, v in cfg.objectives.model_dump(mode="json").items() if v},
                 "config": _stage_key(plan.stages[i]), "scores": None}
        state["stages"][i:] = [entry]
        _save_state(plan.root, state)
        console.rule(f"[bold]continual: every task after stage {i} ({names[i]})")
        entry["scores"] = _score_model(str(run_dir), tasks, console)
        _save_state(plan.root, state)
        prev = stage
    return finish(plan.root, state, console)


def _stage_key(cfg) -> str:
    """What makes two first stages the same run (everything but where it is written)."""
    dump = cfg.model_dump(mode="json")
    dump.pop("run", None)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def _with_start(cfg, prev: StageRun | None):
    """Stage k's config starting from stage k-1's weights."""
    if prev is None:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(prev.weights)})})


def finish(root: Path, state: dict[str, Any], console: Console) -> dict[str, Any]:
    """The matrix, ACC / BWT / FWT, written to ``continual.json`` and ``continual.md``."""
    names = state["task_names"]
    matrix = [[s["scores"][n]["value"] for n in names] for s in state["stages"]]
    base = [state["base"][n]["value"] for n in names]
    metrics = {names[j]: state["base"][names[j]]["metric"] for j in range(len(names))}
    state["matrix"] = matrix
    state["base_scores"] = base
    state["summary"] = transfer_metrics(matrix, base)
    state["metrics"] = metrics
    state["mixed_metrics"] = len({m for m in metrics.values() if m}) > 1
    _save_state(root, state)
    atomic_write_text(root / "continual.md", continual_markdown(state))
    print_matrix(state, console)
    return state


def _fmt(v: float | None, metric: str | None = "accuracy") -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if metric == "accuracy" else f"{v:.4f}"


def _fmt_delta(v: float | None, metrics: set) -> str:
    if v is None:
        return "-"
    return f"{v * 100:+.1f} pts" if metrics == {"accuracy"} else f"{v:+.4f}"


def continual_markdown(state: dict[str, Any]) -> str:
    names, metrics = state["task_names"], state["metrics"]
    kinds = {m for m in metrics.values() if m}
    lines = ["| after | " + " | ".join(f"{n} ({metrics[n]})" for n in names) + " |",
             "| --- |" + " ---: |" * len(names),
             "| base model | " + " | ".join(_fmt(v, metrics[n]) for v, n in zip(state["base_scores"], names, strict=True)) + " |"]
    for i, row in enumerate(state["matrix"]):
        lines.append(f"| stage {i} ({names[i]}) | " + " | ".join(
            _fmt(v, metrics[n]) for v, n in zip(row, names, strict=True)) + " |")
    s = state["summary"]
    lines += ["", f"ACC {_fmt(s['acc'], 'accuracy' if kinds == {'accuracy'} else None)}, "
                  f"BWT {_fmt_delta(s['bwt'], kinds)}, FWT {_fmt_delta(s['fwt'], kinds)} "
                  "(Lopez-Paz & Ranzato 2017; FWT against the base model's score on each task)."]
    if state.get("mixed_metrics"):
        lines.append("The tasks use different metrics, so ACC / BWT / FWT average unlike quantities: read the matrix.")
    return "\n".join(lines) + "\n"


def print_matrix(state: dict[str, Any], console: Console) -> None:
    names, metrics = state["task_names"], state["metrics"]
    kinds = {m for m in metrics.values() if m}
    table = Table(title="continual: task metric after each stage (rows) on each task (columns)")
    table.add_column("after")
    for n in names:
        table.add_column(f"{n} ({metrics[n]})", justify="right")
    table.add_row("base model", *[_fmt(v, metrics[n]) for v, n in zip(state["base_scores"], names, strict=True)])
    for i, row in enumerate(state["matrix"]):
        table.add_row(f"stage {i} ({names[i]})", *[_fmt(v, metrics[n]) for v, n in zip(row, names, strict=True)])
    console.print(table)
    s = state["summary"]
    console.print(f"ACC {_fmt(s['acc'], 'accuracy' if kinds == {'accuracy'} else None)}  BWT {_fmt_delta(s['bwt'], kinds)}"
                  f"  FWT {_fmt_delta(s['fwt'], kinds)}")


# --------------------------------------------------------------------------- --compare


DEFAULTS = {"ewc": 5000.0, "l2sp": 0.01, "distill": 1.0, "replay": 0.25}


def parse_variants(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``naive,ewc:5000,replay:0.3`` -> [(label, objectives dict applied from the second stage on)]."""
    out = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        kind, _, value = item.partition(":")
        if kind == "naive":
            if value:
                raise UserError(f"--compare {item}: naive takes no value. Write naive")
            out.append(("naive", {}))
            continue
        if kind not in DEFAULTS:
            raise UserError(f"--compare {item}: unknown variant {kind!r}. Choose from naive, "
                            f"{', '.join(DEFAULTS)} (optionally with a value, e.g. ewc:5000, replay:0.3)")
        try:
            number = float(value) if value else DEFAULTS[kind]
        except ValueError:
            raise UserError(f"--compare {item}: the value after ':' must be a number (got {value!r})") from None
        settings = {"ratio": number} if kind == "replay" else {"weight": number}
        out.append((f"{kind}:{number:g}", {kind: settings}))
    if not out:
        raise UserError("--compare: no variant given. E.g. --compare naive,ewc,replay,distill")
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise UserError(f"--compare: a variant is listed twice (got {labels})")
    return out


def variant_raw(raw: dict[str, Any], label: str, objectives: dict[str, Any]) -> dict[str, Any]:
    """The config of one variant: no objectives in the first stage, ``objectives`` in every later one
    (replacing what the file set), written under ``<run>/compare/<variant>/``."""
    raw = copy.deepcopy(raw)
    raw.pop("overrides", None)
    run = raw.setdefault("run", {})
    root = Path(run.get("output_dir", "runs")) / run.get("name", "run")
    raw["run"] = {"name": _slug(label.replace(":", "-")), "output_dir": str(root / "compare")}
    raw.pop("objectives", None)
    stages = []
    for i, st in enumerate(raw["stages"]):
        st = dict(st)
        st["objectives"] = copy.deepcopy(objectives) if i > 0 else {}
        stages.append(st)
    raw["stages"] = stages
    return raw


def run_compare(path: str | Path, variants_text: str, overrides: list[str] | None = None,
                console: Console | None = None) -> dict[str, Any]:
    """Each variant as its own continual run; ACC / BWT / FWT side by side (``compare.json``, ``compare.md``)."""
    console = console or Console()
    raw = _read_yaml(Path(path))
    try:  # the variants go under <output_dir>/<run.name>/compare/: run.name must be one folder name
        check_name((raw.get("run") or {}).get("name", "run"), "run.name")
    except UserError as err:
        raise ConfigError([str(err)], str(path)) from None
    variants = parse_variants(variants_text)
    plans = [(label, load_continual(path, overrides, raw=variant_raw(raw, label, obj))) for label, obj in variants]
    root = plans[0][1].root.parent.parent
    shared_first = None
    rows = []
    for label, plan in plans:
        console.rule(f"[bold]variant {label}")
        state = run_continual(plan, console=console, shared_first=shared_first)
        if shared_first is None:
            shared_first = {"base": state["base"], "stage": state["stages"][0], "config": state["stages"][0]["config"]}
        rows.append({"variant": label, "run": str(plan.root), **state["summary"], "matrix": state["matrix"],
                     "metrics": state["metrics"]})
    doc = {"config": str(path), "variants": rows, "tasks": state["task_names"], "base": state["base_scores"]}
    _save_compare(root, doc, console)
    return doc


def _save_compare(root: Path, doc: dict[str, Any], console: Console) -> None:
    kinds = {m for r in doc["variants"] for m in r["metrics"].values() if m}
    names = doc["tasks"]
    lines = ["| variant | ACC | BWT | FWT | " + " | ".join(f"{n} (final)" for n in names) + " |",
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(names)]
    table = Table(title="continual: variants side by side")
    for h in ("variant", "ACC", "BWT", "FWT", *[f"{n} (final)" for n in names]):
        table.add_column(h, justify="left" if h == "variant" else "right")
    metric = "accuracy" if kinds == {"accuracy"} else None
    for r in doc["variants"]:
        cells = [r["variant"], _fmt(r["acc"], metric), _fmt_delta(r["bwt"], kinds), _fmt_delta(r["fwt"], kinds),
                 *[_fmt(v, metric) for v in r["matrix"][-1]]]
        lines.append("| " + " | ".join(cells) + " |")
        table.add_row(*cells)
    make_folder(root, "run.output_dir")  # a file in the way: a one-line error, not NotADirectoryError
    atomic_write_text(root / "compare.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(root / "compare.md", "\n".join(lines) + "\n")
    console.print(table)
    console.print(f"[dim]written: {root / 'compare.json'}, {root / 'compare.md'}[/]")
