"""Tiny runs for the ship tests (export, predict, serve, chat), built once per test session.

* ``lora``: a 2-step LoRA run of tiny-random-llama (``fine_tune`` with ``tiny_config``);
* ``lora_b``: a second adapter on the same base (run ``lora``'s adapter with B scaled by -3),
  so two adapters over one base answer differently;
* ``cls``: a sequence-classification run saved as a plain ``LlamaForSequenceClassification``
  (3 labels, ``id2label`` in its config, ``tunelab.json`` says ``task: classification``);
* ``cls_lora``: a PEFT LoRA (``SEQ_CLS``, head in ``modules_to_save``) classification run on
  tiny-random-llama, labels in ``tunelab.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SHARED_DATA, tiny_config

LABELS = {0: "billing", 1: "outage", 2: "other"}
_CACHE: dict[str, dict[str, Path]] = {}


def _alpaca() -> Path:
    path = SHARED_DATA / "instruct" / "llamafactory_demo" / "alpaca_en_demo.json"
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def _train_lora(root: Path) -> Path:
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    cfg = tiny_config(root, _alpaca(), train={"max_steps": 2, "lr": 5e-2, "batch_size": 2, "grad_accum": 1},
                      data={"train": [{"path": str(_alpaca()), "limit": 16}], "max_length": 128})
    cfg["run"]["name"] = "lora"
    path = root / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config, sources = load_config(path)
    return fine_tune(config, sources).run_dir


def _second_adapter(run: Path, dest: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(run / "final", dest)
    weights = dest / "adapter_model.safetensors"
    tensors = {k: (v * -3 if "lora_B" in k else v) for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    info = json.loads((dest / "tunelab.json").read_text())
    (dest / "tunelab.json").write_text(json.dumps({**info, "run": "lora_b"}))
    return dest


def _classifiers(root: Path) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from tunelab.models.registry import resolve_alias

    base = resolve_alias("tiny-random-llama")
    tok = AutoTokenizer.from_pretrained(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForSequenceClassification.from_pretrained(
            base, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
        torch.nn.init.normal_(model.score.weight, std=0.5)
        plain = root / "cls" / "final"
        model.save_pretrained(plain)
        tok.save_pretrained(plain)
        (root / "cls" / "config.yaml").write_text("run: {name: cls}\n")
        (plain / "tunelab.json").write_text(json.dumps(
            {"base_model": "tiny-random-llama", "method": "full", "run": "cls", "task": "classification"}))

        fresh = LlamaForSequenceClassification.from_pretrained(base, num_labels=3)
        peft = get_peft_model(fresh, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="SEQ_CLS"))
        for name, p in peft.named_parameters():
            if "lora_B" in name or "score" in name:
                torch.nn.init.normal_(p, std=0.3)
        adapter = root / "cls_lora" / "final"
        peft.save_pretrained(adapter)
        tok.save_pretrained(adapter)
        (root / "cls_lora" / "config.yaml").write_text("run: {name: cls_lora}\n")
        (adapter / "tunelab.json").write_text(json.dumps(
            {"base_model": "tiny-random-llama", "method": "lora", "run": "cls_lora", "task": "classification",
             "labels": [LABELS[i] for i in range(3)]}))
    return root / "cls", root / "cls_lora"


@pytest.fixture(scope="session")
def ship_runs(tmp_path_factory) -> dict[str, Path]:
    """The runs above (built on first use, then shared by every ship test module)."""
    if "runs" not in _CACHE:
        root = tmp_path_factory.mktemp("ship")
        lora = _train_lora(root)
        cls, cls_lora = _classifiers(root / "runs")
        _CACHE["runs"] = {"lora": lora, "lora_b": _second_adapter(lora, root / "lora_b"), "cls": cls,
                          "cls_lora": cls_lora}
    return _CACHE["runs"]
