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

# Under pytest-xdist (`make test` runs `-n auto`) the workers share the cores: each worker, and every
# process it starts, gets its share of threads (tunelab.train.cpu_tuning.default_threads reads
# OMP_NUM_THREADS), instead of every worker spinning on all cores at once.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


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


def train_here(config: Path) -> None:
    """``tunelab train CONFIG`` for a 1-process run, in this test process: the CLI's own code, without a new
    interpreter's ~8 s of imports (torch, transformers, peft). One thread, as the tests' CLI runs get; the
    test process's thread count is put back."""
    import torch

    from tunelab.cli import main

    threads, cap = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        code = main(["train", str(config)])
    finally:
        torch.set_num_threads(threads)
        if cap is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = cap
    assert code == 0, f"tunelab train {config} exited with {code}"


ACCELERATE_2 = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]


def train_one_and_two(tmp_path: Path, one: dict, two: dict, *, launcher: str = "accelerate") -> tuple[Path, Path]:
    """Train config ``one`` in 1 process (:func:`train_here`) and ``two`` in 2 (``accelerate launch``, or
    ``launcher="tunelab"``: ``train.processes: 2``), one thread each, through the CLI; returns their run folders."""
    import subprocess
    import sys

    import yaml

    import warm

    if launcher == "tunelab":
        two = {**two, "train": {**two["train"], "processes": 2}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for cfg, multi in ((one, False), (two, True)):
        path = tmp_path / f"{cfg['run']['name']}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        runs.append(Path(cfg["run"]["output_dir"]) / cfg["run"]["name"])
        if not multi:
            train_here(path)
            continue
        if launcher == "accelerate":  # a real interpreter per rank, as accelerate starts them
            done = subprocess.run([str(Path(sys.executable).with_name("accelerate")), "launch", *ACCELERATE_2, "-m",
                                   "tunelab.cli", "train", str(path)], capture_output=True, text=True, env=env,
                                  timeout=300)
        else:
            done = warm.run(["train", str(path)], env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    return runs[0], runs[1]


def fork_ranks(fn, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``, but each rank forked from this test process, which has
    imported torch and tunelab already: a spawned rank is a new interpreter that imports them again (3-8 s of
    every rank here). The ranks run with one thread, make their own process group and leave with ``os._exit``
    (multiprocessing's fork children), as the product's zygote ranks do."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="fork")


def assert_adam_close(got, want, *, bulk: float = 1e-5, worst: float = 3e-4, outliers: float = 0.01) -> None:
    """Weights after a few AdamW steps taken two ways (1 vs 2 processes, accumulation vs one batch): all but
    ``outliers`` of the elements within ``bulk``, every element within ``worst``.

    Adam divides each gradient by its own sqrt(v): a near-zero gradient whose 7th digit differs between the two
    reductions moves its weight by a visible fraction of the lr. With torch's fused AdamW that was one element of
    256 by up to 1.7e-4 (lr 1e-3, 2-3 steps: LoRA DPO / KTO, 1 vs 2 processes, FSDP); a wrong gradient moves most
    elements, which ``bulk`` catches.
    """

    diff = (got.detach().float() - want.detach().float()).abs()
    assert diff.max().item() <= worst, f"max difference {diff.max().item():.2e} > {worst:.0e}"
    frac = (diff > bulk).float().mean().item()
    assert frac <= outliers, f"{frac:.1%} of the elements differ by more than {bulk:.0e}"
