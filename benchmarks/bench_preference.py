"""Head-to-head DPO LoRA benchmark: tunelab's ``task: preference`` against TRL's ``DPOTrainer``.

The workload: SmolLM2-135M-Instruct, LoRA r=16 / alpha=32 / dropout 0 on every linear layer, DPO
(sigmoid loss) with beta 0.1, the reference being the same model with its adapters off on both
sides, AdamW lr 5e-5, cosine schedule with 10% warm-up, one epoch over the first 250 pairs of
``../shared/data/preference/llamafactory_demo/dpo_en_demo.json``, 8 pairs per optimiser step
(micro-batches of 4 pairs, accumulation 2, on both sides), max length 512 tokens per sequence
(prompt + reply), the model's chat template; the held-out DPO loss on pairs 250-299. bf16 autocast
where the CPU has bf16 instructions (``tunelab.train.precision``), fp32 elsewhere, on both sides.

Both sides train on the same tokens: the pairs are tokenised by tunelab's own code
(``tunelab.data.preference.encode_pairs``: prompt tail and reply heads kept on truncation), which
``fine_tune`` runs for ours and the TRL worker runs before handing TRL the token ids
(``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, TRL's own tokenised layout, its dataset
preparation skipped). Each side runs in its own subprocess (``--worker ours|trl --spec JSON``) so
that its peak RSS is its own.

Figures:

* dataset tokens/s: the tokens of the training pairs (prompt + chosen and prompt + rejected, after
  truncation; padding never counted) divided by the training wall time (first to last optimiser
  step: loading, tokenisation, the final evaluation and saving are outside it, on both sides);
* peak RSS: the high-water mark of the worker process's resident memory (``VmHWM``);
* held-out DPO loss: the mean over the held-out pairs of ``-log sigmoid(beta * margin)`` after
  training (ours: the run's final evaluation; TRL: ``DPOTrainer.evaluate``), and the held-out pair
  accuracy (chosen reward > rejected reward);
* the host's matrix-multiply rate in bf16 and fp32 (a square product, median of several), before and
  after the two sides: how fast the machine was while they ran.

Usage::

    python benchmarks/bench_preference.py                         # the workload above, both sides
    python benchmarks/bench_preference.py --out docs/benchmarks.md
    python benchmarks/bench_preference.py --quick                 # tiny-random-llama, 16 / 8 pairs: a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import bench_lora as bl  # benchmarks/bench_lora.py, beside this script: machine details, tokenizer, peak RSS
from bench_micro_threads import matmul_gflops
from docs_section import write_section

PAIRS_FILE = bl.REPO.parent / "shared" / "data" / "preference" / "llamafactory_demo" / "dpo_en_demo.json"
EVAL_START = 250  # held-out pairs are EVAL_START .. EVAL_START + eval_pairs - 1
MARK_START, MARK_END = "<!-- bench:preference:start -->", "<!-- bench:preference:end -->"

# The targets of the preference issue (#19).
TARGET_TPS_RATIO = 3.0  # ours / TRL dataset tokens per second, at least
TARGET_RSS_RATIO = 0.5  # ours / TRL peak RSS, at most
TARGET_LOSS_REL = 0.02  # |ours - TRL| / TRL held-out DPO loss, at most

HYPER = {
    "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", "beta": 0.1,
    "lr": 5e-5, "schedule": "cosine", "warmup_ratio": 0.1, "weight_decay": 0.0, "max_grad_norm": 1.0,
    "epochs": 1, "seed": 42, "batch_size": 4, "grad_accum": 2,
}
# (model, train pairs, held-out pairs, max length, matmul size, matmul repeats): the full workload and --quick
FULL = ("smollm2-135m-instruct", 250, 50, 512, 2048, 20)
QUICK = ("tiny-random-llama", 16, 8, 128, 512, 5)


# =========================================================================== workers
# Everything heavy (torch, transformers, peft, trl, tunelab's training) is imported inside the workers only.


def _pairs(path: str, tokenizer, max_length: int) -> tuple[list, int]:
    """The pairs of ``path`` tokenised as ``fine_tune`` tokenises them for ``task: preference``."""
    from tunelab.data.formats import read_records
    from tunelab.data.preference import encode_pairs

    res = read_records(path)
    samples, rejects = encode_pairs(res.records, tokenizer, max_length=max_length, truncation="truncate",
                                    max_prompt_length=None, use_cache=False)
    return samples, len(rejects) + len(res.rejects)


def _pair_tokens(samples) -> int:
    return sum(2 * len(s.prompt) + len(s.chosen) + len(s.rejected) for s in samples)


def _data_info(spec: dict, tokenizer) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for name in ("train", "eval"):
        samples, rejected = _pairs(spec[f"{name}_path"], tokenizer, spec["max_length"])
        info |= {f"{name}_pairs": len(samples), f"{name}_rejected": rejected, f"{name}_tokens": _pair_tokens(samples),
                 f"{name}_truncated": sum(1 for s in samples if s.truncated)}
    return info


def worker_ours(spec: dict) -> dict:
    import torch
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    torch.set_num_threads(spec["threads"])
    data = _data_info(spec, bl._tokenizer(spec))
    raw = {
        "task": "preference",
        "run": {"name": "ours", "output_dir": str(Path(spec["workdir"]) / "runs")},
        "model": {"path": spec["model"], "dtype": "auto"},
        "data": {"train": [{"path": spec["train_path"]}], "eval": [{"path": spec["eval_path"]}],
                 "template": "auto", "max_length": spec["max_length"], "truncation": "truncate", "packing": False},
        "method": {"name": "lora", "r": HYPER["lora_r"], "alpha": HYPER["lora_alpha"],
                   "dropout": HYPER["lora_dropout"], "target_modules": HYPER["target_modules"]},
        "preference": {"loss": "dpo", "beta": HYPER["beta"], "reference": "adapters_off"},
        "train": {
            "optimizer": "adamw", "lr": HYPER["lr"], "schedule": HYPER["schedule"],
            "warmup_ratio": HYPER["warmup_ratio"], "weight_decay": HYPER["weight_decay"],
            "max_grad_norm": HYPER["max_grad_norm"], "batch_size": HYPER["batch_size"],
            "grad_accum": HYPER["grad_accum"], "epochs": HYPER["epochs"], "eval_every": 0, "save_every": 0,
            "precision": "auto", "seed": HYPER["seed"], "threads": spec["threads"], "log_every": 1,
            # recomputed activations: 2,458 instead of 4,756 MiB, 450 instead of 540 tokens/s (our side alone,
            # 2026-12-05, docs/preference.md); --ours-train gradient_checkpointing=false measures the faster one
            "gradient_checkpointing": True,
        },
    }
    raw["train"].update(spec.get("ours_train") or {})  # --ours-train: a variant of our side (memory vs speed)
    cfg, sources = load_config(None, base=raw)
    run_dir = fine_tune(cfg, sources, console=Console(width=120)).run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    run_data = json.loads((run_dir / "data.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [m for m in metrics if m.get("kind") == "train"]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    # training wall time: from the loop's start to the end of the last optimiser step
    train_seconds = float(train[-1]["elapsed_s"]) if train else float(summary["train_seconds"])
    env = json.loads((run_dir / "env.json").read_text())
    return {
        "side": "ours", **data,
        "run_train_pairs": run_data.get("train_pairs"), "run_train_tokens": run_data.get("train_tokens"),
        "tokens_trained": int(summary["tokens_seen"]),
        "optimiser_steps": int(summary["step"]),
        "batch_size": HYPER["batch_size"], "grad_accum": HYPER["grad_accum"],
        "micro_batch": f"{HYPER['batch_size']} pairs, chosen + rejected packed in one row per pair",
        "train_seconds": round(train_seconds, 3),
        "tokens_per_s": round(data["train_tokens"] / max(train_seconds, 1e-9), 2),
        "eval_loss": summary.get("best_eval_loss"),
        "eval_pair_accuracy": evals[-1].get("pair_accuracy") if evals else None,
        "train_loss_first": train[0]["loss"] if train else None,
        "train_loss_last": train[-1]["loss"] if train else None,
        "precision": summary["precision"],
        "base_dtype": env.get("dtype"),
        "threads": env.get("threads", torch.get_num_threads()),
        "overrides": spec.get("ours_train") or {},
        "micro_batch_threads": summary.get("micro_batch_threads"),
    }


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunelab.models.load import load_model
    from tunelab.train.precision import resolve_precision

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(HYPER["seed"])
    tokenizer = bl._tokenizer(spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = _data_info(spec, tokenizer)
    train, _ = _pairs(spec["train_path"], tokenizer, spec["max_length"])
    held_out, _ = _pairs(spec["eval_path"], tokenizer, spec["max_length"])
    # the same precision choice as ours (bf16 autocast on a bf16-capable CPU, fp32 master weights)
    precision = resolve_precision("auto", torch.device("cpu"))

    def dataset(samples) -> Dataset:
        return Dataset.from_list([{"prompt_ids": list(s.prompt), "chosen_ids": list(s.chosen),
                                   "rejected_ids": list(s.rejected)} for s in samples])

    class Pretokenized(DPOTrainer):
        """DPOTrainer on token ids given in its own tokenised layout: its dataset preparation (which
        would tokenise ``prompt`` / ``chosen`` / ``rejected`` text itself) is skipped."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    class Timer(TrainerCallback):
        def __init__(self):
            self.start = self.last = None
            self.losses: list[float] = []
            self.eval_logs: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
            if logs and "eval_loss" in logs:  # with DPOTrainer's own metrics (rewards/accuracies ...)
                self.eval_logs = dict(logs)

    # evaluation batches of equal size, so that the mean of batch means is the mean over pairs
    eval_batch = next(b for b in range(min(2 * HYPER["batch_size"], len(held_out)), 0, -1) if len(held_out) % b == 0)
    args = DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"),
        per_device_train_batch_size=HYPER["batch_size"], gradient_accumulation_steps=HYPER["grad_accum"],
        per_device_eval_batch_size=eval_batch,
        num_train_epochs=HYPER["epochs"], learning_rate=HYPER["lr"], lr_scheduler_type=HYPER["schedule"],
        warmup_steps=HYPER["warmup_ratio"],  # a float in [0, 1) is a ratio in transformers 5
        weight_decay=HYPER["weight_decay"], max_grad_norm=HYPER["max_grad_norm"],
        bf16=precision == "bf16", use_cpu=True, seed=HYPER["seed"],
        report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="steps", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0,
        beta=HYPER["beta"], loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False,
    )
    timer = Timer()
    trainer = Pretokenized(
        model=load_model(spec["model"], dtype=torch.float32), args=args, train_dataset=dataset(train),
        processing_class=tokenizer, callbacks=[timer],
        peft_config=LoraConfig(r=HYPER["lora_r"], lora_alpha=HYPER["lora_alpha"], lora_dropout=HYPER["lora_dropout"],
                               target_modules=HYPER["target_modules"], bias="none", task_type="CAUSAL_LM"))
    collate, counted = trainer.data_collator, {"tokens": 0}

    def counting(features):  # the real (unpadded) tokens of every training batch
        batch = collate(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting
    trainer.train()
    tokens_trained = counted["tokens"]
    train_seconds = (timer.last or time.perf_counter()) - (timer.start or time.perf_counter())
    ev = trainer.evaluate(eval_dataset=dataset(held_out))
    ev = {**timer.eval_logs, **ev}
    return {
        "side": "trl", **data,
        "tokens_trained": tokens_trained,
        "optimiser_steps": int(trainer.state.global_step),
        "batch_size": HYPER["batch_size"], "grad_accum": HYPER["grad_accum"],
        "micro_batch": f"{HYPER['batch_size']} pairs: chosen and rejected as 2 x {HYPER['batch_size']} padded rows",
        "train_seconds": round(train_seconds, 3),
        "tokens_per_s": round(data["train_tokens"] / max(train_seconds, 1e-9), 2),
        "eval_loss": ev.get("eval_loss"),
        "eval_pair_accuracy": ev.get("eval_rewards/accuracies"),
        "eval_batch_size": eval_batch,
        "train_loss_first": timer.losses[0] if timer.losses else None,
        "train_loss_last": timer.losses[-1] if timer.losses else None,
        "precision": precision,
        "base_dtype": "float32",
        "threads": torch.get_num_threads(),
    }


def run_worker(side: str, spec_text: str) -> None:
    spec = json.loads(spec_text)
    if side == "prepare":
        from tunelab.models.registry import resolve_alias

        resolve_alias(spec["model"])  # a first use of an alias builds it: in neither side's memory or time
        Path(spec["result_path"]).write_text(json.dumps({"side": "prepare"}))
        return
    started = time.perf_counter()
    result = (worker_ours if side == "ours" else worker_trl)(spec)
    result["worker_seconds"] = round(time.perf_counter() - started, 2)
    result["peak_rss_mib"] = round(bl._peak_rss_mib(), 1)
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2))


