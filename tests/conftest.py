"""Shared fixtures: the real data folder, an isolated model cache, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Never touch the network in tests; keep models in one cache shared by the whole session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (the ../shared folder sits beside the repo in CI)")
    return path


@pytest.fixture
def alpaca_path() -> Path:
    return shared("instruct", "llamafactory_demo", "alpaca_en_demo.json")


def tiny_config(tmp_path: Path, data_path: Path, **sections) -> dict:
    """A config dict for tiny-random-llama; ``sections`` update the defaults section by section."""
    cfg = {
        "run": {"name": "tiny", "output_dir": str(tmp_path / "runs")},
        "model": {"path": "tiny-random-llama"},
        "data": {"train": [{"path": str(data_path), "limit": 48}], "max_length": 128},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"lr": 2e-3, "batch_size": 4, "grad_accum": 2, "epochs": 1, "precision": "fp32", "seed": 0},
    }
    for key, value in sections.items():
        if key == "method" and "name" in value and value["name"] != cfg["method"]["name"]:
            cfg[key] = value
        elif isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg
