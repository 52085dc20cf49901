"""A run directory names its base model portably: moved (or copied to another machine), it still loads."""

from __future__ import annotations

import json
import os
import shutil

import torch

from ship_fixtures import ship_runs  # noqa: F401 - the session fixture
from tunelab.ship.inference import load_for_inference

IDS = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 504, 3287, 28]])


def test_adapter_config_names_the_alias_and_tunelab_json_keeps_the_local_path(ship_runs):  # noqa: F811
    from tunelab.models.registry import resolve_alias

    final = ship_runs["lora"] / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    info = json.loads((final / "tunelab.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-random-llama" == info["base_model"]
    assert info["base_model_path"] == str(resolve_alias("tiny-random-llama"))


def test_a_moved_run_directory_loads_with_the_same_outputs(ship_runs, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.models.registry import resolve_alias

    run = ship_runs["lora"]
    with torch.no_grad():
        want = load_for_inference(run).model(input_ids=IDS).logits
    moved = tmp_path / "elsewhere" / "my-run"
    shutil.copytree(run, moved)
    hidden = run.with_name(f".{run.name}.away")
    os.rename(run, hidden)  # the original place is gone while the moved copy loads
    try:
        with torch.no_grad():
            got = load_for_inference(moved).model(input_ids=IDS).logits
        # plain PEFT, as vLLM / TGI read it: the base named in adapter_config.json, resolved on "this machine"
        base_name = json.loads((moved / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(resolve_alias(base_name))
        with torch.no_grad():
            peft_logits = PeftModel.from_pretrained(base, moved / "final").eval()(input_ids=IDS).logits
    finally:
        os.rename(hidden, run)
    assert torch.equal(got, want) and (peft_logits - want).abs().max() < 1e-5


def test_portable_name_of_a_hub_cache_folder_is_its_hub_id(tmp_path):
    from tunelab.models.load import portable_name

    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert portable_name(str(snapshot)) == ("HuggingFaceTB/SmolLM2-135M-Instruct", str(snapshot.resolve()))
    own = tmp_path / "mine"
    own.mkdir()
    (own / "config.json").write_text("{}")
    assert portable_name(str(own)) == (str(own.resolve()), str(own.resolve()))
    assert portable_name("org/some-model") == ("org/some-model", "org/some-model")