# =========================================================================== orchestration


def launch(side: str, spec: dict, workdir: Path) -> dict:
    """Run one worker (this script with ``--worker``) in its own process; its output goes to a log."""
    spec = {**spec, "result_path": str(workdir / f"{side}.result.json")}
    log = workdir / f"{side}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    print(f"[bench] {side}: running (log {log}) ...", flush=True)
    started = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", side,
                               "--spec", json.dumps(spec)], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=bl.REPO)
    if proc.returncode != 0:
        sys.stderr.write("\n".join(log.read_text(errors="replace").splitlines()[-40:]) + "\n")
        raise SystemExit(f"error: the {side} worker failed (exit {proc.returncode}); its log is {log}")
    print(f"[bench] {side}: done in {time.perf_counter() - started:.1f} s", flush=True)
    return json.loads(Path(spec["result_path"]).read_text())


def prepare_data(path: Path, pairs: int, eval_pairs: int, workdir: Path) -> tuple[Path, Path]:
    """The training pairs (the first ``pairs``) and the held-out ones (from ``EVAL_START``) as two files."""
    if not path.is_file():
        raise SystemExit(f"error: the benchmark data is missing: {path} (expected ../shared/data beside the repo). "
                         "Put the shared data folder there or pass --data PATH")
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not 1 <= pairs <= EVAL_START:
        raise SystemExit(f"error: --pairs must be between 1 and {EVAL_START} (got {pairs}), so that training never "
                         f"overlaps the held-out pairs {EVAL_START}+")
    if eval_pairs < 1 or EVAL_START + eval_pairs > len(rows):
        raise SystemExit(f"error: --eval-pairs must be between 1 and {len(rows) - EVAL_START} for this file "
                         f"({len(rows)} pairs; held-out pairs start at {EVAL_START}) (got {eval_pairs})")
    train, held_out = workdir / "train.json", workdir / "eval.json"
    train.write_text(json.dumps(rows[:pairs], ensure_ascii=False), encoding="utf-8")
    held_out.write_text(json.dumps(rows[EVAL_START : EVAL_START + eval_pairs], ensure_ascii=False), encoding="utf-8")
    return train, held_out


