"""Head-to-head LoRA benchmark: tunelab's ``fine_tune`` against ``transformers.Trainer`` + PEFT.

The standard workload: SmolLM2-135M-Instruct, LoRA r=16 / alpha=32 / dropout 0 on every linear
layer, AdamW lr 2e-4, cosine schedule with 3% warm-up, one epoch over the first 512 records of
``../shared/data/instruct/llamafactory_demo/alpaca_en_demo.json`` (about 16 records per
optimiser step), evaluation on records 900-998, the model's chat template, loss on assistant
tokens only, max length 512.

Both sides tokenise the same records with the same code (``tunelab.data.formats`` +
``tunelab.data.tokenize``), so they train on the identical token sequences. Each side runs in
its own subprocess (``--worker ours|baseline --spec JSON``) so that its peak RSS is its own.

Figures:

* dataset tokens/s: tokens of the training records (after truncation; padding never counted)
  divided by the training wall time (first to last optimiser step: model loading, data
  preparation, the final evaluation and saving are outside it, on both sides);
* peak RSS: the high-water mark of the worker process's resident memory (``VmHWM``);
* eval loss: mean cross-entropy over the assistant tokens of the evaluation records
  (sum of token losses / number of target tokens), after training.

Usage::

    python benchmarks/bench_lora.py                       # the standard workload, both sides
    python benchmarks/bench_lora.py --out docs/benchmarks.md
    python benchmarks/bench_lora.py --model tiny-random-llama --records 16 --eval-records 8 --max-length 128
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from docs_section import write_section  # benchmarks/docs_section.py, beside this script

REPO = Path(__file__).resolve().parents[1]
DATA_FILE = REPO.parent / "shared" / "data" / "instruct" / "llamafactory_demo" / "alpaca_en_demo.json"
RESULTS_DIR = REPO / "benchmarks" / "results"
EVAL_START = 900  # evaluation records are EVAL_START .. EVAL_START + eval_records - 1
RECORDS_PER_STEP = 16
MARK_START, MARK_END = "<!-- bench:lora:start -->", "<!-- bench:lora:end -->"

# The targets of the performance issue.
TARGET_TPS_RATIO = 4.0  # ours / baseline dataset tokens per second, at least
TARGET_RSS_RATIO = 0.35  # ours / baseline peak RSS, at most
TARGET_EVAL_REL = 0.02  # |ours - baseline| / baseline eval loss, at most
FLOOR_TPS = 1400.0  # the ~1,400 tokens/s bf16 floor for ours

HYPER = {
    "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
    "lr": 2e-4, "schedule": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.0, "max_grad_norm": 1.0,
    "epochs": 1, "seed": 42, "baseline_batch_size": 4, "baseline_grad_accum": 4,
}


# =========================================================================== workers
# Everything heavy (torch, transformers, peft, tunelab) is imported inside the workers only.


def _peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    ``VmHWM`` belongs to this process image only; ``ru_maxrss`` survives ``execve`` and can carry
    the parent's peak over into a freshly started worker, so it is only the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _encode(spec: dict, tokenizer) -> tuple[list, list, dict]:
    """Read and tokenise the train and eval files exactly as ``fine_tune`` does."""
    from tunelab.data.formats import read_records
    from tunelab.data.tokenize import IGNORE_INDEX, encode_records

    out = []
    info: dict[str, Any] = {}
    for name in ("train", "eval"):
        res = read_records(spec[f"{name}_path"], format="alpaca")
        enc, rejects = encode_records(res.records, tokenizer, train_on="assistant",
                                      max_length=spec["max_length"], truncation="truncate")
        out.append(enc)
        info[f"{name}_records_read"] = len(res.records)
        info[f"{name}_samples"] = len(enc)
        info[f"{name}_rejected"] = len(rejects) + len(res.rejects)
        info[f"{name}_tokens"] = sum(len(e.input_ids) for e in enc)
        info[f"{name}_target_tokens"] = sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in enc)
        info[f"{name}_truncated"] = sum(1 for e in enc if e.truncated)
    return out[0], out[1], info


def _tokenizer(spec: dict):
    from tunelab.data.templates import set_chat_template
    from tunelab.models.load import load_tokenizer

    tokenizer = load_tokenizer(spec["model"])
    set_chat_template(tokenizer, "auto")
    return tokenizer


def worker_ours(spec: dict) -> dict:
    import torch
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.data.batching import rows_packed
    from tunelab.train.recipe import fine_tune

    torch.set_num_threads(spec["threads"])
    tokenizer = _tokenizer(spec)
    train_enc, _, data = _encode(spec, tokenizer)

    # One optimiser step covers ~16 records: packed rows hold several records each.
    rows = rows_packed(train_enc, spec["max_length"])
    records_per_row = len(train_enc) / max(1, len(rows))
    rows_per_step = max(1, round(RECORDS_PER_STEP / records_per_row))
    processes = spec.get("ours_processes", 1)
    batch_size = max(1, min(spec["ours_batch_size"], rows_per_step // processes))
    grad_accum = max(1, math.ceil(rows_per_step / (batch_size * processes)))

    run_root = Path(spec["workdir"]) / "runs"
    raw = {
        "run": {"name": "ours", "output_dir": str(run_root)},
        "model": {"path": spec["model"], "dtype": "auto"},
        "data": {
            "train": [{"path": spec["train_path"], "format": "alpaca"}],
            "eval": [{"path": spec["eval_path"], "format": "alpaca"}],
            "template": "auto", "train_on": "assistant", "max_length": spec["max_length"],
            "truncation": "truncate", "packing": True,
        },
        "method": {"name": "lora", "r": HYPER["lora_r"], "alpha": HYPER["lora_alpha"],
                   "dropout": HYPER["lora_dropout"], "target_modules": HYPER["target_modules"]},
        "train": {
            "optimizer": "adamw", "lr": HYPER["lr"], "schedule": HYPER["schedule"],
            "warmup_ratio": HYPER["warmup_ratio"], "weight_decay": HYPER["weight_decay"],
            "max_grad_norm": HYPER["max_grad_norm"], "batch_size": batch_size, "grad_accum": grad_accum,
            "epochs": HYPER["epochs"], "eval_every": 0, "save_every": 0, "precision": "auto",
            "seed": HYPER["seed"], "threads": max(1, spec["threads"] // processes), "log_every": 1,
            "gradient_checkpointing": spec.get("ours_gradient_checkpointing", False), "processes": processes,
            **spec.get("ours_train", {}),  # further train.* settings (bench_micro_threads.py's A/B)
        },
    }
    launcher_rss = None
    if processes == 1:
        cfg, sources = load_config(None, base=raw)
        run_dir = fine_tune(cfg, sources, console=Console(width=120)).run_dir
    else:  # `tunelab train` starts the ranks; the job's memory is theirs plus the launcher's
        run_dir, launcher_rss = _train_processes(raw, Path(spec["workdir"]))
    summary = json.loads((run_dir / "summary.json").read_text())

    # Training wall time: from the loop's start to the end of the last optimiser step (the final
    # evaluation and checkpoint come after it and are not training).
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train_records = [m for m in metrics if m.get("kind") == "train"]
    train_seconds = float(train_records[-1]["elapsed_s"]) if train_records else float(summary["train_seconds"])
    env = json.loads((run_dir / "env.json").read_text())
    extra = {}
    if processes > 1:
        extra = {"processes": processes, "peak_rss_mib_per_process": summary["peak_rss_mib"],
                 "launcher_rss_mib": launcher_rss,
                 "peak_rss_mib": round(sum(summary["peak_rss_mib"]) + (launcher_rss or 0.0), 1)}
    return {
        **extra,
        "side": "ours",
        **data,
        "tokens_trained": int(summary["tokens_seen"]),
        "optimiser_steps": int(summary["step"]),
        "packed_rows": len(rows),
        "records_per_row": round(records_per_row, 3),
        "micro_batch": f"{batch_size} packed row(s) of <= {spec['max_length']} tokens"
                       + (f" per process, {processes} processes" if processes > 1 else ""),
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "records_per_step": round(batch_size * grad_accum * processes * records_per_row, 2),
        "train_seconds": round(train_seconds, 3),
        "loop_seconds_incl_final_eval_and_save": summary["train_seconds"],
        "tokens_per_s": round(data["train_tokens"] / max(train_seconds, 1e-9), 2),
        "eval_loss": summary.get("best_eval_loss"),
        "train_loss_first": train_records[0]["loss"] if train_records else None,
        "train_loss_last": train_records[-1]["loss"] if train_records else None,
        "precision": summary["precision"],
        "micro_batch_threads": summary.get("micro_batch_threads"),
        "base_dtype": env.get("dtype"),
        "threads": env.get("threads", torch.get_num_threads()),
    }


def _train_processes(raw: dict, workdir: Path) -> tuple[Path, float | None]:
    """Run ``tunelab train`` with ``train.processes`` > 1; returns the run folder and the launcher's
    peak RSS (read while it runs: its high-water mark is reached at start-up)."""
    import yaml

    path = workdir / "ours.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", str(path)])
    rss = None
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                rss = next((int(x.split()[1]) / 1024 for x in fh if x.startswith("VmHWM:")), rss)
        except OSError:
            pass
        time.sleep(1.0)
    if proc.returncode != 0:
        raise SystemExit(f"tunelab train with {raw['train']['processes']} processes failed (exit {proc.returncode})")
    return Path(raw["run"]["output_dir"]) / raw["run"]["name"], rss


def worker_baseline(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tunelab.data.tokenize import IGNORE_INDEX
    from tunelab.models.load import load_model
    from tunelab.train.precision import resolve_precision

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(HYPER["seed"])
    tokenizer = _tokenizer(spec)
    train_enc, eval_enc, data = _encode(spec, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The same precision choice as ours (bf16 autocast on a bf16-capable CPU); the usual
    # mixed-precision recipe keeps fp32 master weights.
    precision = resolve_precision("auto", torch.device("cpu"))
    bf16 = precision == "bf16"

    class Samples(torch.utils.data.Dataset):
        def __init__(self, encoded):
            self.items = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in encoded]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    class PadCollator:
        """Right-pads each batch to its longest sample; labels padded with -100; counts real tokens."""

        def __init__(self):
            self.tokens = 0

        def __call__(self, features):
            width = max(len(f["input_ids"]) for f in features)
            n = len(features)
            input_ids = torch.full((n, width), pad_id, dtype=torch.long)
            labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for i, f in enumerate(features):
                k = len(f["input_ids"])
                input_ids[i, :k] = torch.tensor(f["input_ids"])
                labels[i, :k] = torch.tensor(f["labels"])
                mask[i, :k] = 1
                self.tokens += k
            return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    class Timer(TrainerCallback):
        def __init__(self):
            self.start = self.last = None
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    model = load_model(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        r=HYPER["lora_r"], lora_alpha=HYPER["lora_alpha"], lora_dropout=HYPER["lora_dropout"],
        target_modules=HYPER["target_modules"], bias="none", task_type="CAUSAL_LM",
    ))
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "baseline"),
        per_device_train_batch_size=HYPER["baseline_batch_size"],
        gradient_accumulation_steps=HYPER["baseline_grad_accum"],
        num_train_epochs=HYPER["epochs"], learning_rate=HYPER["lr"], lr_scheduler_type=HYPER["schedule"],
        warmup_steps=HYPER["warmup_ratio"],  # a float in [0, 1) is a ratio in transformers 5
        weight_decay=HYPER["weight_decay"], max_grad_norm=HYPER["max_grad_norm"],
        bf16=bf16, use_cpu=True, seed=HYPER["seed"],
        report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="steps", logging_steps=1,
        disable_tqdm=True, remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
    )
    collator, timer = PadCollator(), Timer()
    trainer = Trainer(model=model, args=args, train_dataset=Samples(train_enc), data_collator=collator,
                      callbacks=[timer])
    trainer.train()
    train_seconds = (timer.last or time.perf_counter()) - (timer.start or time.perf_counter())

    # Eval loss: sum of token losses / number of target tokens, as ours computes it.
    model.eval()
    total, count = 0.0, 0
    eval_collate = PadCollator()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(eval_enc), HYPER["baseline_batch_size"]):
            feats = [{"input_ids": e.input_ids, "labels": e.labels}
                     for e in eval_enc[start : start + HYPER["baseline_batch_size"]]]
            batch = eval_collate(feats)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += float(loss)
            count += int((targets != IGNORE_INDEX).sum())
    return {
        "side": "baseline",
        **data,
        "tokens_trained": collator.tokens,
        "optimiser_steps": int(trainer.state.global_step),
        "micro_batch": f"{HYPER['baseline_batch_size']} records, padded to the longest",
        "batch_size": HYPER["baseline_batch_size"],
        "grad_accum": HYPER["baseline_grad_accum"],
        "records_per_step": HYPER["baseline_batch_size"] * HYPER["baseline_grad_accum"],
        "train_seconds": round(train_seconds, 3),
        "tokens_per_s": round(data["train_tokens"] / max(train_seconds, 1e-9), 2),
        "eval_loss": total / max(count, 1),
        "eval_target_tokens_counted": count,
        "train_loss_first": timer.losses[0] if timer.losses else None,
        "train_loss_last": timer.losses[-1] if timer.losses else None,
        "precision": precision,
        "base_dtype": "float32",
        "optimizer": str(args.optim),
        "threads": torch.get_num_threads(),
    }


def worker_prepare(spec: dict) -> dict:
    """Build a model alias into the cache (e.g. dequantise the SmolLM2 GGUF) outside the measured workers."""
    from tunelab.models.registry import resolve_alias

    folder = resolve_alias(spec["model"])
    return {"side": "prepare", "alias_folder": str(folder) if folder else None}


def run_worker(side: str, spec_text: str) -> None:
    spec = json.loads(spec_text)
    if side == "prepare":
        Path(spec["result_path"]).write_text(json.dumps(worker_prepare(spec)))
        return
    started = time.perf_counter()
    result = (worker_ours if side == "ours" else worker_baseline)(spec)
    result["worker_seconds"] = round(time.perf_counter() - started, 2)
    result.setdefault("peak_rss_mib", round(_peak_rss_mib(), 1))  # ours with processes: the ranks' sum
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2))


# =========================================================================== orchestration


def machine_details() -> dict:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        physical, memory_gib = None, None

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical, "memory_gib": memory_gib,
        "bf16_instructions": [f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in flags],
        "python": platform.python_version(), "os": platform.platform(),
        **{pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "accelerate", "tunelab")},
    }


def compare(sides: dict) -> dict:
    ours, base = sides.get("ours"), sides.get("baseline")
    out: dict[str, Any] = {}
    if ours:
        out["floor_fraction"] = ours["tokens_per_s"] / FLOOR_TPS
    if not (ours and base):
        return out
    tps = ours["tokens_per_s"] / base["tokens_per_s"]
    rss = ours["peak_rss_mib"] / base["peak_rss_mib"]
    rel = None
    if ours["eval_loss"] is not None and base["eval_loss"] is not None:
        rel = (ours["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
    out.update({
        "tokens_per_s_ratio": tps,
        "peak_rss_ratio": rss,
        "eval_loss_rel_diff": rel,
        "same_tokens": ours["tokens_trained"] == base["tokens_trained"] == ours["train_tokens"],
        "targets": {
            "tokens_per_s_ratio": {"target": f">= {TARGET_TPS_RATIO}x", "pass": tps >= TARGET_TPS_RATIO},
            "peak_rss_ratio": {"target": f"<= {TARGET_RSS_RATIO}x", "pass": rss <= TARGET_RSS_RATIO},
            "eval_loss_rel_diff": {"target": f"within {TARGET_EVAL_REL:.0%}",
                                   "pass": rel is not None and abs(rel) <= TARGET_EVAL_REL},
        },
    })
    return out


def _fmt(value, spec: str = ",.0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(figure, ours, baseline, ratio / difference, target + status) for the table and the docs."""
    sides, cmp = result["sides"], result["comparison"]
    o, b = sides.get("ours", {}), sides.get("baseline", {})
    targets = cmp.get("targets", {})

    def status(key: str) -> str:
        t = targets.get(key)
        return f"{t['target']}: {'PASS' if t['pass'] else 'MISS'}" if t else "-"

    rows = [
        ("dataset tokens/s", _fmt(o.get("tokens_per_s")), _fmt(b.get("tokens_per_s")),
         # three decimals: a ratio of 3.995 must not print as a "4.00x" that misses its ">= 4.0x" target
         _fmt(cmp.get("tokens_per_s_ratio"), ".3f") + ("x" if "tokens_per_s_ratio" in cmp else ""),
         status("tokens_per_s_ratio")),
        ("peak RSS (MiB)", _fmt(o.get("peak_rss_mib")), _fmt(b.get("peak_rss_mib")),
         _fmt(cmp.get("peak_rss_ratio"), ".3f") + ("x" if "peak_rss_ratio" in cmp else ""),
         status("peak_rss_ratio")),
        ("eval loss (assistant tokens)", _fmt(o.get("eval_loss"), ".4f"), _fmt(b.get("eval_loss"), ".4f"),
         _fmt(cmp.get("eval_loss_rel_diff"), "+.2%"), status("eval_loss_rel_diff")),
        ("training time (s)", _fmt(o.get("train_seconds"), ".1f"), _fmt(b.get("train_seconds"), ".1f"), "-", "-"),
        ("tokens trained", _fmt(o.get("tokens_trained"), ","), _fmt(b.get("tokens_trained"), ","),
         ("identical" if cmp.get("same_tokens") else "DIFFERENT") if "same_tokens" in cmp else "-", "-"),
        ("optimiser steps", _fmt(o.get("optimiser_steps"), "d"), _fmt(b.get("optimiser_steps"), "d"), "-", "-"),
        ("micro-batch x accumulation",
         f"{o['batch_size']} x {o['grad_accum']}" + (f" x {o['processes']} processes" if o.get("processes") else "")
         if o else "-",
         f"{b['batch_size']} x {b['grad_accum']}" if b else "-", "-", "-"),
        ("records per optimiser step", _fmt(o.get("records_per_step"), ".1f"), _fmt(b.get("records_per_step"), "d"),
         "-", "-"),
        ("precision (base weights)", f"{o['precision']} ({o['base_dtype']})" if o else "-",
         f"{b['precision']} ({b['base_dtype']})" if b else "-", "-", "-"),
    ]
    if "floor_fraction" in cmp:
        frac = cmp["floor_fraction"]
        rows.append((f"ours vs the ~{FLOOR_TPS:,.0f} tokens/s bf16 floor", f"{frac:.2f}x", "-", "-",
                     "a reference: the floor is an upper bound"))
    return rows


