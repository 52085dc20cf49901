"""Small run directories for the eval/report tests, made without training (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def write_run_files(run: Path, *, model: str = "tiny-random-llama", method: str = "lora", data: str = "train.jsonl",
                    lr: float = 2e-3, steps: int = 6, losses: list[float] | None = None) -> Path:
    """config.yaml, summary.json and metrics.jsonl as ``tunelab train`` writes them."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"run": {"name": run.name, "output_dir": str(run.parent)}, "model": {"path": model, "dtype": "auto"},
           "data": {"train": [{"path": str(data), "format": "auto"}], "max_length": 128, "packing": False},
           "method": {"name": method, "r": 4, "alpha": 8},
           "train": {"lr": lr, "batch_size": 2, "grad_accum": 2, "epochs": 1.0, "max_steps": steps, "seed": 0,
                     "schedule": "cosine", "precision": "fp32"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    losses = losses or [2.5 - 0.2 * i for i in range(steps)]
    lines = [{"time": 1.0 + i, "kind": "train", "step": i + 1, "loss": loss, "lr": lr * (1 - i / steps),
              "grad_norm": 1.0, "tokens": 100, "tokens_per_s": 500.0} for i, loss in enumerate(losses)]
    lines += [{"time": 9.0, "kind": "eval", "step": steps // 2, "eval_loss": 2.2, "best": True},
              {"time": 10.0, "kind": "eval", "step": steps, "eval_loss": 1.9, "best": True}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "summary.json").write_text(json.dumps({"step": steps, "stop_reason": "completed", "train_seconds": 3.5,
                                                  "tokens_per_s": 512.0, "best_eval_loss": 1.9}))
    (run / "data.json").write_text(json.dumps({"train_samples": 40, "eval_samples": 4, "train_tokens": 4000,
                                               "truncated": 0, "rejected": 1, "rejected_by_reason": {"too_long": 1}}))
    return run


def make_lora_run(run: Path, data: Path, *, seed: int = 0, scale: float = 1.0) -> Path:
    """A run whose final/ is a real PEFT LoRA adapter on tiny-random-llama (random, non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.models.load import load_model, load_tokenizer

    write_run_files(run, data=str(data))
    torch.manual_seed(seed)
    model = get_peft_model(load_model("tiny-random-llama"), LoraConfig(r=4, lora_alpha=8 * scale,
                                                                       target_modules="all-linear",
                                                                       init_lora_weights=False))
    final = run / "final"
    model.save_pretrained(final)
    load_tokenizer("tiny-random-llama").save_pretrained(final)
    (final / "tunelab.json").write_text(json.dumps({"base_model": "tiny-random-llama", "method": "lora",
                                                    "run": run.name}))
    return run


def write_classification_data(path: Path, n: int = 12) -> Path:
    labels = ["positive", "negative", "neutral"]
    rows = [{"text": f"review number {i}: the food was {['great', 'awful', 'fine'][i % 3]}", "label": labels[i % 3]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_chat_data(path: Path, n: int = 8) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Repeat the word number {i}."},
                          {"role": "assistant", "content": f"word {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
