"""The ``tunelab`` command: a table of verbs.

Each verb is an options model (its flags: :mod:`tunelab.cli_args` builds them from the model's
fields), a function that calls the verb's entry function with the parsed options, and optionally
a printer of the result. The options models live next to the entry functions they configure
(``tunelab.data.settings``, ``tunelab.ship.settings``, ...).

User errors (:class:`tunelab.errors.UserError`) are printed on one line (a config error: one
line per problem) and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from tunelab import __version__
from tunelab.cli_args import add_options, parse_options
from tunelab.data.annotate import agreement_file
from tunelab.data.augment import augment_file
from tunelab.data.settings import (
    AgreementOptions,
    AugmentOptions,
    CleanOptions,
    InspectOptions,
    LeakageOptions,
    SplitOptions,
    WeightsOptions,
)
from tunelab.data.weights import weights_file
from tunelab.demo.settings import DemoOptions
from tunelab.errors import UserError
from tunelab.eval.runs import filter_runs, list_runs, print_runs, show_run, sort_runs
from tunelab.eval.settings import (
    CompareOptions,
    CvOptions,
    EvalOptions,
    RunsMlflowOptions,
    RunsOptions,
    RunsShowOptions,
)
from tunelab.eval.tracking import log_to_mlflow
from tunelab.fsutil import atomic_write_text, refuse_existing
from tunelab.quiet import quiet_libraries
from tunelab.report.settings import ReportOptions
from tunelab.search.settings import AdviseOptions, SelectRequest, SweepOptions
from tunelab.ship.settings import ChatOptions, ExportOptions, GenerateOptions, PredictOptions, ServeOptions
from tunelab.train import launch
from tunelab.train.cpu_tuning import rank_environment
from tunelab.train.run import RunDir
from tunelab.train.settings import ConfigShowOptions, ContinualOptions, TrainOptions
from tunelab.ui.settings import UiOptions

err_console = Console(stderr=True)


@dataclass(frozen=True)
class Verb:
    """One ``tunelab`` verb: ``run(options)`` calls the entry function; ``show(result, options)``
    prints what it returned. The exit status is what ``show`` returns (else what ``run``
    returns, when it is an int), else 0."""

    options: type[BaseModel]
    run: Callable[[Any], Any]
    help: str
    description: str | None = None
    show: Callable[[Any, Any], int | None] | None = None
    epilog: Callable[[], str] | None = None


def _schema_help() -> str:
    """Every config key with its type, default and description (``train`` and ``config show``)."""
    from tunelab.config import describe_schema

    lines = ["config keys (YAML, or --set KEY=VALUE):"]
    for path, type_name, default, doc in describe_schema():
        if path.startswith("method.name="):
            lines.append(f"  {path}: {doc}")
            continue
        head = f"  {path} ({type_name}, default {default})" if type_name else f"  {path}"
        lines.append(head)
        if doc:
            lines += textwrap.wrap(doc, 100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _print_json(obj) -> None:
    Console().print_json(json.dumps(obj, ensure_ascii=False, default=str))


def _refuse_existing(path, flag: str, *, force: bool) -> None:
    """A verb never replaces a file the user names unless --force (fsutil.refuse_existing)."""

    refuse_existing(pathlib.Path(path), flag, force=force)


# ----------------------------------------------------------------------------- train, config, advise


def _train(o: TrainOptions) -> int | None:
    from tunelab.config import load_config

    if o.dry_run:
        return _advise(AdviseOptions(config=o.config, set=o.set), dry_run=True)
    # Without the task's rules first: they import the model stack (about 6 s), which a launcher, that only starts
    # the ranks, never needs. Each rank checks the config whole, and rank 0 prints what it finds.
    cfg, sources = load_config(o.config, o.set, task_rules=False)
    if o.resume:
        _check_resume_config(cfg)
    nodes = launch.Nodes(o.nnodes, o.node_rank, o.master_addr, o.master_port)
    if o.node_rank == 0 and not launch.launched():  # the run folder's refusals before a rank starts or the model
        RunDir.check(cfg.run_dir, resume=o.resume)  # stack loads (rank 0 checks them again as it opens the run)
    if (cfg.train.processes > 1 or o.nnodes > 1) and not launch.launched():
        argv = ["train", o.config, *(x for kv in o.set for x in ("--set", kv))]
        env = rank_environment(cfg.train, sharded=cfg.train.sharded)
        return launch.run_processes([*argv, "--resume"] if o.resume else argv, cfg.train.processes, nodes=nodes,
                                    env=env)
    from tunelab.train.recipe import fine_tune

    cfg, sources = load_config(o.config, o.set)
    fine_tune(cfg, sources, resume=o.resume)
    return None


def _check_resume_config(cfg) -> None:
    """On --resume the config must be the one the run started with (the data order depends on it)."""

    saved = cfg.run_dir / "config.yaml"
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text())
    now = cfg.model_dump(mode="json")
    changed = [k for k in ("model", "data", "method") if before.get(k) != now.get(k)]
    changed += [f"train.{k}" for k in ("batch_size", "grad_accum", "seed", "max_steps", "epochs", "optimizer", "lr")
                if before.get("train", {}).get(k) != now["train"].get(k)]
    if changed:
        raise UserError(
            f"{saved}: --resume with a different config ({', '.join(changed)} changed). "
            f"Resume with the same config, or start a new run with --set run.name=NEW"
        )


def _config_show(o: ConfigShowOptions) -> None:

    from tunelab.config import dump_config, flatten, load_config

    cfg, sources = load_config(o.config, o.set)
    if o.yaml:
        print(dump_config(cfg, sources), end="")
        return
    table = Table(title=f"resolved config: {o.config}")
    for col in ("key", "value", "from"):
        table.add_column(col)
    for key, value in flatten(cfg.model_dump(mode="json")).items():
        src = sources.get(key, "default")
        table.add_row(key, repr(value), src if src != "default" else "[dim]default[/]")
    Console().print(table)


def _advise(o: AdviseOptions, *, dry_run: bool = False) -> None:
    """``advise``; ``train --dry-run`` too: the configured method beside full, LoRA and QLoRA."""
    from tunelab.config import load_config
    from tunelab.search.advise import DRY_RUN_METHODS, advise, print_advice, probe_task

    cfg, _ = load_config(o.config, o.set)
    methods = o.methods or (list(DRY_RUN_METHODS) if dry_run else None)
    if dry_run and probe_task(cfg).class_head:
        methods = ["head", "lora", "full"]
    print_advice(advise(cfg, probe_steps=o.probe_steps, methods=methods, all_checkpointing=not dry_run), Console())


def _sweep(o: SweepOptions) -> None:
    from tunelab.config import load_config
    from tunelab.search.sweep import run_worker, sweep, write_outputs

    cfg, _ = load_config(o.config, o.set)
    if o.worker:  # one of the processes of a sweep (or a worker started by hand on another machine)
        run_worker(cfg, Console())
    elif o.report:
        write_outputs(cfg, Console())
    else:
        sweep(cfg, Console(), workers=o.workers)


def _select(o: SelectRequest) -> None:
    from tunelab.search.select import select_model

    select_model(o, Console())


def _cv(o: CvOptions) -> None:
    from tunelab.config import load_config
    from tunelab.eval.cv import cross_validate

    cfg, sources = load_config(o.config, o.set)
    cross_validate(cfg, sources, folds=o.folds, group=o.group, console=Console())


def _continual(o: ContinualOptions) -> None:
    from tunelab.train.continual import load_continual, run_compare, run_continual

    if o.compare:
        run_compare(o.config, o.compare, o.set)
    else:
        run_continual(load_continual(o.config, o.set))


def _demo(o: DemoOptions) -> None:
    from tunelab.demo.run import run_demo

    run_demo(o.workdir, fresh=o.fresh)


# ----------------------------------------------------------------------------- generate, chat, export, predict, serve


def _messages(system: str | None, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _generate(o: GenerateOptions) -> None:
    from tunelab.ship.inference import generate_reply, load_for_inference

    loaded = load_for_inference(o.target, checkpoint=o.checkpoint)
    for prompt in o.prompt:
        print(generate_reply(loaded, _messages(o.system, prompt), **o.sampling()), flush=True)


def _chat(o: ChatOptions) -> None:
    from transformers import TextStreamer

    from tunelab.ship.inference import base_only, generate_reply, load_for_inference

    loaded = load_for_inference(o.target, checkpoint=o.checkpoint)
    if o.compare_base:
        base_only(loaded)  # refuses a model without adapters now, not after the first question
    console = Console()
    console.print(f"[bold]{loaded.description}[/]  (empty line or Ctrl-D to quit, /reset to clear history)")
    if o.compare_base:
        console.print(f"[dim]--compare-base: each answer is followed by the base model's ({loaded.base_model}), "
                      "the same weights with the adapters disabled[/]")
    history: list[dict] = [{"role": "system", "content": o.system}] if o.system else []
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = {**o.sampling(), "streamer": streamer}
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            break
        if not text:
            break
        if text == "/reset":
            history = history[:1] if o.system else []
            continue
        history.append({"role": "user", "content": text})
        print("tuned> " if o.compare_base else "model> ", end="", flush=True)
        reply = generate_reply(loaded, history, **options)
        if o.compare_base:
            print("base>  ", end="", flush=True)
            with base_only(loaded):
                generate_reply(loaded, history, **options)
        history.append({"role": "assistant", "content": reply})


def _export(o: ExportOptions):
    from tunelab.ship.export import export

    return export(o.target, o.out, merge=o.merge, dtype=o.dtype, gguf=o.gguf, force=o.force,
                  checkpoint=o.checkpoint, verify=o.verify, quant=o.quant, ollama=o.ollama,
                  lora_gguf=o.lora_gguf)


def _show_export(result, o: ExportOptions) -> None:
    console = Console(soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    what = {"merged": "merged model", "adapter": "adapters (PEFT)", "full": "full model", "model": "model"}[result.kind]
    console.print(f"exported {what} ({result.dtype or 'as trained'}) to {result.out}: "
                  f"{len(result.files)} files + SHA256SUMS", highlight=False)
    for file in result.ggufs:
        console.print(f"GGUF {file.kind}: {file.path} ({file.size / 2**20:.1f} MiB; {gguf_check_text(file)})",
                      highlight=False)


def gguf_check_text(file) -> str:
    """What was checked on one GGUF file, in words (figures from tunelab.ship.gguf_export.GGUFFile)."""
    f = file.figures
    if file.checked_by is None:
        return "not run (--no-verify)"
    where = file.checked_by + ("" if file.checked_by == "llama.cpp" else
                               ", not llama.cpp: pip install 'tunelab[gguf]' to run it there")
    if "greedy_tokens" in f:
        ppl = f", held-out perplexity {f['perplexity']:.2f}" if "perplexity" in f else ""
        ties = f.get("greedy_ties", 0)
        tied = f" and {ties} near-tie(s) (Hugging Face's top two logits within 1e-3)" if ties else ""
        return (f"{where}: {f['greedy_tokens'] - ties} greedy tokens identical{tied}, top-1 logits within "
                f"{f['top1_logit_error']:.1e}{ppl}")
    return f"{where}: held-out perplexity {f['perplexity']:.2f}, {f['perplexity_rise']:+.2%} vs F16"


def _predict(o: PredictOptions):
    from tunelab.ship.predict import predict

    return predict(o.target, o.data, o.out, checkpoint=o.checkpoint, batch_size=o.batch_size, system=o.system,
                   task=o.task, **o.sampling())


def _show_predict(s, o: PredictOptions) -> None:
    console = Console(soft_wrap=True)
    resumed = f", {s.done_before} already there" if s.done_before else ""
    console.print(f"{s.written} predictions written to {s.out} ({s.rows} rows{resumed})", highlight=False)
    if s.rejected:
        reasons = ", ".join(f"{k}: {v}" for k, v in s.reject_reasons.items())
        console.print(f"[yellow]{s.rejected} rows rejected[/] ({reasons}); see {s.rejects_file}", highlight=False)


def _serve(o: ServeOptions) -> None:
    from tunelab.ship.serve import serve

    settings = o.settings(os.environ.get("TUNELAB_API_KEYS", ""))
    serve(o.targets, settings, checkpoint=o.checkpoint, dtype=o.dtype, console=Console())


# ----------------------------------------------------------------------------- data workbench


def _data_inspect(o: InspectOptions):
    from tunelab.data.inspect import inspect_target, public, write_html

    for path, flag in ((o.html, "--html"), (o.json_out, "--json")):
        if path:
            _refuse_existing(path, flag, force=o.force)
    reports = inspect_target(o.target, model=o.model, max_length=o.max_length, limit=o.limit,
                             near_threshold=o.threshold)
    html = write_html(reports, o.html) if o.html else None
    if o.json_out:
        atomic_write_text(o.json_out, json.dumps([public(r) for r in reports], indent=2, ensure_ascii=False))
    return reports, html


def _show_inspect(result, o: InspectOptions) -> None:
    from tunelab.data.inspect import print_report

    reports, html = result
    console = Console()
    for r in reports:
        print_report(r, console)
    if html:
        console.print(f"HTML report: {html}")


def _data_clean(o: CleanOptions):
    from tunelab.data.clean import clean_file, default_removed_path

    _refuse_existing(o.out, "--out", force=o.force)
    removed = o.removed or default_removed_path(pathlib.Path(o.out))
    _refuse_existing(removed, "--removed" if o.removed else "--removed (default <out>.removed.jsonl)", force=o.force)
    return clean_file(o.input, o.out, o.settings(), format=o.format, removed=o.removed, progress=True)


def _show_clean(r, o: CleanOptions) -> None:
    Console().print(f"{r.rows_read:,} rows read, {r.rows_written:,} written to {r.output}; removed "
                    f"{r.removed_by_reason or 'none'} -> {r.removed_file}" +
                    (f"; {r.conflict_groups} conflicting groups -> {r.conflicts_file}" if r.conflicts_file else ""))
    _print_json(r.steps)


def _data_split(o: SplitOptions):
    from tunelab.data.split import check_out_dir, split_file

    check_out_dir(o.out_dir, o.input, kfold=o.kfold, n_ratios=len(o.ratios), force=o.force)
    return split_file(o.input, o.out_dir, o.settings(), kfold=o.kfold, format=o.format).to_dict()


def _data_leakage(o: LeakageOptions):
    from tunelab.data.split import leakage

    return leakage(o.files, threshold=o.threshold)


def _show_leakage(r, o: LeakageOptions) -> int:
    _print_json(r)
    leaked = any(f["exact"] or f["near"] for f in r["files"])
    return 1 if (leaked and o.fail) else 0


def _data_agreement(o: AgreementOptions):

    if o.out:
        _refuse_existing(o.out, "--out", force=o.force)
    d = agreement_file(o.input, column=o.column, annotators=o.annotators, out=o.out).to_dict()
    d["disagreements"] = d["disagreements"][: o.show]
    return d


def _data_augment(o: AugmentOptions):

    _refuse_existing(o.out, "--out", force=o.force)
    return augment_file(o.input, o.out, o.settings(), format=o.format)


def _data_weights(o: WeightsOptions):

    _refuse_existing(o.out, "--out", force=o.force)
    return weights_file(o.input, o.out, scheme=o.scheme, beta=o.beta, format=o.format)


def _show_json(result, o) -> None:
    _print_json(result)


# ----------------------------------------------------------------------------- eval, compare, runs, report


def _eval(o: EvalOptions) -> list[dict]:
    from tunelab.eval.evaluate import evaluate, request_from_options

    # the written results (printed already); the web UI's Evaluate tab shows them as tables
    return evaluate(o.target, request_from_options(o), checkpoint=o.checkpoint, out_dir=o.out)


def _compare(o: CompareOptions) -> list[dict]:
    from tunelab.eval.compare import compare
    from tunelab.eval.evaluate import request_from_options

    return compare(o.run_a, o.run_b, request_from_options(o), checkpoint=o.checkpoint, out=o.out)


def _runs(o: RunsOptions):

    return sort_runs(filter_runs(list_runs(o.dir), o.filter), o.sort)


def _show_runs(rows, o: RunsOptions) -> None:

    if o.json_out:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print_runs(rows)


def _runs_show(o: RunsShowOptions) -> None:

    show_run(o.dir, o.name)


def _runs_mlflow(o: RunsMlflowOptions) -> None:

    for name in o.names:
        run = pathlib.Path(name) if (pathlib.Path(name) / "config.yaml").is_file() else pathlib.Path(o.dir) / name
        print(f"{run}: MLflow run {log_to_mlflow(run, tracking_uri=o.tracking_uri, experiment=o.experiment)}")


def _report(o: ReportOptions):
    from tunelab.report.html import write_report

    return write_report(o.runs, o.out)


def _show_report(paths, o: ReportOptions) -> None:
    print(f"report: {paths[0]}\nmarkdown: {paths[1]}")


def _ui(o: UiOptions) -> None:
    from tunelab.ui.app import serve

    serve(o, VERBS)  # the web UI's Data / Evaluate / Export tabs are forms over this same table


# ----------------------------------------------------------------------------- the table

GROUPS = {
    "config": "inspect configs",
    "data": "inspect, clean, de-duplicate, split, augment and weight data files",
}
"""Verbs that only hold sub-verbs (``tunelab data clean``): their help line."""

VERBS: dict[str, Verb] = {
    "train": Verb(TrainOptions, _train, "fine-tune a model as a YAML config says",
                  "Fine-tune a model as the config says; writes runs/<name>/.", epilog=_schema_help),
    "config show": Verb(ConfigShowOptions, _config_show, "print the resolved config and where each value came from",
                        epilog=_schema_help),
    "generate": Verb(GenerateOptions, _generate, "generate a reply to one or more prompts"),
    "chat": Verb(ChatOptions, _chat, "interactive chat with streaming output"),
    "demo": Verb(DemoOptions, _demo, "the bundled demo: policy recommendation, SmolLM2 fine-tuned on it",
                 "Generate the demo data, score the base model, fine-tune its top 15 layers, score the tuned model, "
                 "and print both beside two baselines that need no model."),
    "data inspect": Verb(InspectOptions, _data_inspect,
                         "statistics of a data file or of a training config's files (+ HTML)", show=_show_inspect),
    "data clean": Verb(CleanOptions, _data_clean, "normalise, mask PII, filter lengths, resolve conflicts, "
                       "de-duplicate", show=_show_clean),
    "data split": Verb(SplitOptions, _data_split, "stratified, group-aware train/val/test split (or k folds)",
                       show=_show_json),
    "data leakage": Verb(LeakageOptions, _data_leakage,
                         "exact and near overlaps of later files with the first (TRAIN TEST ...)", show=_show_leakage),
    "data agreement": Verb(AgreementOptions, _data_agreement,
                           "annotator agreement (Cohen / Fleiss kappa), disagreements, majority vote", show=_show_json),
    "data augment": Verb(AugmentOptions, _data_augment, "EDA, sentence re-ordering, model paraphrase / "
                         "back-translation", show=_show_json),
    "data weights": Verb(WeightsOptions, _data_weights, "add class-balanced sample weights (a weight column)",
                         show=_show_json),
    "export": Verb(ExportOptions, _export, "export a run: merged model, adapters only, GGUF; with a checksum manifest",
                   "Write a run's weights to --out in the Hugging Face layout (safetensors, tokenizer, chat template, "
                   "generation config) with a SHA256SUMS manifest. Adapter runs export the PEFT adapters unless "
                   "--merge folds them into the base.", show=_show_export),
    "predict": Verb(PredictOptions, _predict, "batched, resumable predictions for a data file (JSONL out)",
                    show=_show_predict),
    "serve": Verb(ServeOptions, _serve, "OpenAI-compatible HTTP API over one or more runs",
                  "Serve runs (several adapter runs share one base; pick one with the request's `model`) at "
                  "/v1/models, /v1/chat/completions, /v1/completions, /v1/classify, /health and /metrics."),
    "eval": Verb(EvalOptions, _eval, "score a run or a model on data files and benchmarks",
                 "Score a run (or any model) on data files and multiple-choice benchmarks; results go to "
                 "<run>/eval/ (or --out)."),
    "compare": Verb(CompareOptions, _compare, "paired A/B comparison of two runs on the same examples",
                    "Score two runs (or models) on the same examples; report the difference with a bootstrap CI and "
                    "a p-value (McNemar for right/wrong scores, paired bootstrap otherwise), and the examples where "
                    "they disagree."),
    "runs": Verb(RunsOptions, _runs, "list runs (tunelab runs show NAME for one)",
                 "List the runs under --dir with model, method, hyperparameters and metrics.", show=_show_runs),
    "runs show": Verb(RunsShowOptions, _runs_show, "everything about one run"),
    "runs mlflow": Verb(RunsMlflowOptions, _runs_mlflow,
                        "log runs to MLflow (params, per-step metrics, evaluations, artifacts)"),
    "report": Verb(ReportOptions, _report, "one self-contained HTML report (and Markdown) for one or more runs",
                   show=_show_report),
    "cv": Verb(CvOptions, _cv, "k-fold cross-validation of a config: K runs, mean and std of each metric",
               "Cut each data.train file into K folds (stratified by label, duplicates kept in one fold), train fold "
               "i on the rest into <run>/fold-<i>/ with fold i as data.eval, and write the mean, standard deviation "
               "and per-fold values of every metric to <run>/cv.json. Re-running skips finished folds."),
    "continual": Verb(ContinualOptions, _continual,
                      "continual learning: train the config's stages one after another, score every task after each",
                      "Train the stages of a config (task A, then B, then C), each from the previous stage's weights; "
                      "after every stage score every task: the accuracy matrix, ACC, BWT and FWT in "
                      "<run>/continual.json. Finished stages are never re-run; an interrupted stage resumes from its "
                      "last checkpoint."),
    "sweep": Verb(SweepOptions, _sweep, "hyperparameter search over a config's sweep: section (Optuna)",
                  "Train trials with sampled values of the config's sweep.params; pruning, resumable storage, "
                  "several workers; writes <output_dir>/<run.name>-sweep/."),
    "select": Verb(SelectRequest, _select, "rank candidate base models on your validation data",
                   "Loss and task metric zero- and few-shot, parameters, memory per method, measured throughput; "
                   "a ranked table with the reasons."),
    "ui": Verb(UiOptions, _ui, "web workbench: train and watch runs, compare, chat, data, evaluate, export",
               "Serve the Gradio workbench on --host:--port (loopback by default; any other address needs --auth or "
               "--auth-file). Runs start as `tunelab train` processes that outlive the page and the UI."),
    "advise": Verb(AdviseOptions, _advise, "memory and time estimate per method, and a recommended strategy",
                   "Peak memory per method (weights, gradients, optimiser states, activations with and without "
                   "checkpointing), a timed probe, and a recommendation in words."),
}


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: tunelab VERB: what. See: tunelab VERB --help``)
    like every other user error, instead of the usage block and a second line. Sub-commands use this
    class too (``add_subparsers`` makes its parsers of the parent's class)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}. See: {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``tunelab`` parser: a sub-parser per entry of :data:`VERBS` (and :data:`GROUPS`)."""
    p = _Parser(prog="tunelab", description="Fine-tune LLMs on your own data and hardware.")
    p.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parsers: dict[str, argparse.ArgumentParser] = {"": p}
    subs: dict[str, Any] = {}

    def parser_for(path: str) -> argparse.ArgumentParser:
        if path not in parsers:  # a group that only holds sub-verbs (tunelab data)
            parsers[path] = sub_of(path.rpartition(" ")[0]).add_parser(path.rpartition(" ")[2], help=GROUPS[path])
        return parsers[path]

    def sub_of(path: str):
        if path not in subs:
            dest = f"{path.replace(' ', '_')}_verb" if path else "verb"
            subs[path] = parser_for(path).add_subparsers(dest=dest, metavar="ACTION" if path else "VERB")
        return subs[path]

    for key, verb in VERBS.items():
        parent, _, name = key.rpartition(" ")
        kw: dict[str, Any] = {"help": verb.help, "description": verb.description or verb.help[:1].upper() + verb.help[1:]}
        if verb.epilog:
            kw.update(formatter_class=argparse.RawDescriptionHelpFormatter, epilog=verb.epilog())
        sp = sub_of(parent).add_parser(name, **kw)
        parsers[key] = sp
        add_options(sp, verb.options)
        sp.set_defaults(_verb=key, _prog=sp.prog)
    return p


def main(argv: list[str] | None = None) -> int:

    quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a usage error (status 2, one line printed by _Parser), or --help / --version
        return stop.code if isinstance(stop.code, int) else 2
    if not getattr(args, "_verb", None):
        parser.print_help()
        return 2
    verb = VERBS[args._verb]
    try:
        options = parse_options(verb.options, args, prog=args._prog)
        result = verb.run(options)
        status = verb.show(result, options) if verb.show else result
        return status if isinstance(status, int) else 0
    except UserError as err:
        if not (os.environ.get(launch.LAUNCHED_ENV) and launch.local_rank() != 0):  # the first process of each machine says it once
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        # A path the user gave that no check above caught (a folder where a file goes, an unreadable
        # file...): still one line naming the path, not a traceback. Without a path it is a bug: re-raise.
        if err.filename is None:
            raise
        if not (os.environ.get(launch.LAUNCHED_ENV) and launch.local_rank() != 0):
            err_console.print(f"[bold red]error:[/] {err.filename}: {err.strerror or type(err).__name__} "
                              f"(got {type(err).__name__}). Check the path and its permissions",
                              highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
