"""The TF-IDF + logistic-regression baseline: scikit-learn's numbers on the run's own training split, CJK
detection, `tunelab eval --baselines` (JSON, examples, the paired test), a bare model with --train, the report."""

from __future__ import annotations

import html
import json
import random
from pathlib import Path

import pytest
import yaml

from eval_fixtures import make_lora_run
from tunelab.errors import UserError
from tunelab.eval.classical import BASELINE, cjk_share, features_for
from tunelab.eval.evaluate import EvalRequest, evaluate

WORDS = {"sport": ["match", "goal", "team", "coach"], "money": ["bank", "stock", "price", "market"],
         "food": ["bread", "soup", "cook", "taste"]}
FILLER = ["the", "a", "today", "new", "big", "old", "report", "says", "city", "people", "about", "more"]
ZH = {"体育": ["比赛", "球队", "进球", "教练"], "财经": ["银行", "股票", "价格", "市场"]}
ZH_FILLER = ["今天", "新的", "城市", "报道", "人们", "关于", "更多", "一个", "我们", "已经"]


def write_rows(path: Path, n: int, seed: int, vocab: dict[str, list[str]] = WORDS, noise: float = 0.25) -> Path:
    """Learnable but noisy rows: a class word among filler words, the label flipped with probability ``noise``."""
    rng = random.Random(seed)
    labels = sorted(vocab)
    rows = []
    for _ in range(n):
        label = rng.choice(labels)
        filler = ZH_FILLER if vocab is ZH else FILLER
        words = [rng.choice(filler) for _ in range(rng.randint(3, 7))] + [rng.choice(vocab[label])]
        rng.shuffle(words)
        joiner = "" if vocab is ZH else " "
        rows.append({"text": joiner.join(words), "label": rng.choice(labels) if rng.random() < noise else label})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def sklearn_reference(train: list[dict], test: list[dict], analyzer: str, ngrams: tuple[int, int]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    vec = TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, sublinear_tf=True)
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(vec.fit_transform([r["text"] for r in train]),
                                                       [r["label"] for r in train])
    pred = clf.predict(vec.transform([r["text"] for r in test]))
    gold = [r["label"] for r in test]
    labels = sorted({r["label"] for r in test})
    return {"accuracy": accuracy_score(gold, pred), "macro_f1": f1_score(gold, pred, labels=labels, average="macro",
                                                                         zero_division=0), "pred": list(pred)}


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_cjk_detection_chooses_character_ngrams():
    zh = ["酒店位置很好，房间也很干净", "早餐一般，服务态度不错"]
    assert cjk_share(zh) == 1.0 and features_for(zh)["analyzer"] == "char"
    assert features_for(zh)["ngram_range"] == (1, 3)
    en = ["the room was clean and quiet", "breakfast was poor"]
    assert cjk_share(en) == 0.0 and features_for(en)["analyzer"] == "word" and features_for(en)["ngram_range"] == (1, 2)
    # a few Chinese words in English text do not make it Chinese; digits and punctuation are not letters
    assert features_for(["we stayed at the 北京 hotel for three nights, 2024!"])["analyzer"] == "word"
    assert features_for(["2024年房间很大 OK"])["analyzer"] == "char"