HEADERS = ("figure", "tunelab (ours)", "Trainer + PEFT (baseline)", "ours / baseline", "target")


def print_table(result: dict) -> None:
    w = result["workload"]
    print_figures(f"LoRA benchmark: {w['model']}, {w['train_records']} train / {w['eval_records']} eval "
                  f"records, max length {w['max_length']}", HEADERS, table_rows(result))


def print_figures(title: str, headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """The figures as a rich table (first and last columns left-aligned, PASS / MISS coloured); the
    other benchmark scripts print theirs through it too."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h in (headers[0], headers[-1]) else "right")
    for row in rows:
        table.add_row(*row[:-1], row[-1].replace("PASS", "[green]PASS[/]").replace("MISS", "[red]MISS[/]"))
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough for one line per figure
        console = Console(width=max(console.width, 140))
    console.print(table)


def markdown_section(result: dict) -> str:
    """The text between the ``bench:lora`` markers of ``docs/benchmarks.md``."""
    m, w = result["machine"], result["workload"]
    lines = [
        "",
        f"Measured {result['timestamp']} with `python benchmarks/bench_lora.py {' '.join(result['argv'])}`".rstrip()
        + f" (result file `{result['result_file']}`).",
        "",
        f"Workload: `{w['model']}`, LoRA r={HYPER['lora_r']} alpha={HYPER['lora_alpha']} on all linear layers, "
        f"AdamW lr {HYPER['lr']:g}, cosine, {HYPER['warmup_ratio']:.0%} warm-up, one epoch over "
        f"{w['train_records']} records (records 0-{w['train_records'] - 1}), eval on records "
        f"{EVAL_START}-{EVAL_START + w['eval_records'] - 1}, max length {w['max_length']}, "
        f"loss on assistant tokens only.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "| " + " | ".join("---" for _ in HEADERS) + " |",
        *("| " + " | ".join(row) + " |" for row in table_rows(result)),
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical / {m['physical_cores']} physical cores, "
        f"{m['memory_gib']} GiB; bf16 instructions: {', '.join(m['bf16_instructions']) or 'none'}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"accelerate {m['accelerate']}; {m['os']}.",
        "",
    ]
    return "\n".join(lines)


def launch(side: str, spec: dict, workdir: Path) -> dict:
    spec = {**spec, "result_path": str(workdir / f"{side}.result.json")}
    log = workdir / f"{side}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    print(f"[bench] {side}: running (log {log}) ...", flush=True)
    started = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--spec", json.dumps(spec)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise SystemExit(f"error: the {side} worker failed (exit {proc.returncode}); its log is {log}")
    result = json.loads(Path(spec["result_path"]).read_text())
    print(f"[bench] {side}: done in {time.perf_counter() - started:.1f} s", flush=True)
    return result


def prepare_data(args, workdir: Path) -> tuple[Path, Path]:
    """Write the training and evaluation slices of the alpaca demo file into ``workdir``."""
    if not args.data.is_file():
        raise SystemExit(
            f"error: the benchmark data is missing: {args.data} (expected ../shared/data beside the repo, "
            "i.e. ../shared/data/instruct/llamafactory_demo/alpaca_en_demo.json). Put the shared data folder "
            "there or pass --data PATH."
        )
    rows = json.loads(args.data.read_text(encoding="utf-8"))
    if args.records < 1 or args.records > EVAL_START:
        raise SystemExit(f"error: --records must be between 1 and {EVAL_START} (got {args.records}), "
                         f"so that training never overlaps the evaluation records {EVAL_START}+")
    if args.eval_records < 1 or EVAL_START + args.eval_records > len(rows):
        raise SystemExit(f"error: --eval-records must be between 1 and {len(rows) - EVAL_START} for this file "
                         f"({len(rows)} records; evaluation starts at record {EVAL_START}) (got {args.eval_records})")
    train, evals = workdir / "train.json", workdir / "eval.json"
    train.write_text(json.dumps(rows[: args.records], ensure_ascii=False), encoding="utf-8")
    evals.write_text(json.dumps(rows[EVAL_START : EVAL_START + args.eval_records], ensure_ascii=False),
                     encoding="utf-8")
    return train, evals


def default_threads() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=512, help="training records: the first N of the file")
    p.add_argument("--eval-records", type=int, default=99, help=f"evaluation records, from record {EVAL_START}")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per sample (and per packed row)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model alias or folder")
    p.add_argument("--only", choices=("ours", "baseline"), help="run one side only")
    p.add_argument("--out", type=Path, help="rewrite the marked section of this markdown file (docs/benchmarks.md)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON result file goes")
    p.add_argument("--data", type=Path, default=DATA_FILE, help="the alpaca demo file")
    p.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: physical cores)")
    p.add_argument("--ours-batch-size", type=int, default=1,
                   help="packed rows per micro-batch for ours (accumulation makes up ~16 records per step)")
    p.add_argument("--ours-processes", type=int, default=1,
                   help="ours: train.processes (data-parallel ranks sharing the --threads; peak RSS is their sum)")
    p.add_argument("--ours-gradient-checkpointing", action="store_true",
                   help="recompute activations in ours' backward pass (less memory, more compute)")
    p.add_argument("--baseline-from", type=Path, default=None,
                   help="reuse the baseline side of an earlier result JSON (same workload) instead of re-running it")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary run folders and worker logs")
    p.add_argument("--worker", choices=("ours", "baseline", "prepare"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        run_worker(args.worker, args.spec)
        return 0

    argv_shown = list(sys.argv[1:] if argv is None else argv)
    workdir = Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    try:
        train_path, eval_path = prepare_data(args, workdir)
        spec = {
            "model": args.model, "train_path": str(train_path), "eval_path": str(eval_path),
            "max_length": args.max_length, "threads": args.threads or default_threads(),
            "ours_batch_size": args.ours_batch_size, "workdir": str(workdir),
            "ours_gradient_checkpointing": args.ours_gradient_checkpointing, "ours_processes": args.ours_processes,
        }
        launch("prepare", spec, workdir)  # a first use of an alias builds it: not in either side's memory
        sides = {}
        if args.baseline_from is not None:  # the baseline does not change with our code: reuse a measured one
            previous = json.loads(args.baseline_from.read_text())
            sides["baseline"] = previous["sides"]["baseline"]
            print(f"[bench] baseline: reused from {args.baseline_from}")
        for side in ("ours", "baseline"):
            if args.only in (None, side) and side not in sides:
                sides[side] = launch(side, spec, workdir)
    finally:
        if args.keep_workdir:
            print(f"[bench] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    stamp = dt.datetime.now().astimezone()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    result_file = args.results_dir / f"{stamp.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        shown_file = str(result_file.resolve().relative_to(REPO))
    except ValueError:
        shown_file = str(result_file)
    result = {
        "timestamp": stamp.isoformat(timespec="seconds"),
        "argv": argv_shown,
        "result_file": shown_file,
        "workload": {"model": args.model, "train_records": args.records, "eval_records": args.eval_records,
                     "eval_start": EVAL_START, "max_length": args.max_length, "data": str(args.data),
                     "threads": spec["threads"], "hyperparameters": HYPER},
        "machine": machine_details(),
        "sides": sides,
        "comparison": compare(sides),
    }
    result_file.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"[bench] result: {result_file}")
    if args.out:
        write_section(args.out, MARK_START, MARK_END, markdown_section(result), append=True)
        print(f"[bench] updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
