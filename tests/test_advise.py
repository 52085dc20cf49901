"""The advisor: predicted peak memory per method against the measured peak; dry-run; recommendation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.methods import METHODS
from tunelab.search.advise import (
    Memory,
    MethodEstimate,
    Probes,
    _probe_config,
    estimate_method,
    measure_step_memory,
    recommend,
)
from tunelab.search.memory import TensorMemory


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    """tiny-random-llama's architecture with 4 layers (the probes have 1-3: the prediction extrapolates)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.models.load import load_tokenizer
    from tunelab.models.registry import resolve_alias

    folder = tmp_path_factory.mktemp("tiny4")
    config = AutoConfig.from_pretrained(resolve_alias("tiny-random-llama"))
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer("tiny-random-llama").save_pretrained(folder)
    return folder


OPTIONS = {"llama_adapter": {"layers": 2}}  # adapted top layers < depth: the probes start at 2 and extrapolate


def _cfg(model: Path, method: str, **train):
    task = "classification" if method == "head" else "sft"
    return load_config(None, base={
        "task": task, "model": {"path": str(model)}, "method": {"name": method, **OPTIONS.get(method, {})},
        "data": {"train": [{"path": "unused.jsonl"}], "max_length": 32},
        "train": {"batch_size": 2, "precision": "fp32", **train}})[0]


def test_tensor_memory_counts_live_storages_once_and_frees_them():
    tracker = TensorMemory()
    with tracker:
        a = torch.ones(1024, 256)  # 1 MiB
        view = a[:10]  # a view: same storage, not counted again
        b = a * 2  # 1 MiB more
        assert tracker.current == 2 * 2**20
        del a, b
    assert view.shape[0] == 10 and tracker.current == 2**20 and tracker.peak == 2 * 2**20
    del view
    assert tracker.current == 0


def _check(cfg, tiny4, method: str, checkpointing: bool) -> tuple[float, float]:
    probes = Probes(str(tiny4))
    try:
        predicted, trainable, params = estimate_method(cfg, method, probes, precision="fp32", checkpointing=checkpointing)
    finally:
        probes.close()
    measured, m_trainable, m_params = measure_step_memory(
        _probe_config(cfg, method, checkpointing=checkpointing, precision="fp32", model_path=str(tiny4)), "fp32")
    assert (trainable, params) == (m_trainable, m_params)  # parameter counts extrapolate exactly
    for part in ("weights", "gradients", "optimizer"):
        assert getattr(predicted, part) == pytest.approx(getattr(measured, part), rel=0.01), part
    assert abs(predicted.peak / measured.peak - 1) < 0.20, (predicted, measured)
    return predicted.peak, measured.peak


def test_lora_prediction_with_and_without_checkpointing(tiny4):
    cfg = _cfg(tiny4, "lora")
    plain = _check(cfg, tiny4, "lora", False)
    ckpt = _check(cfg, tiny4, "lora", True)
    assert ckpt[1] < plain[1]  # checkpointing measurably saves activations


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])
def test_every_method_predicted_peak_is_within_20_percent_of_the_measured_peak(tiny4, method):
    cfg = _cfg(tiny4, method)
    _check(cfg, tiny4, method, False)


def test_memory_counts_the_micro_batches_training_runs_at_once(tiny4):
    from tunelab.search.advise import micro_batches

    # the rule of train.micro_batch_threads: 2 at once for LoRA without dropout on a 2-thread CPU with
    # accumulation; 1 with dropout, without accumulation, on a GPU, or when set to 1
    lora = _cfg(tiny4, "lora", grad_accum=2, threads=2)
    lora.method.dropout = 0.0
    assert micro_batches(lora, "lora", 0.01, "cpu") == 2
    assert micro_batches(lora, "lora", 0.01, "cuda") == 1
    assert micro_batches(lora, "full", 1.0, "cpu") == 1  # a full gradient per micro-batch: off
    assert micro_batches(_cfg(tiny4, "lora", grad_accum=1, threads=2), "lora", 0.01, "cpu") == 1
    assert micro_batches(_cfg(tiny4, "lora", grad_accum=2, threads=2, micro_batch_threads=1), "lora", 0.01, "cpu") == 1
    with_dropout = _cfg(tiny4, "lora", grad_accum=2, threads=2)
    with_dropout.method.dropout = 0.1
    assert micro_batches(with_dropout, "lora", 0.01, "cpu") == 1
    # two in flight: one more set of activations, and a gradient per micro-batch beside the accumulated one
    m = Memory(weights=100.0, gradients=4.0, optimizer=8.0, activations=50.0, peak=162.0)
    two = m.concurrent(2)
    assert (two.weights, two.gradients, two.optimizer, two.activations, two.peak) == (100.0, 12.0, 8.0, 100.0, 220.0)
    assert m.concurrent(1) is m


def test_recommendation_follows_data_memory_and_knowledge():
    def est(name, peak, params=1_000_000):
        m = Memory(peak / 4, 0, 0, peak / 2, peak)
        return MethodEstimate(name, trainable=1, parameters=params, memory=m, memory_checkpointing=m)

    cfg = load_config(None, base={"model": {"path": "tiny-random-llama"}, "data": {"train": [{"path": "x.jsonl"}]}})[0]
    all_fit = [est(m, 100) for m in ("full", "lora", "qlora", "prompt")]
    far_big = {"target_tokens": 5_000_000, "base_loss": 4.0}
    assert recommend(cfg, all_fit, 10_000, far_big, "cpu")[0] == "full"
    assert recommend(cfg, all_fit, 10_000, {"target_tokens": 5_000, "base_loss": 1.5}, "cpu")[0] == "prompt"
    assert recommend(cfg, all_fit, 10_000, {"target_tokens": 200_000, "base_loss": 2.0}, "cpu")[0] == "lora"
    # keeping general knowledge (a regulariser is configured) rules full fine-tuning out
    keep = cfg.model_copy(deep=True)
    keep.objectives.l2sp = {"weight": 0.1}
    choice, reasons = recommend(keep, all_fit, 10_000, far_big, "cpu")
    assert choice == "lora" and any("general knowledge" in r for r in reasons)
    # hardware: only QLoRA fits in the memory there is
    tight = [est("full", 10_000), est("lora", 900), est("qlora", 500)]
    choice, reasons = recommend(cfg, tight, 1_000, {"target_tokens": 200_000, "base_loss": 2.0}, "cpu")
    assert choice == "qlora" and any("available" in r for r in reasons)


@pytest.mark.slow
def test_train_dry_run_prints_the_estimate_and_does_not_train(tmp_path, alpaca_path, capsys):
    cfg = {"run": {"name": "dry", "output_dir": str(tmp_path / "runs")}, "model": {"path": "tiny-random-llama"},
           "data": {"train": [{"path": str(alpaca_path), "limit": 16}], "max_length": 128},
           "method": {"name": "lora", "r": 4}, "train": {"batch_size": 2, "max_steps": 50, "precision": "fp32", "threads": 1}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory per method" in out and "recommendation:" in out
    assert "x 50 steps" in out  # the time estimate covers the configured steps
    # the table has a row per method: its name, then its trainable-parameter count
    listed = {words[0] for words in (re.findall(r"[\w.,-]+", line) for line in out.splitlines())
              if len(words) >= 3 and words[1].replace(",", "").isdigit()}
    assert {"full", "lora", "qlora"} <= listed, out
    assert not (tmp_path / "runs").exists()  # nothing trained, no run directory