def test_baseline_equals_sklearn_on_the_runs_own_training_split(tmp_path):
    train_file = write_rows(tmp_path / "train.jsonl", 120, 0)
    test_file = write_rows(tmp_path / "test.jsonl", 60, 1)
    run = make_lora_run(tmp_path / "runs" / "r", train_file)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["eval_ratio"] = 0.25  # the run held a quarter of its training file out: the baseline must too
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    [doc] = evaluate(run, EvalRequest(data=[str(test_file)], tfidf=True, modes=("constrained",)))
    rows = read(train_file)
    order = list(range(len(rows)))
    random.Random(cfg["train"]["seed"]).shuffle(order)  # data.eval_ratio's seeded hold-out, by hand
    held = set(order[: round(0.25 * len(rows))])
    split = [r for i, r in enumerate(rows) if i not in held]
    ref = sklearn_reference(split, read(test_file), "word", (1, 2))

    system = doc["systems"][BASELINE]
    m = system["metrics"]
    assert m["baseline"]["train_rows"] == len(split) == 90 and m["baseline"]["features"] == "word 1-2-grams"
    assert m["tfidf"]["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert m["tfidf"]["macro_f1"] == pytest.approx(ref["macro_f1"], abs=1e-12)
    assert system["headline"] == {"accuracy": m["tfidf"]["accuracy"], "macro_f1": m["tfidf"]["macro_f1"]}
    assert 0.4 < ref["accuracy"] < 1.0  # learnable, not trivial

    # written: the JSON, one example row per test row with its prediction and 0/1 score, the paired test
    saved = json.loads((run / "eval" / "test.json").read_text())
    assert saved["systems"][BASELINE]["metrics"]["tfidf"]["accuracy"] == m["tfidf"]["accuracy"]
    examples = [x for x in read(run / "eval" / "test.examples.jsonl") if x["system"] == BASELINE]
    assert [x["pred"] for x in examples] == ref["pred"]
    assert all(x["score"] == float(x["pred"] == x["reference"]) for x in examples)
    versus = saved["versus_baseline"]
    tuned_acc = doc["systems"]["tuned"]["headline"]["accuracy"]
    assert versus["test"] == "mcnemar-exact" and versus["n"] == 60
    assert versus["difference"] == pytest.approx(tuned_acc - m["tfidf"]["accuracy"], abs=1e-12)
    assert versus["beats_baseline"] == (tuned_acc > m["tfidf"]["accuracy"])


def test_chinese_data_gets_character_ngrams_and_the_report_says_who_wins(tmp_path):
    from tunelab.report.html import write_report
    from tunelab.rundocs import baseline_verdict

    train_file = write_rows(tmp_path / "train.jsonl", 80, 2, ZH)
    test_file = write_rows(tmp_path / "test.jsonl", 30, 3, ZH)
    run = make_lora_run(tmp_path / "runs" / "zh", train_file)
    [doc] = evaluate(run, EvalRequest(data=[str(test_file)], tfidf=True, modes=("constrained",)))
    m = doc["systems"][BASELINE]["metrics"]
    ref = sklearn_reference(read(train_file), read(test_file), "char", (1, 3))
    assert m["baseline"]["features"] == "char 1-3-grams" and m["baseline"]["cjk_share"] == 1.0
    assert m["tfidf"]["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)

    html_path, md_path = write_report([run])
    page = html_path.read_text(encoding="utf-8")
    sentence = baseline_verdict(doc["versus_baseline"])
    assert BASELINE in page and html.escape(sentence, quote=True) in page
    assert ("does NOT beat" in sentence or "does not beat" in sentence) == (not doc["versus_baseline"]["beats_baseline"])
    assert "accuracy points" in sentence and "McNemar" in sentence
    assert sentence in md_path.read_text(encoding="utf-8")


def test_bare_model_needs_train_for_the_baseline(tmp_path, capsys):
    from tunelab.cli import main

    train_file = write_rows(tmp_path / "train.jsonl", 60, 4)
    test_file = write_rows(tmp_path / "test.jsonl", 20, 5)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="not a run directory.*--train FILE"):
        evaluate("tiny-random-llama", EvalRequest(data=[str(test_file)], baselines=True), out_dir=out)
    with pytest.raises(UserError, match="Add --baselines"):
        evaluate("tiny-random-llama", EvalRequest(data=[str(test_file)], train=str(train_file)), out_dir=out)
    assert main(["eval", "tiny-random-llama", "--data", str(test_file), "--baselines", "--train", str(train_file),
                 "--mode", "constrained", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert BASELINE in text and "TF-IDF + logistic-regression baseline" in text
    doc = json.loads((out / "test.json").read_text())
    assert list(doc["systems"]) == ["model", BASELINE] and doc["versus_baseline"]["system"] == "model"
    ref = sklearn_reference(read(train_file), read(test_file), "word", (1, 2))
    assert doc["systems"][BASELINE]["headline"]["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert doc["systems"][BASELINE]["metrics"]["baseline"]["train_source"] == str(train_file)


def test_a_run_whose_training_file_is_gone_skips_the_baseline_with_the_fix(tmp_path, capsys):
    from rich.console import Console

    train_file = write_rows(tmp_path / "train.jsonl", 30, 6)
    test_file = write_rows(tmp_path / "test.jsonl", 12, 7)
    run = make_lora_run(tmp_path / "runs" / "gone", train_file)
    train_file.unlink()
    console = Console(width=300)
    [doc] = evaluate(run, EvalRequest(data=[str(test_file)], tfidf=True, modes=("constrained",)), console=console)
    assert BASELINE not in doc["systems"] and "versus_baseline" not in doc
    out = capsys.readouterr().out
    assert f"{BASELINE} skipped" in out and "Pass --train FILE" in out


def test_the_eval_section_after_training_scores_the_baseline_and_the_report_says_it(tmp_path):
    """`eval: {baselines: true}` on a head run: after training, tfidf-lr on the eval file with the paired test,
    fitted on the run's training split (data.eval_ratio held a fifth out), and the report's sentence."""
    from test_classification import cls_config, run, tiny_bert, write_task
    from tunelab.rundocs import baseline_verdict

    cfg = cls_config(tmp_path, "head", {"name": "head", "dropout": 0.0}, model=str(tiny_bert(tmp_path / "bert")),
                     train={"epochs": 2, "eval_every": 0}, n_train=60)
    eval_file = str(write_task(tmp_path / "heldout.jsonl", 30, 5))
    cfg["data"] = {**cfg["data"], "eval": [], "eval_ratio": 0.2}
    cfg["eval"] = {"data": [eval_file], "baselines": True, "report": True}
    out = run(tmp_path, cfg)
    doc = json.loads((out.run_dir / "eval" / "heldout.json").read_text())
    assert set(doc["systems"]) == {"tuned", BASELINE}  # an encoder base cannot be prompted: no base rows
    assert doc["systems"][BASELINE]["metrics"]["baseline"]["train_rows"] == 48  # 60 rows, a fifth held out
    assert doc["versus_baseline"]["n"] == doc["systems"]["tuned"]["metrics"]["head"]["n"]
    page = (out.run_dir / "report.html").read_text(encoding="utf-8")
    assert html.escape(baseline_verdict(doc["versus_baseline"]), quote=True) in page
