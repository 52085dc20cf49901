"""Preference tuning composed with the rest of tunelab: every method (or a one-line refusal), resume after a
kill, L2-SP / EWC, eval.forgetting and a sweep over ``preference.beta``, on tiny-random-llama."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import shared
from faults import Fault, SimulatedKill, install
from test_preference import config_file, demo, metrics, run
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.train.recipe import fine_tune

SHORT = {"max_steps": 2, "eval_every": 2, "lr": 1e-2, "batch_size": 2, "grad_accum": 1}


def changed(model, before: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())]


@pytest.mark.parametrize(("method", "reference"), [
    ({"name": "lora", "r": 4, "alpha": 8, "dora": True}, "adapters_off"),
    ({"name": "qlora", "r": 4, "alpha": 8}, "adapters_off"),
    ({"name": "ia3"}, "adapters_off"),
    ({"name": "adapter"}, "adapters_off"),
    ({"name": "freeze", "layers": 1}, "cached"),
], ids=["dora", "qlora", "ia3", "adapter", "freeze"])
def test_dpo_trains_with_each_method_against_its_default_reference(tmp_path, method, reference):
    out = run(tmp_path, method["name"], task="preference", method=method, data={"eval_ratio": 0.25},
              train=SHORT)
    train = metrics(out.run_dir)
    assert len(train) == 2 and all(r["loss"] == r["loss"] for r in train)  # two finite steps
    # at the start the policy is its reference: DPO's loss is log 2 on every pair
    assert train[0]["loss"] == pytest.approx(0.6931, abs=2e-3), train[0]
    ev = metrics(out.run_dir, "eval")[-1]
    assert {"pair_accuracy", "margin", "reward_chosen", "reward_rejected"} <= set(ev)
    assert abs(ev["margin"]) > 0  # the trained policy moved away from its reference
    info = json.loads((out.run_dir / "reference.json").read_text()) if reference == "cached" else None
    assert (info or {"kind": "adapters_off"})["kind"] == reference
    assert json.loads((out.run_dir / "final" / "tunelab.json").read_text())["task"] == "preference"


@pytest.mark.parametrize("name", ["prefix", "prompt", "ptuning", "llama_adapter"])
def test_virtual_token_methods_are_refused_in_one_line(tmp_path, name):
    path = config_file(tmp_path, name, task="preference", method={"name": name})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = str(err.value).splitlines()[1:]  # the file, then one line per problem
    assert len(problems) == 1 and f"method {name}" in problems[0] and "Use lora, qlora" in problems[0], problems


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, loss):
    """Killed after step 3 of 6 (checkpoints every 2 steps), then resumed: the same adapter, bit for bit,
    and the same losses (KTO's KL estimate included: it is computed from each step's own rows)."""
    data = {"train": [{"path": str(demo("kto_en_demo.json" if loss == "kto" else "dpo_en_demo.json")), "limit": 24}]}
    sections = dict(task="preference", preference={"loss": loss}, data=data,
                    train={"max_steps": 6, "save_every": 2, "eval_every": 0, "lr": 1e-2, "batch_size": 2,
                           "grad_accum": 2})
    straight = run(tmp_path, "straight", **sections)
    path = config_file(tmp_path, "killed", **sections)
    armed = install(Fault("after_update", 3, "kill"))
    try:
        with pytest.raises(SimulatedKill):
            fine_tune(*load_config(path))
    finally:
        armed.uninstall()
    killed = tmp_path / "runs" / "killed"
    assert not (killed / "final").exists() and (killed / "checkpoints" / "step-000002").is_dir()
    fine_tune(*load_config(path), resume=True)
    a = load_file(str(straight.run_dir / "final" / "adapter_model.safetensors"))
    b = load_file(str(killed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(straight.run_dir)] == [r["loss"] for r in metrics(killed)]


def test_l2sp_and_ewc_penalties_join_the_preference_loss(tmp_path):
    plain = run(tmp_path, "plain", task="preference", train={**SHORT, "eval_every": 0})
    kept = run(tmp_path, "kept", task="preference", train={**SHORT, "eval_every": 0},
               objectives={"l2sp": {"weight": 1e3}, "ewc": {"weight": 1e4, "samples": 2}})
    last = metrics(kept.run_dir)[-1]
    assert last["l2sp"] > 0 and last["ewc"] > 0
    assert (kept.run_dir / "fisher.safetensors").is_file() or list(kept.run_dir.glob("**/fisher*.safetensors"))
    # the penalties pull the adapter back towards its start: a smaller move than without them
    a, b = (load_file(str(r.run_dir / "final" / "adapter_model.safetensors")) for r in (plain, kept))
    assert sum(float(b[k].norm()) for k in b if "lora_B" in k) < sum(float(a[k].norm()) for k in a if "lora_B" in k)


def test_forgetting_is_measured_after_preference_tuning(tmp_path):
    alpaca = shared("instruct", "llamafactory_demo", "alpaca_en_demo.json")
    forgetting = {"general": [str(alpaca)], "general_limit": 6, "task_limit": 6, "batch_size": 8}
    out = run(tmp_path, "forget", task="preference", data={"eval_ratio": 0.25}, train=SHORT,
              eval={"forgetting": forgetting})
    doc = json.loads((out.run_dir / "forgetting.json").read_text())
    by = {m["name"]: m for m in doc["measures"]}
    assert "alpaca_en_demo loss" in by, list(by)
    m = by["alpaca_en_demo loss"]
    assert m["change"] == pytest.approx(m["tuned"]["value"] - m["base"]["value"])


def test_sweep_searches_beta(tmp_path):
    path = config_file(tmp_path, "sw", task="preference", train={**SHORT, "eval_every": 2},
                       data={"eval_ratio": 0.25})
    cfg = yaml.safe_load(path.read_text())
    cfg["sweep"] = {"params": {"preference.beta": {"type": "categorical", "choices": [0.05, 0.5]}},
                    "sampler": "grid", "pruner": "none", "trials": 2}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["sweep", str(path)]) == 0
    rows = list(csv.DictReader((tmp_path / "runs" / "sw-sweep" / "trials.csv").open()))
    assert sorted(float(r["preference.beta"]) for r in rows) == [0.05, 0.5]
    assert all(r["state"] == "COMPLETE" for r in rows)
    values = {float(r["preference.beta"]): float(r["eval_loss"]) for r in rows}
    assert values[0.05] != values[0.5]  # beta reached the loss
