"""Sequence classification: pooling, class weights, the head / full / LoRA methods, save -> reload, an encoder.

Everything runs on tiny-random-llama or a tiny random BERT (built here from a BertConfig with the
all-MiniLM-L6-v2 tokenizer), fp32 on CPU, in seconds.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import shared
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.train.recipe import fine_tune

COLOURS = ["red", "blue", "green", "yellow"]
ANIMALS = ["cat", "dog", "horse", "sheep"]
FILLER = ["the", "a", "one", "then", "we", "saw", "near", "old", "house", "river", "today", "very"]


def write_task(path: Path, n: int, seed: int, extra: list[dict] | None = None) -> Path:
    """A learnable two-class task: the last word is a colour or an animal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["colour", "animal"])
        word = rng.choice(COLOURS if label == "colour" else ANIMALS)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))] + [word]
        rows.append({"text": " ".join(words), "label_text": label})
    rows += extra or []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cls_config(tmp_path: Path, name: str, method: dict, *, model: str = "tiny-random-llama", train: dict | None = None,
               classification: dict | None = None, n_train: int = 96) -> dict:
    train_file = write_task(tmp_path / "train.jsonl", n_train, 0)
    eval_file = write_task(tmp_path / "eval.jsonl", 40, 1, extra=[{"text": "a purple thing", "label_text": "plant"}])
    cfg = {
        "task": "classification",
        "run": {"name": name, "output_dir": str(tmp_path / "runs")},
        "model": {"path": model},
        "data": {"train": [{"path": str(train_file)}], "eval": [{"path": str(eval_file)}], "max_length": 32},
        "method": method,
        "train": {"lr": 1e-2, "batch_size": 8, "grad_accum": 1, "epochs": 4, "precision": "fp32", "seed": 0,
                  "eval_every": 6, "schedule": "constant", "max_grad_norm": None, **(train or {})},
    }
    if classification:
        cfg["classification"] = classification
    return cfg


def run(tmp_path: Path, cfg: dict):
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config, sources = load_config(path)
    return fine_tune(config, sources)


def evals(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"]


def batch_logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        from tunelab.models.classifier import unwrap

        return unwrap(model)(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


# --------------------------------------------------------------------------- units


def test_last_token_pooling_under_left_and_right_padding():
    from tunelab.models.classifier import build_classifier, pool

    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), hidden[[0, 1], [2, 4]])
    assert torch.equal(pool(hidden, left, "last"), hidden[[0, 1], [4, 4]])
    assert torch.equal(pool(hidden, left, "cls"), hidden[[0, 1], [2, 0]])
    assert torch.allclose(pool(hidden, right, "mean")[0], hidden[0, :3].mean(0))

    # the whole classifier: the same row left- or right-padded gives the same logits
    model = build_classifier("tiny-random-llama", ["a", "b", "c"]).eval()
    ids = [5, 17, 923, 44]
    pad = 2
    r_ids = torch.tensor([ids + [pad, pad], ids + [8, 9]])
    r_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    l_ids = torch.tensor([[pad, pad] + ids, ids + [8, 9]])
    l_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        alone = model(torch.tensor([ids]), torch.ones(1, 4, dtype=torch.long))
        right_out, left_out = model(r_ids, r_mask), model(l_ids, l_mask)
    assert torch.allclose(right_out[0], alone[0], atol=1e-5)
    assert torch.allclose(left_out[0], alone[0], atol=1e-5)
    assert torch.allclose(right_out[1], left_out[1], atol=1e-6)


