"""Cached features of a frozen backbone (``head``, ``unfreeze_top: 0``): equal to a fresh backbone pass, keyed by
model and data, a head trained on them equal to one trained with the backbone in the loop, a second run that never
runs the backbone, and the scikit-learn logistic-regression head.

A tiny random BERT with dropout in the backbone (a frozen backbone runs in inference mode either way) and the
default head dropout (the same random stream with and without the cache), fp32 on CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from test_classification import cls_config, evals, run, write_task


def dropout_bert(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with dropout 0.1, saved with the all-MiniLM-L6-v2 tokenizer."""
    from transformers import BertConfig, BertModel

    from tunelab.models.registry import minilm_folder

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(minilm_folder() / name, folder / name)
    return folder


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """The feature cache in a fresh folder; the model aliases stay where the session keeps them."""
    from tunelab.models import features

    folder = tmp_path / "feature-cache"
    monkeypatch.setattr(features, "cache_dir", lambda: folder)
    return folder


def train_losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]


def test_cached_features_equal_a_fresh_backbone_pass_and_changes_invalidate(tmp_path, isolated_cache):
    from tunelab.data.batching import Row
    from tunelab.methods import head
    from tunelab.models.classifier import build_classifier
    from tunelab.models.features import attach
    from tunelab.models.load import load_tokenizer

    bert = dropout_bert(tmp_path / "bert")
    tok = load_tokenizer(str(bert))
    texts = [json.loads(x)["text"] for x in write_task(tmp_path / "t.jsonl", 24, 0).read_text().splitlines()]
    rows = [Row(tuple(ids), (-100,) * len(ids), (len(ids),)) for ids in tok(texts)["input_ids"]]
    settings = {"pooling": "mean", "max_length": 32, "precision": "no"}

    def fresh():
        model = build_classifier(str(bert), ["a", "b"])
        return head.apply(model, head.Config(name="head"))

    model = fresh()
    info = attach(model, rows + rows[:3], settings=settings, pad_id=tok.pad_token_id, batch_size=5)
    assert not info["from_cache"] and info["stored"] and info["rows"] == len(set(r.input_ids for r in rows))
    model.train()  # a frozen backbone stays in inference mode: no dropout in the features
    assert not model.backbone.training and model.score.training
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r.input_ids])
            direct = model.pooled(ids, torch.ones_like(ids))
            torch.testing.assert_close(model.features.lookup(ids, torch.ones_like(ids)), direct, atol=1e-5, rtol=0)
    assert model.features.misses == 0

    # the same model and rows: read back, equal; other rows or changed weights: a new entry
    again = fresh()
    assert attach(again, rows[:-2], settings=settings, pad_id=tok.pad_token_id)["key"] != info["key"]  # fewer rows
    same = attach(again, rows + rows[:3], settings=settings, pad_id=tok.pad_token_id)
    assert same["from_cache"] and same["key"] == info["key"]
    torch.testing.assert_close(again.features.values, model.features.values, atol=0, rtol=0)
    with torch.no_grad():
        again.backbone.encoder.layer[0].output.dense.weight[0, 0] += 1e-3
    changed = attach(again, rows + rows[:3], settings=settings, pad_id=tok.pad_token_id)
    assert not changed["from_cache"] and changed["key"] != info["key"]
    other = attach(fresh(), rows + rows[:3], settings={**settings, "pooling": "cls"}, pad_id=tok.pad_token_id)
    assert other["key"] != info["key"]

    # a corrupt entry is computed again, not trusted
    (isolated_cache / info["key"] / "features.npy").write_bytes(b"not numpy")
    assert not attach(fresh(), rows + rows[:3], settings=settings, pad_id=tok.pad_token_id)["from_cache"]

    # a row the table does not hold goes through the backbone
    unknown = torch.tensor([[101, 2023, 2003, 102]])
    assert model(unknown).shape == (1, 2) and model.features.misses == 1


