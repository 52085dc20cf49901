"""The synthetic policy-recommendation demo data: rule, noise, balance, splits, writing."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tunelab.demo import policy
from tunelab.demo.policy import CATEGORIES, LABELS, TITLES, generate, recommend, write_demo_data
from tunelab.errors import UserError

DEFAULTS = {
    "manufacturing": "Green",
    "software": "R&D subsidy",
    "retail": "Financing",
    "agriculture": "Tax relief",
    "logistics": "Export",
    "biotech": "Talent",
}
COASTAL = {"guangdong", "zhejiang", "jiangsu", "shanghai"}
NAME = {"tax": "Tax relief", "rd": "R&D subsidy", "talent": "Talent", "export": "Export"}
NAME |= {"green": "Green", "finance": "Financing"}


def reference_rule(industry: str, size: str, region: str, clicks: list[str]) -> str:
    """An independent re-implementation of the documented rule (clicks newest first)."""
    if size == "micro" and industry == "agriculture":
        return "Tax relief"
    if region in COASTAL and industry in ("manufacturing", "retail") and "export" in clicks:
        return "Export"
    names = [NAME[c] for c in clicks]
    if size == "large":
        names = [x for x in names if x != "Financing"]
        if not names:
            return "Tax relief" if DEFAULTS[industry] == "Financing" else DEFAULTS[industry]
    best_count = max(names.count(x) for x in names)
    tied = [x for x in names if names.count(x) == best_count]  # newest first
    return DEFAULTS[industry] if DEFAULTS[industry] in tied else tied[0]


# (industry, size, region, clicks newest first, expected label, clause exercised) -- by hand.
CASES = [
    # clause 1: micro farm -> Tax relief even though Green was clicked most
    ("agriculture", "micro", "henan", ["green", "green", "rd"], "Tax relief", "micro_farm"),
    # clause 1 beats clause 3/4 for a micro farm with only Financing clicks
    ("agriculture", "micro", "zhejiang", ["finance", "finance", "finance"], "Tax relief", "micro_farm"),
    # a small farm is not covered by clause 1: most clicked
    ("agriculture", "small", "henan", ["green", "green", "rd"], "Green", "most_clicked"),
    # clause 2: coastal retail with one Export click -> Export despite two Financing clicks
    ("retail", "small", "zhejiang", ["finance", "export", "finance"], "Export", "coastal_export"),
    # clause 2 does not apply inland: most clicked
    ("retail", "small", "sichuan", ["finance", "export", "finance"], "Financing", "most_clicked"),
    # clause 2 does not apply to software even on the coast
    ("software", "medium", "shanghai", ["talent", "export", "talent"], "Talent", "most_clicked"),
    # clause 2 applies to a large manufacturer too (before clause 3)
    ("manufacturing", "large", "jiangsu", ["finance", "finance", "export", "rd"], "Export", "coastal_export"),
    # clause 3: large firm, Financing most clicked -> next best (Talent 2 vs Green 1)
    (
        "logistics",
        "large",
        "beijing",
        ["finance", "talent", "finance", "talent", "finance", "green"],
        "Talent",
        "large_no_financing",
    ),
    # clause 3: large firm with only Financing clicks -> industry default
    ("software", "large", "beijing", ["finance", "finance", "finance"], "R&D subsidy", "large_fallback"),
    # clause 3: large retail with only Financing clicks -> Tax relief
    (
        "retail",
        "large",
        "henan",
        ["finance", "finance", "finance", "finance"],
        "Tax relief",
        "large_fallback",
    ),
    # clause 3 with a tie among the rest broken by the industry default (manufacturing -> Green)
    ("manufacturing", "large", "henan", ["finance", "rd", "finance", "green"], "Green", "large_no_financing"),
    # clause 4 tie broken by industry default, although Talent is newer
    ("software", "medium", "sichuan", ["talent", "rd", "talent", "tax", "rd"], "R&D subsidy", "tie_break"),
    # clause 4 tie without the default -> most recent of the tied
    ("biotech", "small", "beijing", ["green", "export", "export", "green", "tax"], "Green", "tie_break"),
    ("biotech", "small", "beijing", ["tax", "export", "green"], "Tax relief", "tie_break"),
    # clause 4 plain majority
    ("logistics", "medium", "guangdong", ["rd", "rd", "export", "rd"], "R&D subsidy", "most_clicked"),
]


@pytest.fixture(scope="module")
def big() -> list[dict]:
    return generate(5000, seed=123)


@pytest.mark.parametrize("industry,size,region,clicks,expected,clause", CASES)
def test_rule_hand_written_cases(industry, size, region, clicks, expected, clause):
    assert reference_rule(industry, size, region, clicks) == expected
    assert recommend(industry, size, region, clicks) == expected
    assert policy._decide(industry, size, region, clicks)[1] == clause


def test_generator_agrees_with_reference_rule(big):
    for row in big:
        m = row["meta"]
        assert m["rule_label"] == reference_rule(m["industry"], m["size"], m["region"], m["clicks"])
        if not m["noisy"]:
            assert row["label"] == m["rule_label"]
        else:
            assert row["label"] != m["rule_label"]
    # every clause is exercised
    assert set(Counter(r["meta"]["clause"] for r in big)) == {
        "micro_farm",
        "coastal_export",
        "large_no_financing",
        "large_fallback",
        "most_clicked",
        "tie_break",
    }


def test_row_shape(big):
    for row in big[:200]:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == row["label"] in LABELS
        assert 3 <= len(row["meta"]["clicks"]) <= 6
        for name in LABELS:  # the allowed answers are listed in every prompt
            assert name in user["content"]
        # the titles shown are the ones in the meta, in order
        assert all(t in user["content"] for t in row["meta"]["titles"])
        json.dumps(row, ensure_ascii=False)


def test_categories_and_titles():
    assert [c.name for c in CATEGORIES] == LABELS
    assert len(LABELS) == 6
    assert all(c.zh for c in CATEGORIES)
    # no label is a substring of another (unambiguous parsing)
    for a in LABELS:
        for b in LABELS:
            assert a == b or a.casefold() not in b.casefold()
    # each title belongs to exactly one category, per language
    for lang in (0, 1):
        all_titles = [t[lang] for ts in TITLES.values() for t in ts]
        assert len(all_titles) == len(set(all_titles))
    assert all(len(ts) == 8 for ts in TITLES.values())


def test_deterministic():
    a = generate(50, seed=7)
    assert a == generate(50, seed=7)
    assert a != generate(50, seed=8)
    assert generate(20, seed=7) == a[:20]  # a prefix: n does not change earlier rows


def test_noise_rate(big):
    rate = sum(r["meta"]["noisy"] for r in big) / len(big)
    assert 0.04 <= rate <= 0.06
    clean = generate(1000, seed=1, noise=0.0)
    assert not any(r["meta"]["noisy"] for r in clean)
    assert all(r["label"] == r["meta"]["rule_label"] for r in clean)
    noisy = generate(2000, seed=1, noise=0.3)
    assert 0.26 <= sum(r["meta"]["noisy"] for r in noisy) / 2000 <= 0.34


def test_label_distribution_not_degenerate(big):
    counts = Counter(r["label"] for r in big)
    assert set(counts) == set(LABELS)
    for label in LABELS:
        share = counts[label] / len(big)
        assert 0.08 <= share <= 0.35, (label, share)


def test_baselines_below_ceiling(big):
    majority = Counter(r["label"] for r in big).most_common(1)[0][1] / len(big)
    clicked = sum(r["label"] == policy.most_clicked_baseline(r["meta"]["clicks"]) for r in big) / len(big)
    ceiling = sum(r["label"] == r["meta"]["rule_label"] for r in big) / len(big)
    assert majority < 0.35
    assert 0.55 <= clicked <= 0.75
    assert ceiling - clicked > 0.2


def test_languages(big):
    langs = Counter(r["meta"]["lang"] for r in big)
    assert 0.45 <= langs["zh"] / len(big) <= 0.55
    zh = next(r for r in big if r["meta"]["lang"] == "zh")["messages"][0]["content"]
    en = next(r for r in big if r["meta"]["lang"] == "en")["messages"][0]["content"]
    assert "企业" in zh and "Firm:" in en
    assert {r["meta"]["lang"] for r in generate(100, seed=0, zh_ratio=0.0)} == {"en"}
    assert {r["meta"]["lang"] for r in generate(100, seed=0, zh_ratio=1.0)} == {"zh"}


def test_prompt_length_bounded(big):
    # character proxy for ~110-210 tokens (each click shows its category in brackets, then the tally per category)
    for row in big:
        n = len(row["messages"][0]["content"])
        if row["meta"]["lang"] == "zh":
            assert 120 <= n <= 270, n
        else:
            assert 260 <= n <= 480, n


def test_bad_arguments():
    with pytest.raises(UserError, match="noise"):
        generate(3, seed=0, noise=1.5)
    with pytest.raises(UserError, match="zh_ratio"):
        generate(3, seed=0, zh_ratio=-0.1)
    with pytest.raises(UserError, match="number of examples"):
        generate(-1, seed=0)
    with pytest.raises(ValueError):
        recommend("mining", "small", "henan", ["tax"])
    with pytest.raises(ValueError):
        recommend("software", "small", "henan", [])


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_demo_data_splits(tmp_path):
    paths = write_demo_data(tmp_path / "demo", n_train=200, n_test=60, seed=3)
    assert set(paths) == {"train", "test"}
    train, test = _read(paths["train"]), _read(paths["test"])
    assert len(train) == 200 and len(test) == 60
    assert train == generate(200, seed=3)
    train_prompts = {r["messages"][0]["content"] for r in train}
    test_prompts = [r["messages"][0]["content"] for r in test]
    assert not train_prompts & set(test_prompts)
    assert len(set(test_prompts)) == len(test_prompts)
    # the test split is its own stream, not a continuation of train's
    assert test[:10] != generate(210, seed=3)[200:]
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["test.jsonl", "train.jsonl"]


def test_write_demo_data_is_idempotent_and_never_overwrites(tmp_path):
    out = tmp_path / "d"
    first = write_demo_data(out, n_train=30, n_test=10, seed=0)
    before = {k: p.read_bytes() for k, p in first.items()}
    mtime = first["train"].stat().st_mtime_ns
    again = write_demo_data(out, n_train=30, n_test=10, seed=0)  # same content: kept
    assert again == first
    assert {k: p.read_bytes() for k, p in again.items()} == before
    assert first["train"].stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="already exists with different content") as err:
        write_demo_data(out, n_train=30, n_test=10, seed=1)
    assert "another output folder" in str(err.value) and "\n" not in str(err.value)
    assert {k: p.read_bytes() for k, p in first.items()} == before  # untouched
    # test.jsonl differing alone also refuses, and train.jsonl is not written first
    other = tmp_path / "e"
    other.mkdir()
    (other / "test.jsonl").write_text("something else\n", encoding="utf-8")
    with pytest.raises(UserError):
        write_demo_data(other, n_train=30, n_test=10, seed=0)
    assert not (other / "train.jsonl").exists()


def test_write_demo_data_rejects_file_as_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="is a file"):
        write_demo_data(f, n_train=5, n_test=5)


def test_demo_baselines_are_tfidf_lr_and_the_most_clicked_heuristic(tmp_path):
    """The demo's table rows without a model: scikit-learn's own pipeline on the same prompts, and the heuristic."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    from tunelab.demo.run import baselines
    from tunelab.eval.classical import features_for

    paths = write_demo_data(tmp_path, n_train=300, n_test=80, seed=1)
    train, test = ([json.loads(x) for x in paths[s].read_text().splitlines()] for s in ("train", "test"))
    got = baselines(train, test)
    texts = [r["messages"][0]["content"] for r in train]
    feats = features_for(texts)
    vec = TfidfVectorizer(analyzer=feats["analyzer"], ngram_range=feats["ngram_range"], sublinear_tf=True)
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(vec.fit_transform(texts), [r["label"] for r in train])
    pred = clf.predict(vec.transform([r["messages"][0]["content"] for r in test]))
    assert got["tfidf"]["accuracy"] == pytest.approx(accuracy_score([r["label"] for r in test], pred))
    heuristic = sum(policy.most_clicked_baseline(r["meta"]["clicks"]) == r["label"] for r in test) / len(test)
    assert got["heuristic"]["accuracy"] == pytest.approx(heuristic)
    assert 0.3 < got["heuristic"]["accuracy"] < 0.9  # neither a trivial nor a perfect predictor