def test_class_weights_change_the_loss_exactly_as_by_hand():
    from tunelab.data.tasks import class_weights
    from tunelab.objectives.classification import ClassificationLoss

    class Fixed(torch.nn.Module):  # logits chosen by hand, through the real SequenceClassifier interface
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask=None):
            return self.logits

    import tunelab.models.classifier as clf

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 1.0]])
    y = [0, 2, 1]
    labels = torch.full((3, 4), -100)
    labels[:, -1] = torch.tensor(y)
    ids = torch.zeros(3, 4, dtype=torch.long)
    weights = class_weights("balanced", ["x", "y", "z"], {"x": 6, "y": 3, "z": 1})
    assert weights == pytest.approx([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    original = clf.unwrap
    clf.unwrap = lambda m: m
    try:
        out = ClassificationLoss(Fixed(logits), ["x", "y", "z"])(ids, labels)
        plain, n = out.total, out.count
        weighted = ClassificationLoss(Fixed(logits), ["x", "y", "z"], weights)(ids, labels).total
    finally:
        clf.unwrap = original
    logp = torch.log_softmax(logits, dim=-1)
    by_hand = [-logp[i, t].item() for i, t in enumerate(y)]
    assert n.item() == 3
    assert plain.item() == pytest.approx(sum(by_hand), rel=1e-6)
    assert weighted.item() == pytest.approx(sum(weights[t] * c for t, c in zip(y, by_hand, strict=True)), rel=1e-6)
    assert class_weights({"z": 4.0}, ["x", "y", "z"], {}) == [1.0, 1.0, 4.0]


def test_config_rules_for_tasks(tmp_path):
    cfg = cls_config(tmp_path, "bad", {"name": "head"})
    cfg["task"] = "sft"
    cfg["data"]["packing"] = True
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "method.name=head" in str(err.value)
    cfg["task"] = "classification"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.packing with task: classification" in str(err.value)


# --------------------------------------------------------------------------- end to end


def test_head_mlp_learns_only_head_changes_and_reloads(tmp_path):
    from tunelab.methods.reload import load_classifier
    from tunelab.models.classifier import build_classifier

    cfg = cls_config(tmp_path, "head", {"name": "head", "layers": 1, "width": 32, "activation": "relu",
                                        "dropout": 0.0}, train={"epochs": 3, "eval_every": 8}, n_train=64)
    out = run(tmp_path, cfg)
    run_dir = out.run_dir
    accs = [e["accuracy"] for e in evals(run_dir)]
    assert len(accs) >= 2 and all("macro_f1" in e for e in evals(run_dir))
    assert accs[-1] >= 0.9 and accs[-1] > accs[0] or accs[0] < 0.75 <= accs[-1], accs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_metrics"]["accuracy"] == accs[-1]
    # a frozen backbone: its features were computed once and the head trained on them (method.cache_features)
    assert json.loads((run_dir / "env.json").read_text())["features"]["rows"] > 0

    # the unknown eval label is a reject with its reason, not a silent drop
    rejects = [json.loads(line) for line in (run_dir / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["unknown_label"] and "'plant'" in rejects[0]["detail"]
    data = json.loads((run_dir / "data.json").read_text())
    assert data["labels"] == {"animal": data["labels"]["animal"], "colour": data["labels"]["colour"]}

    # only the head changed: the backbone equals a fresh load, bit for bit
    fresh = build_classifier("tiny-random-llama", ["animal", "colour"]).backbone.state_dict()
    for name, p in out.model.backbone.named_parameters():
        assert not p.requires_grad and torch.equal(p, fresh[name]), name
    assert all(p.requires_grad for p in out.model.score.parameters())
    assert len(out.model.score.hidden) == 3  # dropout, linear(64 -> 32), relu

    # labels in the saved config; save -> reload gives the same logits
    final = run_dir / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["id2label"] == {"0": "animal", "1": "colour"} and config["label2id"] == {"animal": 0, "colour": 1}
    reloaded = load_classifier(final)
    texts = ["we saw a red", "the old dog", "then horse"]
    assert torch.allclose(batch_logits(out.model.eval(), out.tokenizer, texts),
                          batch_logits(reloaded, out.tokenizer, texts), atol=1e-6)
    from tunelab.models.classifier import predict

    assert [p["label"] for p in predict(reloaded, out.tokenizer, texts)] == ["colour", "animal", "animal"]


def test_lora_trains_head_through_modules_to_save_and_reloads(tmp_path):
    from tunelab.methods.reload import load_classifier
    from tunelab.models.classifier import build_classifier

    cfg = cls_config(tmp_path, "lora", {"name": "lora", "r": 4, "alpha": 8}, train={"lr": 5e-3, "epochs": 2, "eval_every": 0}, n_train=64)
    out = run(tmp_path, cfg)
    trained = {n for n, p in out.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained)
    assert {n for n in trained if "score" in n} == {"base_model.model.score.modules_to_save.default.out.weight",
                                                    "base_model.model.score.modules_to_save.default.out.bias"}
    assert all("lora_" in n or "score" in n for n in trained), trained
    fresh = build_classifier("tiny-random-llama", ["animal", "colour"]).backbone.state_dict()
    for name, p in out.model.named_parameters():
        if name.startswith("base_model.model.backbone.") and "lora_" not in name:
            key = name.removeprefix("base_model.model.backbone.").replace(".base_layer", "")
            assert torch.equal(p, fresh[key]), name
    final = out.run_dir / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "classifier.json").is_file()
    from safetensors.torch import load_file

    assert any("score" in k for k in load_file(str(final / "adapter_model.safetensors")))
    reloaded = load_classifier(final)
    texts = ["we saw a red", "the old dog today sheep"]
    assert torch.allclose(batch_logits(out.model.eval(), out.tokenizer, texts),
                          batch_logits(reloaded, out.tokenizer, texts), atol=1e-5)
    assert evals(out.run_dir)[-1]["accuracy"] > 0.5

    # the shipping side (predict, serve's /v1/classify) loads the same run and gives the same probabilities
    from tunelab.ship.inference import classify, load_for_inference

    loaded = load_for_inference(out.run_dir)
    assert loaded.kind == "classification" and sorted(loaded.id2label.values()) == ["animal", "colour"]
    got = classify(loaded, texts)
    expected = torch.softmax(batch_logits(reloaded, out.tokenizer, texts).float(), dim=-1)
    for row, probs in zip(got, expected.tolist(), strict=True):
        assert row["probs"] == pytest.approx({loaded.id2label[i]: p for i, p in enumerate(probs)}, abs=1e-5)


def test_batch_8_equals_batch_2_times_accumulation_4_full_weighted(tmp_path):
    common = dict(classification={"class_weights": "balanced"}, n_train=32)
    a = run(tmp_path, cls_config(tmp_path, "b8", {"name": "full"}, train={"batch_size": 8, "grad_accum": 1,
                                                                         "epochs": 1, "lr": 1e-3}, **common))
    b = run(tmp_path, cls_config(tmp_path, "b2x4", {"name": "full"}, train={"batch_size": 2, "grad_accum": 4,
                                                                           "epochs": 1, "lr": 1e-3}, **common))

    def losses(r):
        return [json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["kind"] == "train"]

    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 4
    assert la == pytest.approx(lb, abs=1e-5)
    for (n1, p1), (_, p2) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.allclose(p1, p2, atol=1e-5), n1


def tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) saved with the all-MiniLM-L6-v2 tokenizer."""
    from transformers import BertConfig, BertModel

    from tunelab.models.registry import minilm_folder

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(minilm_folder() / name, folder / name)
    return folder


def test_encoder_head_on_tiny_bert_mean_pooling(tmp_path):
    from tunelab.methods.reload import load_classifier

    bert = tiny_bert(tmp_path / "bert")
    cfg = cls_config(tmp_path, "bert", {"name": "head", "unfreeze_top": 1, "dropout": 0.0}, model=str(bert),
                     train={"lr": 1e-2, "epochs": 5, "eval_every": 20}, n_train=64)
    out = run(tmp_path, cfg)
    assert out.model.spec.pooling == "mean"
    assert "features" not in json.loads((out.run_dir / "env.json").read_text())  # a trained block: no feature cache
    blocks = out.model.backbone.encoder.layer
    assert all(p.requires_grad for p in blocks[1].parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert not out.model.backbone.embeddings.word_embeddings.weight.requires_grad
    accs = [e["accuracy"] for e in evals(out.run_dir)]
    assert accs[-1] >= 0.85 and accs[-1] > accs[0], accs
    reloaded = load_classifier(out.run_dir / "final")
    texts = ["we saw a red", "the old dog"]
    assert torch.allclose(batch_logits(out.model.eval(), out.tokenizer, texts),
                          batch_logits(reloaded, out.tokenizer, texts), atol=1e-6)


# --------------------------------------------------------------------------- real data


@pytest.mark.real_model
def test_minilm_head_on_sst2_slice(tmp_path):
    sst2 = shared("classification", "sst2")
    cfg = {
        "task": "classification",
        "run": {"name": "minilm", "output_dir": str(tmp_path / "runs")},
        "model": {"path": "all-minilm-l6-v2"},
        "data": {"train": [{"path": str(sst2 / "train.jsonl"), "limit": 128}],
                 "eval": [{"path": str(sst2 / "test.jsonl"), "limit": 128}], "max_length": 64},
        "method": {"name": "head", "dropout": 0.0},
        "train": {"lr": 3e-2, "batch_size": 32, "epochs": 2, "precision": "fp32", "schedule": "constant",
                  "seed": 0},
    }
    out = run(tmp_path, cfg)
    metrics = out.summary["eval_metrics"]
    assert out.model.spec.labels == ["negative", "positive"] and out.model.spec.pooling == "mean"
    assert metrics["n"] == 128 and metrics["accuracy"] > 0.65, metrics  # the majority class is ~50%
    assert (out.run_dir / "final" / "head.safetensors").stat().st_size < 10_000  # the frozen encoder is not copied
