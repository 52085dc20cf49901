"""The ``tunelab`` command: one function per verb; each parses, then calls one entry function.

User errors (:class:`tunelab.errors.UserError`) are printed on one line (a config error: one
line per problem) and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from rich.console import Console

from tunelab import __version__
from tunelab.errors import UserError

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
    if args.resume and args.config is not None:
        _check_resume_config(cfg)
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

    from tunelab.ship.inference import generate_reply, load_for_inference

    loaded = load_for_inference(args.target, checkpoint=args.checkpoint)
    console = Console()
    console.print(f"[bold]{loaded.description}[/]  (empty line or Ctrl-D to quit, /reset to clear history)")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
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
        print("model> ", end="", flush=True)
        reply = generate_reply(loaded, history, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed, streamer=streamer)
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.demo.run import run_demo

    run_demo(args.workdir, fresh=args.fresh)
    return 0


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


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune LLMs on your own data and hardware.")
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
    ch.set_defaults(fn=cmd_chat)

    d = sub.add_parser("demo", help="the bundled demo: policy recommendation with SmolLM2 + LoRA",
                       description="Generate the demo data, score the base model, fine-tune with LoRA, "
                       "score the tuned model, and print both side by side.")
    d.add_argument("--workdir", default="demo_run", help="folder for the demo's data and runs")
    d.add_argument("--fresh", action="store_true", help="start a new run even if one exists")
    d.set_defaults(fn=cmd_demo)
    _add_eval_verbs(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from tunelab.quiet import quiet_libraries

    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