def compare(sides: dict) -> dict:
    ours, trl = sides.get("ours"), sides.get("trl")
    if not (ours and trl):
        return {}
    tps = ours["tokens_per_s"] / trl["tokens_per_s"]
    rss = ours["peak_rss_mib"] / trl["peak_rss_mib"]
    rel = None
    if ours["eval_loss"] is not None and trl["eval_loss"] is not None:
        rel = (ours["eval_loss"] - trl["eval_loss"]) / trl["eval_loss"]
    return {
        "tokens_per_s_ratio": tps, "peak_rss_ratio": rss, "eval_loss_rel_diff": rel,
        "same_tokens": (ours["train_tokens"] == trl["train_tokens"] == ours["run_train_tokens"]
                        == ours["tokens_trained"] == trl["tokens_trained"]
                        and ours["train_pairs"] == trl["train_pairs"] == ours["run_train_pairs"]),
        "targets": {
            "tokens_per_s_ratio": {"target": f">= {TARGET_TPS_RATIO}x", "pass": tps >= TARGET_TPS_RATIO},
            "peak_rss_ratio": {"target": f"<= {TARGET_RSS_RATIO}x", "pass": rss <= TARGET_RSS_RATIO},
            "eval_loss_rel_diff": {"target": f"within {TARGET_LOSS_REL:.0%}",
                                   "pass": rel is not None and abs(rel) <= TARGET_LOSS_REL},
        },
    }


