"""Slanted triangular LR, discriminative (layer-wise) LRs and gradual unfreezing."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.models.load import load_model
from tunelab.train.recipe import build_optimizer, fine_tune
from tunelab.train.schedule import GradualUnfreezing, layer_index, lr_factor, stlr_factor


def test_stlr_rises_linearly_to_the_peak_then_decays_to_one_over_ratio():
    total, cut_frac, ratio = 100, 0.1, 32.0
    f = [stlr_factor(s, total_steps=total, cut_frac=cut_frac, ratio=ratio) for s in range(total + 1)]
    assert f[0] == pytest.approx(1 / ratio)
    assert max(f) == f[10] == pytest.approx(1.0)  # the peak at step cut = 10
    rises, falls = torch.tensor(f[:11]).diff(), torch.tensor(f[10:]).diff()
    assert torch.allclose(rises, rises[0]) and rises[0] > 0  # linear, short rise
    assert torch.allclose(falls, falls[0]) and falls[0] < 0  # linear, long decay
    assert abs(falls[0]) < rises[0] / 8
    assert f[total] == pytest.approx(1 / ratio)
    assert lr_factor(5, total_steps=total, warmup=0, kind="stlr", stlr_cut_frac=cut_frac, stlr_ratio=ratio) == f[5]


def test_layer_index_by_name():
    assert layer_index("model.embed_tokens.weight", 30) == -1
    assert layer_index("base_model.model.model.layers.7.mlp.up_proj.lora_A.default.weight", 30) == 7
    assert layer_index("model.norm.weight", 30) == 30
    assert layer_index("prompt_encoder.default.embedding.weight", 30) == 30  # virtual tokens sit on top


def test_discriminative_lr_per_layer(tmp_path):
    cfg, _ = load_config(None, base=tiny_config(tmp_path, tmp_path / "x.json", method={"name": "full"},
                                                train={"layer_lr_decay": 0.5, "lr": 1e-3}))
    model = load_model("tiny-random-llama")
    optimizer = build_optimizer(model, cfg.train)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["model.norm.weight"])] == pytest.approx(1e-3)  # the top: peak LR
    assert lr_of[id(named["model.layers.1.mlp.up_proj.weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(named["model.layers.0.self_attn.q_proj.weight"])] == pytest.approx(1e-3 * 0.25)
    assert lr_of[id(named["model.embed_tokens.weight"])] == pytest.approx(1e-3 * 0.125)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # group 0 (logged) is the top
    assert len(lr_of) == len(named)


def test_unfreezing_schedule_which_groups_train_when():
    model = load_model("tiny-random-llama")  # 2 layers
    u = GradualUnfreezing(model.named_parameters(), n_layers=2, every=2, unit="epoch", group_size=1,
                          start_groups=1, steps_per_epoch=3)
    assert [u.lowest_trained_layer(s) for s in (0, 5, 6, 11, 12, 100)] == [1, 1, 0, 0, -1, -1]
    u = GradualUnfreezing(model.named_parameters(), n_layers=2, every=1, unit="step", group_size=1,
                          start_groups=1, steps_per_epoch=99)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    u.drop_frozen_grads(0)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n in dict(model.named_parameters()) if n.startswith("model.layers.1.")} | {"model.norm.weight"}


def test_gradual_unfreezing_in_a_run(tmp_path, alpaca_path):
    """Full fine-tuning, one more layer every 2 steps: after 2 steps layer 0 and the (tied)
    embeddings are untouched, layer 1 and the final norm trained; after 4, layer 0 too; a run
    resumed from step 2 ends bit-identical."""
    base = {n: p.detach().clone() for n, p in load_model("tiny-random-llama").named_parameters()}
    raw = tiny_config(tmp_path, alpaca_path, method={"name": "full"},
                      train={"max_steps": 4, "epochs": None, "grad_accum": 1, "batch_size": 2, "save_every": 2,
                             "unfreeze": {"every": 2, "unit": "step"}, "schedule": "stlr", "layer_lr_decay": 0.5},
                      data={"train": [{"path": str(alpaca_path), "limit": 8}], "max_length": 64})
    out = fine_tune(load_config(None, base=raw)[0])

    def changed(tensors) -> set[str]:
        return {n for n, t in tensors.items() if n in base and not torch.equal(t, base[n])}

    two = changed(load_file(str(out.run_dir / "checkpoints" / "step-000002" / "trainable.safetensors")))
    assert two == {n for n in base if n.startswith("model.layers.1.")} | {"model.norm.weight"}
    four = changed(load_file(str(out.run_dir / "final" / "model.safetensors")))
    saved = {n: t.clone() for n, t in load_file(str(out.run_dir / "final" / "model.safetensors")).items()}
    assert {n for n in base if n.startswith("model.layers.")} <= four
    assert "model.embed_tokens.weight" not in four

    # resume from the step-2 checkpoint: the same unfreezing and LRs, bit-identical final weights
    shutil.rmtree(out.run_dir / "checkpoints" / "step-000004")
    shutil.rmtree(out.run_dir / "final")
    resumed = fine_tune(load_config(None, base=raw)[0], resume=True)
    assert resumed.summary["steps_this_session"] == 2
    again = load_file(str(resumed.run_dir / "final" / "model.safetensors"))
    assert set(again) == set(saved) and all(torch.equal(again[n], saved[n]) for n in saved)


def test_stlr_and_warmup_conflict(tmp_path):
    with pytest.raises(ConfigError, match="train.schedule stlr has its own rise"):
        load_config(None, base=tiny_config(tmp_path, tmp_path / "x.json", train={"schedule": "stlr", "warmup_steps": 3}))
