"""A few steps on the real SmolLM2-135M-Instruct: the loss on alpaca data drops."""

from __future__ import annotations

import json

import pytest
import yaml

from tunelab.config import load_config
from tunelab.train.recipe import fine_tune


@pytest.mark.real_model
def test_smollm2_lora_loss_drops_on_alpaca(tmp_path, alpaca_path):
    cfg = {
        "run": {"name": "smol", "output_dir": str(tmp_path / "runs")},
        "model": {"path": "smollm2-135m-instruct"},
        # 2 records packed into one row of <= 512 tokens: every step sees the same row
        "data": {"train": [{"path": str(alpaca_path), "limit": 2}], "max_length": 512, "packing": True},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "train": {"lr": 2e-3, "max_steps": 6, "batch_size": 1, "grad_accum": 1, "schedule": "constant", "seed": 0},
    }
    path = tmp_path / "smol.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = fine_tune(*load_config(path))
    assert json.loads((out.run_dir / "data.json").read_text())["train_rows"] == 1
    rows = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    env = json.loads((out.run_dir / "env.json").read_text())
    assert env["model"]["parameters"] > 130_000_000
