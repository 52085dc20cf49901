"""The ``tunelab`` command: one function per verb; each parses, then calls one entry function.

User errors (:class:`tunelab.errors.UserError`) are printed on one line (a config error: one
line per problem) and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import textwrap

from rich.console import Console

from tunelab import __version__
from tunelab.errors import UserError
from tunelab.train import launch

err_console = Console(stderr=True)


def _schema_help() -> str:
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


# ----------------------------------------------------------------------------- verbs


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    cfg, sources = load_config(args.config, args.set)
    if getattr(args, "dry_run", False):
        return cmd_advise(args)
    if args.resume and args.config is not None:
        _check_resume_config(cfg)
    if cfg.train.processes > 1 and not launch.launched():
        argv = ["train", args.config, *(x for kv in args.set for x in ("--set", kv))]
        return launch.run_processes([*argv, "--resume"] if args.resume else argv, cfg.train.processes)
    fine_tune(cfg, sources, resume=args.resume)
    return 0


def _check_resume_config(cfg) -> None:
    """On --resume the config must be the one the run started with (the data order depends on it)."""
    import yaml

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


def cmd_config_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from tunelab.config import dump_config, load_config

    cfg, sources = load_config(args.config, args.set)
    if args.yaml:
        print(dump_config(cfg, sources), end="")
        return 0
    table = Table(title=f"resolved config: {args.config}")
    for col in ("key", "value", "from"):
        table.add_column(col)
    from tunelab.config import _flatten

    for key, value in _flatten(cfg.model_dump(mode="json")).items():
        src = sources.get(key, "default")
        table.add_row(key, repr(value), src if src != "default" else "[dim]default[/]")
    Console().print(table)
    return 0


def _messages(system: str | None, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.ship.inference import generate_reply, load_for_inference

    loaded = load_for_inference(args.target, checkpoint=args.checkpoint)
    for prompt in args.prompt:
        reply = generate_reply(loaded, _messages(args.system, prompt), max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        print(reply)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from tunelab.ship.inference import base_only, generate_reply, load_for_inference

    loaded = load_for_inference(args.target, checkpoint=args.checkpoint)
    compare = getattr(args, "compare_base", False)
    if compare:
        base_only(loaded)  # refuses a model without adapters now, not after the first question
    console = Console()
    console.print(f"[bold]{loaded.description}[/]  (empty line or Ctrl-D to quit, /reset to clear history)")
    if compare:
        console.print(f"[dim]--compare-base: each answer is followed by the base model's ({loaded.base_model}), "
                      "the same weights with the adapters disabled[/]")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "seed": args.seed, "streamer": streamer}
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            break
        if not text:
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        print("tuned> " if compare else "model> ", end="", flush=True)
        reply = generate_reply(loaded, history, **options)
        if compare:
            print("base>  ", end="", flush=True)
            with base_only(loaded):
                generate_reply(loaded, history, **options)
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.demo.run import run_demo

    run_demo(args.workdir, fresh=args.fresh)
    return 0


# ----------------------------------------------------------------------------- data workbench verbs


def _print_json(obj) -> None:
    import json

    Console().print_json(json.dumps(obj, ensure_ascii=False, default=str))


def _refuse_existing(path, field: str, *, force: bool) -> None:
    """A data verb never replaces a file the user names unless --force (fsutil.refuse_existing)."""
    from tunelab.fsutil import refuse_existing

    refuse_existing(pathlib.Path(path), field, force=force)


def _data_settings(cls, verb: str, flags: dict[str, str] | None = None, given: dict[str, str] | None = None,
                   **values):
    """``cls(**values)``, a data verb's settings; a pydantic error becomes a one-line :class:`UserError`
    naming the option (``flags`` maps a field to its option when not ``--<field>``). ``given`` holds
    the text the user typed where it differs from the parsed value; a check of the whole model
    names the first field of ``given`` (else of ``values``)."""
    import re

    from pydantic import ValidationError

    try:
        return cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else next(iter(given or values))
        flag = (flags or {}).get(field, "--" + field.replace("_", "-"))
        what = re.sub(r"\s*\(got [^)]*\)$", "", first["msg"].removeprefix("Value error, "))
        got = (given or {}).get(field, values.get(field, first.get("input")))
        raise UserError(f"{flag}: {what} (got {got!r}). See `tunelab data {verb} --help`.") from None


def cmd_data_inspect(args: argparse.Namespace) -> int:
    import json

    from tunelab.data.inspect import inspect_target, print_report, public, write_html

    for path, flag in ((args.html, "--html"), (args.json, "--json")):
        if path:
            _refuse_existing(path, flag, force=args.force)
    reports = inspect_target(args.target, model=args.model, max_length=args.max_length, limit=args.limit,
                             near_threshold=args.threshold)
    console = Console()
    for r in reports:
        print_report(r, console)
    if args.html:
        console.print(f"HTML report: {write_html(reports, args.html)}")
    if args.json:
        from tunelab.fsutil import atomic_write_text

        atomic_write_text(args.json, json.dumps([public(r) for r in reports], indent=2, ensure_ascii=False))
    return 0


def cmd_data_clean(args: argparse.Namespace) -> int:
    from tunelab.data.clean import clean_file
    from tunelab.data.settings import (
        CleanSettings,
        ConflictSettings,
        DedupSettings,
        LengthSettings,
        PiiSettings,
    )

    length = None
    if any(v is not None for v in (args.min_chars, args.max_chars, args.min_tokens, args.max_tokens)):
        length = _data_settings(LengthSettings, "clean", {"field": "--length-field"}, field=args.length_field,
                                min_chars=args.min_chars, max_chars=args.max_chars, min_tokens=args.min_tokens,
                                max_tokens=args.max_tokens, tokenizer=args.tokenizer)
    s = CleanSettings(
        normalize=None if args.no_normalize else CleanSettings().normalize,
        pii=PiiSettings() if args.pii else None, length=length,
        conflicts=None if args.conflicts == "off" else _data_settings(ConflictSettings, "clean",
                                                                        {"policy": "--conflicts"},
                                                                        policy=args.conflicts),
        dedup=None if (args.no_exact and args.no_near) else _data_settings(
            DedupSettings, "clean", {"exact": "--no-exact", "near": "--no-near"},
            exact=not args.no_exact, near=not args.no_near, threshold=args.threshold, key=args.key),
    )
    from tunelab.data.clean import default_removed_path

    _refuse_existing(args.out, "--out", force=args.force)
    removed = args.removed or default_removed_path(pathlib.Path(args.out))
    _refuse_existing(removed, "--removed" if args.removed else "--removed (default <out>.removed.jsonl)",
                    force=args.force)
    r = clean_file(args.input, args.out, s, format=args.format, removed=args.removed, progress=True)
    Console().print(f"{r.rows_read:,} rows read, {r.rows_written:,} written to {r.output}; removed "
                    f"{r.removed_by_reason or 'none'} -> {r.removed_file}" +
                    (f"; {r.conflict_groups} conflicting groups -> {r.conflicts_file}" if r.conflicts_file else ""))
    _print_json(r.steps)
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from tunelab.data.settings import SplitSettings
    from tunelab.data.split import check_out_dir, split_file

    try:
        ratios = tuple(float(x) for x in args.ratios.split(","))
    except ValueError as err:
        raise UserError(f"--ratios: not a comma-separated list of numbers ({err}) (got {args.ratios!r}). "
                        "E.g. --ratios 0.7,0.15,0.15") from None
    s = _data_settings(SplitSettings, "split", {"stratify": "--no-stratify"}, {"ratios": args.ratios},
                       ratios=ratios, stratify=not args.no_stratify, group=args.group, seed=args.seed)
    check_out_dir(args.out_dir, args.input, kfold=args.kfold, n_ratios=len(s.ratios), force=args.force)
    r = split_file(args.input, args.out_dir, s, kfold=args.kfold, format=args.format)
    _print_json(r.to_dict())
    return 0


def cmd_data_leakage(args: argparse.Namespace) -> int:
    from tunelab.data.split import leakage

    r = leakage(args.files, threshold=args.threshold)
    _print_json(r)
    leaked = any(f["exact"] or f["near"] for f in r["files"])
    return 1 if (leaked and args.fail) else 0


def cmd_data_agreement(args: argparse.Namespace) -> int:
    from tunelab.data.annotate import agreement_file

    if args.out:
        _refuse_existing(args.out, "--out", force=args.force)
    r = agreement_file(args.input, column=args.column, annotators=args.annotators, out=args.out)
    d = r.to_dict()
    d["disagreements"] = d["disagreements"][: args.show]
    _print_json(d)
    return 0


def cmd_data_augment(args: argparse.Namespace) -> int:
    from tunelab.data.augment import augment_file
    from tunelab.data.settings import AugmentSettings

    s = _data_settings(AugmentSettings, "augment", ops=args.ops, copies=args.copies, alpha=args.alpha,
                       field=args.field, synonyms=args.synonyms, model=args.model, pivot=args.pivot, seed=args.seed,
                       limit=args.limit, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    _refuse_existing(args.out, "--out", force=args.force)
    _print_json(augment_file(args.input, args.out, s, format=args.format))
    return 0


def cmd_data_weights(args: argparse.Namespace) -> int:
    from tunelab.data.settings import WeightSettings
    from tunelab.data.weights import weights_file

    _data_settings(WeightSettings, "weights", scheme=args.scheme, beta=args.beta)
    _refuse_existing(args.out, "--out", force=args.force)
    _print_json(weights_file(args.input, args.out, scheme=args.scheme, beta=args.beta, format=args.format))
    return 0


def _add_data_verbs(sub) -> None:
    """``tunelab data VERB``: the data workbench."""
    d = sub.add_parser("data", help="inspect, clean, de-duplicate, split, augment and weight data files")
    dsub = d.add_subparsers(dest="data_verb", metavar="ACTION")
    fmt_help = "row format (auto detects it)"

    i = dsub.add_parser("inspect", help="statistics of a data file or of a training config's files (+ HTML)")
    i.add_argument("target", help="a data file, or a training config (.yaml): its files, model and max_length")
    i.add_argument("--model", default=None, help="tokenizer for token lengths (an alias or model folder)")
    i.add_argument("--max-length", type=int, default=None, help="report the share of rows over this many tokens")
    i.add_argument("--html", default=None, help="write an HTML page with histograms here")
    i.add_argument("--json", default=None, help="write the statistics as JSON here")
    i.add_argument("--limit", type=int, default=None, help="read at most this many rows")
    i.add_argument("--threshold", type=float, default=0.85, help="near-duplicate Jaccard threshold")
    i.add_argument("--force", action="store_true", help="replace an existing --html / --json file")
    i.set_defaults(fn=cmd_data_inspect)

    c = dsub.add_parser("clean", help="normalise, mask PII, filter lengths, resolve conflicts, de-duplicate")
    c.add_argument("input")
    c.add_argument("--out", required=True, help="output file (its extension picks the format); never the input; "
                   "must not exist unless --force")
    c.add_argument("--removed", default=None, help="removed-rows file (default <out>.removed.jsonl); must not exist "
                   "unless --force")
    c.add_argument("--force", action="store_true", help="replace an existing --out / removed-rows file")
    c.add_argument("--format", default="auto", help=fmt_help)
    c.add_argument("--no-normalize", action="store_true", help="skip NFKC / whitespace / control / HTML cleanup")
    c.add_argument("--pii", action="store_true", help="mask e-mails, phone and ID numbers")
    c.add_argument("--min-chars", type=int, default=None)
    c.add_argument("--max-chars", type=int, default=None)
    c.add_argument("--min-tokens", type=int, default=None)
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--tokenizer", default=None, help="model whose tokenizer counts tokens for --min/max-tokens")
    c.add_argument("--length-field", choices=["full", "prompt", "answer"], default="full")
    c.add_argument("--conflicts", choices=["flag", "drop", "majority", "off"], default="flag",
                   help="same input, different answers: flag (keep, report), drop, majority, off")
    c.add_argument("--no-exact", action="store_true", help="keep exact duplicates")
    c.add_argument("--no-near", action="store_true", help="keep near duplicates")
    c.add_argument("--threshold", type=float, default=0.85, help="near-duplicate Jaccard threshold")
    c.add_argument("--key", choices=["full", "prompt"], default="full", help="compare whole rows or inputs only")
    c.set_defaults(fn=cmd_data_clean)

    s = dsub.add_parser("split", help="stratified, group-aware train/val/test split (or k folds)")
    s.add_argument("input")
    s.add_argument("--out-dir", required=True, help="folder for train/val[/test] (or fold_i/...) files; it must "
                   "not hold split files already, unless --force")
    s.add_argument("--force", action="store_true", help="replace the split files already in --out-dir")
    s.add_argument("--ratios", default="0.7,0.15,0.15", help="train,val[,test] shares")
    s.add_argument("--no-stratify", action="store_true", help="ignore labels")
    s.add_argument("--group", choices=["near", "exact", "none"], default="near",
                   help="keep duplicate clusters in one split")
    s.add_argument("--kfold", type=int, default=None, help="write K folds instead (fold_i/train, fold_i/val)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", default="auto", help=fmt_help)
    s.set_defaults(fn=cmd_data_split)

    lk = dsub.add_parser("leakage", help="exact and near overlaps of later files with the first (TRAIN TEST ...)")
    lk.add_argument("files", nargs="+")
    lk.add_argument("--threshold", type=float, default=0.8)
    lk.add_argument("--fail", action="store_true", help="exit 1 when anything leaks (for CI)")
    lk.set_defaults(fn=cmd_data_leakage)

    ag = dsub.add_parser("agreement", help="annotator agreement (Cohen / Fleiss kappa), disagreements, majority vote")
    ag.add_argument("input")
    ag.add_argument("--column", default="labels", help="list column holding the annotations")
    ag.add_argument("--annotators", nargs="+", default=None, help="one column per annotator instead")
    ag.add_argument("--out", default=None, help="write rows with the majority label (label_tie flags ties); "
                    "must not exist unless --force")
    ag.add_argument("--force", action="store_true", help="replace an existing --out file")
    ag.add_argument("--show", type=int, default=20, help="disagreements to print")
    ag.set_defaults(fn=cmd_data_agreement)

    au = dsub.add_parser("augment", help="EDA, sentence re-ordering, model paraphrase / back-translation")
    au.add_argument("input")
    au.add_argument("--out", required=True, help="output file (originals, then augmented rows); must not exist "
                    "unless --force")
    au.add_argument("--force", action="store_true", help="replace an existing --out file")
    au.add_argument("--ops", nargs="+", default=["swap", "delete"],
                    choices=["synonym", "insert", "swap", "delete", "reorder", "paraphrase", "backtranslate"])
    au.add_argument("--copies", type=int, default=1)
    au.add_argument("--alpha", type=float, default=0.1)
    au.add_argument("--field", choices=["prompt", "answer", "both"], default="prompt")
    au.add_argument("--synonyms", default=None, help="synonym file (JSON or 'word syn1 syn2' lines)")
    au.add_argument("--model", default=None, help="causal LM for paraphrase / backtranslate")
    au.add_argument("--pivot", default="French")
    au.add_argument("--temperature", type=float, default=0.0, help="model sampling temperature (0: greedy)")
    au.add_argument("--max-new-tokens", type=int, default=128, help="longest model reply")
    au.add_argument("--limit", type=int, default=None, help="augment at most this many rows")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--format", default="auto", help=fmt_help)
    au.set_defaults(fn=cmd_data_augment)

    w = dsub.add_parser("weights", help="add class-balanced sample weights (a weight column)")
    w.add_argument("input")
    w.add_argument("--out", required=True, help="output file (the rows with a weight column); must not exist "
                   "unless --force")
    w.add_argument("--force", action="store_true", help="replace an existing --out file")
    w.add_argument("--scheme", choices=["inverse", "effective"], default="inverse")
    w.add_argument("--beta", type=float, default=0.999)
    w.add_argument("--format", default="auto", help=fmt_help)
    w.set_defaults(fn=cmd_data_weights)

def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.ship.export import export

    result = export(args.target, args.out, merge=args.merge, dtype=args.dtype, gguf=args.gguf, force=args.force,
                    checkpoint=args.checkpoint, verify=not args.no_verify)
    console = Console(soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    what = {"merged": "merged model", "adapter": "adapters (PEFT)", "full": "full model", "model": "model"}[result.kind]
    console.print(f"exported {what} ({result.dtype or 'as trained'}) to {result.out}: "
                  f"{len(result.files)} files + SHA256SUMS", highlight=False)
    if result.gguf is not None:
        check = (f"read back by transformers, logits within {result.gguf_error:.1e} (relative)"
                 if result.gguf_error is not None else "not read back (--no-verify)")
        console.print(f"GGUF: {result.gguf} ({check})", highlight=False)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tunelab.ship.predict import predict

    s = predict(args.target, args.data, args.out, checkpoint=args.checkpoint, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                system=args.system, task=getattr(args, "task", None))
    console = Console(soft_wrap=True)
    resumed = f", {s.done_before} already there" if s.done_before else ""
    console.print(f"{s.written} predictions written to {s.out} ({s.rows} rows{resumed})", highlight=False)
    if s.rejected:
        reasons = ", ".join(f"{k}: {v}" for k, v in s.reject_reasons.items())
        console.print(f"[yellow]{s.rejected} rows rejected[/] ({reasons}); see {s.rejects_file}", highlight=False)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from tunelab.ship.serve import ServeSettings, serve

    keys = tuple(args.api_key) + tuple(k.strip() for k in os.environ.get("TUNELAB_API_KEYS", "").split(",")
                                       if k.strip())
    settings = ServeSettings(host=args.host, port=args.port, api_keys=keys, max_body_bytes=args.max_body_bytes,
                             max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
                             default_max_tokens=args.default_max_tokens, max_n=args.max_n,
                             max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                             queue_timeout_s=args.queue_timeout, request_timeout_s=args.request_timeout,
                             max_in_flight=args.max_in_flight)
    serve(args.targets, settings, checkpoint=args.checkpoint, dtype=args.dtype, console=Console())
    return 0


def _add_ship_verbs(sub) -> None:
    """``export``, ``predict`` and ``serve`` (``tunelab.ship``)."""
    e = sub.add_parser("export", help="export a run: merged model, adapters only, GGUF; with a checksum manifest",
                       description="Write a run's weights to --out in the Hugging Face layout (safetensors, tokenizer, "
                       "chat template, generation config) with a SHA256SUMS manifest. Adapter runs export the PEFT "
                       "adapters unless --merge folds them into the base.")
    e.add_argument("target", help="a run directory, a weights folder, or a model")
    e.add_argument("--out", required=True, help="the folder to write (must not exist or be empty, unless --force)")
    e.add_argument("--merge", action="store_true", help="fold the adapters into the base weights (mergeable methods)")
    e.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weights dtype (default: the base model's published dtype)")
    e.add_argument("--gguf", action="store_true",
                   help="also write a GGUF file of the merged model (Llama family; read back and checked)")
    e.add_argument("--no-verify", action="store_true", help="skip reading the GGUF back to compare logits")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out")
    e.add_argument("--checkpoint", default="final", help="which weights of a run: final (default) or best")
    e.set_defaults(fn=cmd_export)

    p = sub.add_parser("predict", help="batched, resumable predictions for a data file (JSONL out)")
    p.add_argument("target", help="a run directory, a weights folder, or a model")
    p.add_argument("--data", required=True, help="input rows (.jsonl/.json/.csv/.parquet): messages, alpaca, "
                   "sharegpt, prompt or text")
    p.add_argument("--out", required=True, help="JSONL output; re-running continues after the rows already in it")
    p.add_argument("--checkpoint", default="final", help="which weights of a run: final (default) or best")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens to generate per row")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--system", default=None, help="system prompt for rows that have none")
    p.set_defaults(fn=cmd_predict)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API over one or more runs",
                       description="Serve runs (several adapter runs share one base; pick one with the request's "
                       "`model`) at /v1/models, /v1/chat/completions, /v1/completions, /v1/classify, /health "
                       "and /metrics.")
    s.add_argument("targets", nargs="+", metavar="RUN_OR_MODEL", help="run directories, weights folders or models")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (other than loopback needs --api-key)")
    s.add_argument("--port", type=int, default=8000, help="port to bind")
    s.add_argument("--api-key", action="append", default=[],
                   help="accepted bearer key (repeatable; also TUNELAB_API_KEYS=k1,k2)")
    s.add_argument("--checkpoint", default="final", help="which weights of the runs: final (default) or best")
    s.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32", help="weights dtype for serving")
    s.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    s.add_argument("--max-prompt-tokens", type=int, default=4096, help="longer prompts get 400")
    s.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens accepted (else 400)")
    s.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a chat request gives none")
    s.add_argument("--max-n", type=int, default=4, help="largest n accepted (else 400)")
    s.add_argument("--max-concurrency", type=int, default=1, help="requests generating at once")
    s.add_argument("--max-queue", type=int, default=16, help="requests waiting for a slot; more get 429")
    s.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request may wait (then 503)")
    s.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds of generation per request (then it stops, finish_reason 'length')")
    s.add_argument("--max-in-flight", type=int, default=None,
                   help="HTTP requests in progress at once, any route; more get a JSON 503 "
                   "(default: max-concurrency + max-queue + 32)")
    s.set_defaults(fn=cmd_serve)

# ----------------------------------------------------------------------------- eval, compare, runs, report


def _eval_request(args: argparse.Namespace):
    from tunelab.eval.evaluate import BenchmarkRequest, EvalRequest
    from tunelab.eval.generate import GenerationSettings

    def split_list(value):
        return [x.strip() for x in value.split(",") if x.strip()] if value else None

    return EvalRequest(
        data=args.data, format=args.format, task=args.task, metrics=split_list(args.metrics),
        labels=split_list(args.labels), limit=args.limit, baselines=getattr(args, "baselines", False),
        few_shot=getattr(args, "few_shot", 3),
        benchmarks=[BenchmarkRequest(b, args.k_shot, args.limit, args.split, split_list(args.subjects))
                    for b in args.benchmark],
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, stop=tuple(args.stop), seed=args.seed,
                                      batch_size=args.batch_size),
        max_length=args.max_length, dtype=args.dtype,
        modes=("constrained", "generated") if args.mode == "both" else (args.mode,),
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.eval.evaluate import evaluate

    evaluate(args.target, _eval_request(args), checkpoint=args.checkpoint, out_dir=args.out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.eval.compare import compare

    compare(args.run_a, args.run_b, _eval_request(args), checkpoint=args.checkpoint, out=args.out)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from tunelab.eval.runs import filter_runs, list_runs, print_runs, sort_runs

    rows = sort_runs(filter_runs(list_runs(args.dir), args.filter), args.sort)
    if args.json:
        import json

        print(json.dumps(rows, indent=2, default=str))
    else:
        print_runs(rows)
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    from tunelab.eval.runs import show_run

    show_run(args.dir, args.name)
    return 0


def cmd_runs_mlflow(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunelab.eval.tracking import log_to_mlflow

    for name in args.names:
        run = Path(name) if (Path(name) / "config.yaml").is_file() else Path(args.dir) / name
        rid = log_to_mlflow(run, tracking_uri=args.tracking_uri, experiment=args.experiment)
        print(f"{run}: MLflow run {rid}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tunelab.report.html import write_report

    html_path, md_path = write_report(args.runs, args.out)
    print(f"report: {html_path}\nmarkdown: {md_path}")
    return 0


def _add_eval_verbs(sub) -> None:
    def add_eval_args(sp, *, baselines: bool) -> None:
        sp.add_argument("--data", action="append", default=[], metavar="FILE",
                        help="a data file to score (any format tunelab reads; repeatable)")
        sp.add_argument("--format", default="auto", help="row format of --data files (default: detected)")
        sp.add_argument("--task", default="auto", choices=["auto", "lm", "generation", "classification"],
                        help="auto: classification for labelled rows, lm for plain text, else generation")
        sp.add_argument("--metrics", default=None,
                        help="generation metrics, comma-separated: exact_match,f1,bleu,rouge1,rouge2,rougeL,chrf")
        sp.add_argument("--labels", default=None, help="classification label set, comma-separated")
        sp.add_argument("--mode", default="both", choices=["both", "constrained", "generated"],
                        help="generative classification: score the labels by log-likelihood, parse free "
                        "generations, or both side by side (the default; generated is the primary figure)")
        sp.add_argument("--limit", type=int, default=None, help="score at most N rows / benchmark questions")
        sp.add_argument("--benchmark", action="append", default=[], metavar="ZIP_OR_FOLDER",
                        help="a multiple-choice benchmark in the MMLU/CMMLU/C-Eval CSV layout (repeatable)")
        sp.add_argument("--k-shot", type=int, default=0, help="benchmark: solved dev questions before each question")
        sp.add_argument("--split", default="auto", help="benchmark split: auto (test with answers, else val), test, val")
        sp.add_argument("--subjects", default=None, help="benchmark subjects, comma-separated")
        sp.add_argument("--checkpoint", default="final", help="which weights of a run: final (default) or best")
        sp.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit")
        sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (seeded)")
        sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
        sp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        sp.add_argument("--seed", type=int, default=0, help="seed for sampling")
        sp.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
        sp.add_argument("--max-length", type=int, default=1024, help="token limit of the loss evaluation")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype to load the models in (bfloat16: ~3x faster on CPUs with AVX512-BF16)")
        if baselines:
            sp.add_argument("--baselines", action="store_true",
                            help="also score the base model zero-shot and few-shot (a run directory only)")
            sp.add_argument("--few-shot", type=int, default=3, help="training examples in the few-shot baseline's prompt")

    e = sub.add_parser("eval", help="score a run or a model on data files and benchmarks",
                       description="Score a run (or any model) on data files and multiple-choice benchmarks; "
                       "results go to <run>/eval/ (or --out).")
    e.add_argument("target", help="a run directory, a weights folder, an alias, a HF folder or a .gguf file")
    add_eval_args(e, baselines=True)
    e.add_argument("--out", default=None, help="folder for the results (default <run>/eval or eval_results/<name>)")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compare", help="paired A/B comparison of two runs on the same examples",
                       description="Score two runs (or models) on the same examples; report the difference with a "
                       "bootstrap CI and a p-value (McNemar for right/wrong scores, paired bootstrap otherwise), and "
                       "the examples where they disagree.")
    c.add_argument("run_a")
    c.add_argument("run_b")
    add_eval_args(c, baselines=False)
    c.add_argument("--out", default=None, help="folder for the results (default <run A>/eval)")
    c.set_defaults(fn=cmd_compare)

    r = sub.add_parser("runs", help="list runs (tunelab runs show NAME for one)",
                       description="List the runs under --dir with model, method, hyperparameters and metrics.")
    r.add_argument("--dir", default="runs", help="the runs folder (run.output_dir)")
    r.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose KEY contains VALUE, or KEY<N / KEY>N (repeatable), e.g. method=lora")
    r.add_argument("--sort", default="date", help="column or metric to sort by; -KEY for descending (default date)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(fn=cmd_runs)
    rsub = r.add_subparsers(dest="runs_verb", metavar="ACTION")
    rs = rsub.add_parser("show", help="everything about one run")
    rs.add_argument("name", help="run name (or a run directory)")
    rs.add_argument("--dir", default="runs", help="the runs folder")
    rs.set_defaults(fn=cmd_runs_show)
    rm = rsub.add_parser("mlflow", help="log runs to MLflow (params, per-step metrics, evaluations, artifacts)")
    rm.add_argument("names", nargs="+", help="run names (or run directories)")
    rm.add_argument("--dir", default="runs", help="the runs folder")
    rm.add_argument("--tracking-uri", default=None, help="default: sqlite:///<runs folder>/mlflow.db")
    rm.add_argument("--experiment", default="tunelab", help="MLflow experiment name")
    rm.set_defaults(fn=cmd_runs_mlflow)

    rep = sub.add_parser("report", help="one self-contained HTML report (and Markdown) for one or more runs")
    rep.add_argument("runs", nargs="+", help="run directories")
    rep.add_argument("--out", default=None, help="the HTML file (default <first run>/report.html; .md beside it)")
    rep.set_defaults(fn=cmd_report)


# ----------------------------------------------------------------------------- cross-validation, multi-task


def cmd_cv(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.eval.cv import cross_validate

    cfg, sources = load_config(args.config, args.set)
    cross_validate(cfg, sources, folds=args.folds, group=args.group, console=Console())
    return 0


def _add_multitask_verbs(sub) -> None:
    """``cv`` (k-fold cross-validation) and ``predict --task`` (a multi-task run's head)."""
    cv = sub.add_parser("cv", help="k-fold cross-validation of a config: K runs, mean and std of each metric",
                        description="Cut each data.train file into K folds (stratified by label, duplicates kept "
                        "in one fold), train fold i on the rest into <run>/fold-<i>/ with fold i as data.eval, and "
                        "write the mean, standard deviation and per-fold values of every metric to <run>/cv.json. "
                        "Re-running skips finished folds.")
    cv.add_argument("config", help="the YAML config file")
    cv.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    cv.add_argument("--group", choices=["near", "exact", "none"], default="near",
                    help="keep near / exact duplicate rows in one fold (default near), or none")
    cv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    cv.set_defaults(fn=cmd_cv)
    sub.choices["predict"].add_argument("--task", default=None,
                                        help="a multi-task run: the task whose head (or LM) predicts")


# ----------------------------------------------------------------------------- continual learning


def cmd_continual(args: argparse.Namespace) -> int:
    from tunelab.train.continual import load_continual, run_compare, run_continual

    if args.compare:
        run_compare(args.config, args.compare, args.set)
    else:
        run_continual(load_continual(args.config, args.set))
    return 0


def _add_continual_verbs(sub) -> None:
    c = sub.add_parser(
        "continual", help="continual learning: train the config's stages one after another, score every task after each",
        description="Train the stages of a config (task A, then B, then C), each from the previous stage's weights; "
        "after every stage score every task: the accuracy matrix, ACC, BWT and FWT in <run>/continual.json. "
        "Finished stages are never re-run; an interrupted stage resumes from its last checkpoint.")
    c.add_argument("config", help="a YAML config with a stages: list")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every stage, e.g. --set train.lr=1e-4 (repeatable)")
    c.add_argument("--compare", default=None, metavar="VARIANTS",
                   help="run variants side by side, e.g. naive,ewc:5000,replay:0.3,distill,l2sp:0.01 (the number is "
                   "the weight, or replay's ratio); each in <run>/compare/<variant>/, table in <run>/compare.md")
    c.set_defaults(fn=cmd_continual)


def cmd_sweep(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.search.sweep import run_worker, sweep, write_outputs

    cfg, _ = load_config(args.config, args.set)
    if args.worker:  # one of the processes of a sweep (or a worker started by hand on another machine)
        run_worker(cfg, Console())
    elif args.report:
        write_outputs(cfg, Console())
    else:
        sweep(cfg, Console(), workers=args.workers)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from tunelab.search.select import SelectRequest, select_model

    select_model(SelectRequest(candidates=args.candidates, data=args.data, shots=args.shots, limit=args.limit,
                               max_length=args.max_length, batch_size=args.batch_size, method=args.method,
                               out=args.out, max_new_tokens=args.max_new_tokens), Console())
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.search.advise import DRY_RUN_METHODS, advise, print_advice, probe_task

    cfg, _ = load_config(args.config, args.set)
    dry_run = getattr(args, "dry_run", False)  # train --dry-run: the configured method beside full, LoRA, QLoRA
    methods = getattr(args, "methods", None) or (list(DRY_RUN_METHODS) if dry_run else None)
    if dry_run and probe_task(cfg).class_head:
        methods = ["head", "lora", "full"]
    print_advice(advise(cfg, probe_steps=getattr(args, "probe_steps", 2), methods=methods,
                        all_checkpointing=not dry_run), Console())
    return 0


def _add_search_verbs(sub) -> None:
    """sweep, select, advise (tunelab.search)."""
    sw = sub.add_parser("sweep", help="hyperparameter search over a config's sweep: section (Optuna)",
                        description="Train trials with sampled values of the config's sweep.params; pruning, "
                        "resumable storage, several workers; writes <output_dir>/<run.name>-sweep/.")
    sw.add_argument("config", help="a training YAML with a sweep: section")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    sw.add_argument("--workers", type=int, default=None, help="worker processes (default sweep.workers)")
    sw.add_argument("--worker", action="store_true",
                    help="run trials only (join the study from this machine; no table at the end)")
    sw.add_argument("--report", action="store_true", help="only write the table, best.yaml and plots of the study")
    sw.set_defaults(fn=cmd_sweep)

    se = sub.add_parser("select", help="rank candidate base models on your validation data",
                        description="Loss and task metric zero- and few-shot, parameters, memory per method, "
                        "measured throughput; a ranked table with the reasons.")
    se.add_argument("--candidates", nargs="+", required=True, help="aliases, HF folders or .gguf files")
    se.add_argument("--data", required=True, help="validation file (any training data format)")
    se.add_argument("--shots", type=int, default=3, help="examples put before each prompt for few-shot (default 3)")
    se.add_argument("--limit", type=int, default=64, help="validation rows scored (default 64)")
    se.add_argument("--max-length", type=int, default=512, help="tokens per sample (memory and throughput)")
    se.add_argument("--batch-size", type=int, default=4, help="micro-batch for memory and throughput")
    se.add_argument("--method", default="lora", help="method whose training throughput is measured (default lora)")
    se.add_argument("--max-new-tokens", type=int, default=48, help="generation tasks: tokens generated per reply")
    se.add_argument("--out", default=None, help="write the ranking as JSON here")
    se.set_defaults(fn=cmd_select)

    ad = sub.add_parser("advise", help="memory and time estimate per method, and a recommended strategy",
                        description="Peak memory per method (weights, gradients, optimiser states, activations "
                        "with and without checkpointing), a timed probe, and a recommendation in words.")
    ad.add_argument("config", help="a training YAML")
    ad.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    ad.add_argument("--probe-steps", type=int, default=2, help="timed training steps of the real model (0: skip)")
    ad.add_argument("--methods", nargs="*", default=None, help="methods to estimate (default: every applicable one)")
    ad.set_defaults(fn=cmd_advise)


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: tunelab VERB: what. See: tunelab VERB --help``)
    like every other user error, instead of the usage block and a second line. Sub-commands use this
    class too (``add_subparsers`` makes its parsers of the parent's class)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}. See: {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="tunelab", description="Fine-tune LLMs on your own data and hardware.")
    p.add_argument("--version", action="version", version=f"tunelab {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    t = sub.add_parser("train", help="fine-tune a model as a YAML config says", formatter_class=fmt,
                       description="Fine-tune a model as the config says; writes runs/<name>/.",
                       epilog=_schema_help())
    t.add_argument("config", help="the YAML config file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run from its latest checkpoint (same config required)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the memory / time estimate and recommendation (tunelab advise) and exit")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("config", help="inspect configs")
    csub = c.add_subparsers(dest="config_verb", metavar="ACTION")
    cs = csub.add_parser("show", help="print the resolved config and where each value came from",
                         formatter_class=fmt, epilog=_schema_help())
    cs.add_argument("config")
    cs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    cs.add_argument("--yaml", action="store_true", help="print YAML instead of a table")
    cs.set_defaults(fn=cmd_config_show)

    def add_inference_args(sp):
        sp.add_argument("target", help="a run directory, a weights folder, an alias, a HF folder or a .gguf file")
        sp.add_argument("--checkpoint", default="final", help="which weights of a run: final (default) or best")
        sp.add_argument("--system", default=None, help="system prompt")
        sp.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens to generate")
        sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
        sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
        sp.add_argument("--seed", type=int, default=None, help="seed for sampling")

    g = sub.add_parser("generate", help="generate a reply to one or more prompts")
    add_inference_args(g)
    g.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    g.set_defaults(fn=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat with streaming output")
    add_inference_args(ch)
    ch.add_argument("--compare-base", action="store_true",
                    help="after each answer, show the base model's (an adapter run with its adapters disabled)")
    ch.set_defaults(fn=cmd_chat)

    d = sub.add_parser("demo", help="the bundled demo: policy recommendation with SmolLM2 + LoRA",
                       description="Generate the demo data, score the base model, fine-tune with LoRA, "
                       "score the tuned model, and print both side by side.")
    d.add_argument("--workdir", default="demo_run", help="folder for the demo's data and runs")
    d.add_argument("--fresh", action="store_true", help="start a new run even if one exists")
    d.set_defaults(fn=cmd_demo)
    _add_data_verbs(sub)
    _add_ship_verbs(sub)
    _add_eval_verbs(sub)
    _add_multitask_verbs(sub)
    _add_continual_verbs(sub)
    _add_search_verbs(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from tunelab.quiet import quiet_libraries

    quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a usage error (status 2, one line printed by _Parser), or --help / --version
        return stop.code if isinstance(stop.code, int) else 2
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except UserError as err:
        if not (os.environ.get(launch.LAUNCHED_ENV) and launch.rank() != 0):  # rank 0 says it once
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        # A path the user gave that no check above caught (a folder where a file goes, an unreadable
        # file...): still one line naming the path, not a traceback. Without a path it is a bug: re-raise.
        if err.filename is None:
            raise
        if not (os.environ.get(launch.LAUNCHED_ENV) and launch.rank() != 0):
            err_console.print(f"[bold red]error:[/] {err.filename}: {err.strerror or type(err).__name__} "
                              f"(got {type(err).__name__}). Check the path and its permissions",
                              highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