def test_head_on_cached_features_equals_the_backbone_in_the_loop_and_a_second_run_skips_the_backbone(
        tmp_path, isolated_cache, monkeypatch):
    from transformers import BertModel

    bert = str(dropout_bert(tmp_path / "bert"))
    method = {"name": "head", "dropout": 0.1}
    common = dict(model=bert, train={"lr": 1e-2, "epochs": 3, "eval_every": 8}, n_train=48)
    plain = run(tmp_path, cls_config(tmp_path, "plain", {**method, "cache_features": False}, **common))
    cached = run(tmp_path, cls_config(tmp_path, "cached", method, **common))

    env = json.loads((cached.run_dir / "env.json").read_text())
    assert env["features"]["from_cache"] is False and env["features"]["rows"] > 0
    assert "features" not in json.loads((plain.run_dir / "env.json").read_text())
    assert cached.model.features.hits > 0 and cached.model.features.misses == 0
    assert train_losses(cached.run_dir) == pytest.approx(train_losses(plain.run_dir), abs=1e-5)
    ep, ec = evals(plain.run_dir), evals(cached.run_dir)
    assert [e["eval_loss"] for e in ec] == pytest.approx([e["eval_loss"] for e in ep], abs=1e-5)
    assert [e["accuracy"] for e in ec] == [e["accuracy"] for e in ep]
    for (name, a), (_, b) in zip(plain.model.score.named_parameters(), cached.model.score.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)

    # the same config again: the features come from the cache and the backbone never runs
    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although its features were cached")

    monkeypatch.setattr(BertModel, "forward", no_backbone)
    again = run(tmp_path, cls_config(tmp_path, "again", method, **common))
    assert json.loads((again.run_dir / "env.json").read_text())["features"]["from_cache"] is True
    assert train_losses(again.run_dir) == pytest.approx(train_losses(cached.run_dir), abs=1e-6)


def test_sklearn_logistic_regression_head(tmp_path, isolated_cache):
    from sklearn.linear_model import LogisticRegression

    from tunelab.config import load_config
    from tunelab.errors import ConfigError
    from tunelab.methods.reload import load_classifier
    from tunelab.models.load import load_tokenizer
    from tunelab.ship.inference import classify, load_for_inference

    bert = str(dropout_bert(tmp_path / "bert"))
    cfg = cls_config(tmp_path, "lr", {"name": "head", "fit": "sklearn", "sklearn_c": 10.0}, model=bert, n_train=64)
    out = run(tmp_path, cfg)
    summary = json.loads((out.run_dir / "summary.json").read_text())
    assert summary["step"] == 0 and summary["total_steps"] == 0
    assert "logistic regression" in json.loads((out.run_dir / "env.json").read_text())["fit"]
    assert 0.0 <= summary["eval_metrics"]["accuracy"] <= 1.0 and summary["eval_metrics"]["n"] == 40

    # the head is scikit-learn's regression: the same predictions and probabilities on the training features
    tok = load_tokenizer(bert)
    rows = [json.loads(x) for x in Path(cfg["data"]["train"][0]["path"]).read_text().splitlines()]
    labels = out.model.spec.labels
    with torch.no_grad():
        feats = torch.cat([out.model.pooled(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
                           for ids in tok([r["text"] for r in rows])["input_ids"]]).double().numpy()
    y = [labels.index(r["label_text"]) for r in rows]
    ref = LogisticRegression(C=10.0, max_iter=1000).fit(feats, y)
    with torch.no_grad():  # eval mode: the head's dropout off
        probs = out.model.eval().score(torch.tensor(feats, dtype=torch.float32)).softmax(-1).double().numpy()
    assert (probs.argmax(1) == ref.predict(feats)).all()
    assert probs == pytest.approx(ref.predict_proba(feats), abs=1e-4)

    # saved like any head: reloads, predicts, serves
    reloaded = load_classifier(out.run_dir / "final")
    torch.testing.assert_close(reloaded.score.out.weight, out.model.score.out.weight)
    got = classify(load_for_inference(out.run_dir), [r["text"] for r in rows[:4]])
    assert [g["label"] for g in got] == [labels[i] for i in ref.predict(feats[:4])]

    bad = cls_config(tmp_path, "bad", {"name": "head", "fit": "sklearn", "layers": 1}, model=bert)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="method.fit=sklearn fits a logistic regression"):
        load_config(path)
