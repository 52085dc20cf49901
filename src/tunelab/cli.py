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