def _fmt(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def table_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(figure, ours, TRL, ratio / difference, target + status) for the terminal and the docs."""
    o, t = result["sides"].get("ours", {}), result["sides"].get("trl", {})
    cmp = result["comparison"]
    targets = cmp.get("targets", {})

    def status(key: str) -> str:
        x = targets.get(key)
        return f"{x['target']}: {'PASS' if x['pass'] else 'MISS'}" if x else "-"

    def ratio(key: str) -> str:  # three decimals: a 2.995 must not print as a "3.00x" that misses ">= 3.0x"
        return _fmt(cmp.get(key), ".3f") + ("x" if key in cmp else "")

    return [
        ("dataset tokens/s", _fmt(o.get("tokens_per_s")), _fmt(t.get("tokens_per_s")), ratio("tokens_per_s_ratio"),
         status("tokens_per_s_ratio")),
        ("peak RSS (MiB)", _fmt(o.get("peak_rss_mib")), _fmt(t.get("peak_rss_mib")), ratio("peak_rss_ratio"),
         status("peak_rss_ratio")),
        ("held-out DPO loss", _fmt(o.get("eval_loss"), ".4f"), _fmt(t.get("eval_loss"), ".4f"),
         _fmt(cmp.get("eval_loss_rel_diff"), "+.2%"), status("eval_loss_rel_diff")),
        ("held-out pair accuracy", _fmt(o.get("eval_pair_accuracy"), ".1%"), _fmt(t.get("eval_pair_accuracy"), ".1%"),
         "-", "-"),
        ("training time (s)", _fmt(o.get("train_seconds"), ".1f"), _fmt(t.get("train_seconds"), ".1f"), "-", "-"),
        ("tokens trained", _fmt(o.get("tokens_trained"), ","), _fmt(t.get("tokens_trained"), ","),
         ("identical" if cmp.get("same_tokens") else "DIFFERENT") if "same_tokens" in cmp else "-", "-"),
        ("optimiser steps", _fmt(o.get("optimiser_steps"), "d"), _fmt(t.get("optimiser_steps"), "d"), "-", "-"),
        ("pairs per micro-batch x accumulation", f"{o['batch_size']} x {o['grad_accum']}" if o else "-",
         f"{t['batch_size']} x {t['grad_accum']}" if t else "-", "-", "-"),
        ("precision (base weights)", f"{o['precision']} ({o['base_dtype']})" if o else "-",
         f"{t['precision']} ({t['base_dtype']})" if t else "-", "-", "-"),
    ]


HEADERS = ("figure", "tunelab (ours)", "TRL DPOTrainer", "ours / TRL", "target")


def print_table(result: dict) -> None:
    w = result["workload"]
    bl.print_figures(f"DPO LoRA benchmark: {w['model']}, {w['train_pairs']} train / {w['eval_pairs']} held-out "
                     f"pairs, max length {w['max_length']}", HEADERS, table_rows(result))
    b, a = result["matmul_before"], result["matmul_after"]
    print(f"host matmul ({result['matmul_n']} x {result['matmul_n']}): bf16 {b['bf16']:,.1f} / fp32 {b['fp32']:,.1f} "
          f"GFLOP/s before, bf16 {a['bf16']:,.1f} / fp32 {a['fp32']:,.1f} after", flush=True)


def markdown_section(result: dict) -> str:
    """The text between the ``bench:preference`` markers of ``docs/benchmarks.md``."""
    m, w = result["machine"], result["workload"]
    b, a = result["matmul_before"], result["matmul_after"]
    lines = [
        "",
        f"Measured {result['timestamp']} with `python benchmarks/bench_preference.py {' '.join(result['argv'])}`"
        .rstrip() + f" (result file `{result['result_file']}`).",
        "",
        f"Workload: `{w['model']}`, LoRA r={HYPER['lora_r']} alpha={HYPER['lora_alpha']} on all linear layers, DPO "
        f"(sigmoid) beta {HYPER['beta']:g}, reference = adapters off on both sides, AdamW lr {HYPER['lr']:g}, cosine, "
        f"{HYPER['warmup_ratio']:.0%} warm-up, one epoch over pairs 0-{w['train_pairs'] - 1} of `dpo_en_demo.json`, "
        f"{HYPER['batch_size']} pairs x {HYPER['grad_accum']} accumulation per step, held-out pairs "
        f"{EVAL_START}-{EVAL_START + w['eval_pairs'] - 1}, max length {w['max_length']} per sequence, "
        f"{w['threads']} torch threads; both sides on the tokens of tunelab's `encode_pairs`.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "| " + " | ".join("---" for _ in HEADERS) + " |",
        *("| " + " | ".join(row) + " |" for row in table_rows(result)),
        "",
        f"Host matmul ({result['matmul_n']} x {result['matmul_n']}, {w['threads']} threads): bf16 {b['bf16']:,.1f} / "
        f"fp32 {b['fp32']:,.1f} GFLOP/s before the two sides, bf16 {a['bf16']:,.1f} / fp32 {a['fp32']:,.1f} after.",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical / {m['physical_cores']} physical cores, "
        f"{m['memory_gib']} GiB; bf16 instructions: {', '.join(m['bf16_instructions']) or 'none'}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"trl {m.get('trl', '-')}; {m['os']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK[0]}, {QUICK[1]} / {QUICK[2]} pairs, max length {QUICK[3]}, a small matmul")
    p.add_argument("--pairs", type=int, help=f"training pairs: the first N of the file (default {FULL[1]})")
    p.add_argument("--eval-pairs", type=int, help=f"held-out pairs, from pair {EVAL_START} (default {FULL[2]})")
    p.add_argument("--max-length", type=int, help=f"max tokens per sequence, prompt + reply (default {FULL[3]})")
    p.add_argument("--model", help=f"model alias or folder (default {FULL[0]})")
    p.add_argument("--only", choices=("ours", "trl"), help="run one side only")
    p.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: physical cores)")
    p.add_argument("--data", type=Path, default=PAIRS_FILE, help="the DPO demo file")
    p.add_argument("--results-dir", type=Path, default=bl.RESULTS_DIR, help="where the JSON result file goes")
    p.add_argument("--out", type=Path, help="rewrite the marked section of this markdown file (docs/benchmarks.md)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary run folders and worker logs")
    p.add_argument("--ours-train", action="append", default=[], metavar="KEY=JSON",
                   help="a train.KEY for our side only, e.g. micro_batch_threads=1 (repeatable)")
    p.add_argument("--worker", choices=("ours", "trl", "prepare"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.spec)
        return 0

    model, pairs, eval_pairs, max_length, matmul_n, matmul_repeats = QUICK if args.quick else FULL
    model, pairs = args.model or model, args.pairs or pairs
    eval_pairs, max_length = args.eval_pairs or eval_pairs, args.max_length or max_length
    threads = args.threads or bl.default_threads()
    before = matmul_gflops(threads, n=matmul_n, repeats=matmul_repeats)
    print(f"[bench] host matmul before: {before} GFLOP/s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="tunelab-bench-pref-"))
    try:
        train_path, eval_path = prepare_data(args.data, pairs, eval_pairs, workdir)
        spec = {"model": model, "train_path": str(train_path), "eval_path": str(eval_path), "max_length": max_length,
                "threads": threads, "workdir": str(workdir),
                "ours_train": {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.ours_train)}}
        launch("prepare", spec, workdir)
        sides = {side: launch(side, spec, workdir) for side in ("ours", "trl") if args.only in (None, side)}
    finally:
        if args.keep_workdir:
            print(f"[bench] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    after = matmul_gflops(threads, n=matmul_n, repeats=matmul_repeats)

    stamp = dt.datetime.now().astimezone()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    result_file = args.results_dir / f"preference-{stamp.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        shown = str(result_file.resolve().relative_to(bl.REPO))
    except ValueError:
        shown = str(result_file)
    machine = bl.machine_details()
    try:
        machine["trl"] = metadata.version("trl")
    except metadata.PackageNotFoundError:  # possible with --only ours
        machine["trl"] = "not installed"
    result = {
        "timestamp": stamp.isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv), "result_file": shown,
        "workload": {"model": model, "train_pairs": pairs, "eval_pairs": eval_pairs, "eval_start": EVAL_START,
                     "max_length": max_length, "data": str(args.data), "threads": threads, "hyperparameters": HYPER},
        "machine": machine, "matmul_n": matmul_n, "matmul_before": before, "matmul_after": after,
        "sides": sides, "comparison": compare(sides),
    }
    if any(s.get("eval_loss") is not None and not math.isfinite(s["eval_loss"]) for s in sides.values()):
        print("[bench] warning: a held-out loss is not finite", flush=True)
    result_file.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"[bench] result: {result_file}")
    if args.out:
        write_section(args.out, MARK_START, MARK_END, markdown_section(result), append=True)
        print(f"[bench] updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
