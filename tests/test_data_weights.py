"""Sample weights in the loss (by hand), class-balanced weights, samplers, mixing, the config steps."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import shared, tiny_config
from tunelab.data.batching import collate, rows_unpacked
from tunelab.data.sampling import balanced_order, mix, mix_counts, stratified_order
from tunelab.data.tokenize import Encoded
from tunelab.data.weights import class_weights


def test_class_weight_formulas():
    w = class_weights({"a": 30, "b": 10}, "inverse")
    assert w == pytest.approx({"a": 40 / (2 * 30), "b": 40 / (2 * 10)})
    beta = 0.9
    e = class_weights({"a": 30, "b": 10}, "effective", beta)
    raw = {"a": (1 - beta) / (1 - beta**30), "b": (1 - beta) / (1 - beta**10)}
    scale = 40 / (30 * raw["a"] + 10 * raw["b"])
    assert e == pytest.approx({k: v * scale for k, v in raw.items()})


def test_unit_weights_take_the_unweighted_path():
    rows = rows_unpacked([Encoded([1, 2, 3], [1, 2, 3], "a"), Encoded([4, 5], [-100, 5], "b")])
    assert all(r.weights is None for r in rows)
    assert "weights" not in collate(rows, pad_id=0, packed=False)


@pytest.fixture(scope="module")
def tiny():
    from tunelab.models.load import load_model
    from tunelab.objectives.causal_lm import CausalLMLoss

    torch.manual_seed(0)
    return CausalLMLoss(load_model("tiny-random-llama", dtype=torch.float32))


def test_class_weights_change_the_loss_as_computed_by_hand(tiny):
    g = torch.Generator().manual_seed(0)
    samples = [Encoded(ids := torch.randint(5, 200, (n,), generator=g).tolist(), ids, f"s{n}", w)
               for n, w in ((9, 0.5), (6, 2.0), (12, 1.0))]
    per_row = []
    for s in samples:  # each row alone, unweighted: (ce sum, targets)
        batch = collate(rows_unpacked([Encoded(s.input_ids, s.labels, s.id)]), pad_id=0, packed=False)
        out = tiny(**batch)
        per_row.append((out.total.item(), out.count.item(), s.weight))
    expected = sum(w * ls for ls, _, w in per_row) / sum(w * n for _, n, w in per_row)
    rows = rows_unpacked(samples)
    for packed, batch_rows in ((False, rows), (True, None)):
        if packed:
            from tunelab.data.batching import rows_packed

            batch_rows = rows_packed(samples, 64)
        batch = collate(batch_rows, pad_id=0, packed=packed)
        out = tiny(**batch)
        wsum, wn = out.total, out.count
        assert wn.item() == pytest.approx(sum(r.target_weight for r in batch_rows))
        assert (wsum / wn).item() == pytest.approx(expected, rel=1e-5)
    unweighted = sum(ls for ls, _, _ in per_row) / sum(n for _, n, _ in per_row)
    assert abs(expected - unweighted) > 1e-3  # the weights really moved it


def test_samplers_and_mixing():
    strata = [0] * 80 + [1] * 20
    order = stratified_order(strata, seed=1, epoch=0)
    assert sorted(order) == list(range(100))
    for start in range(0, 100, 10):  # every batch of 10 holds 8 of class 0 and 2 of class 1 (+-1)
        assert abs(sum(strata[i] for i in order[start:start + 10]) - 2) <= 1
    drawn = balanced_order(strata, seed=1, epoch=0)
    assert 35 <= sum(strata[i] for i in drawn) <= 65
    assert stratified_order(strata, 1, 0) == order and stratified_order(strata, 1, 1) != order
    assert mix_counts([900, 100], strategy="temperature", temperature=1.0) == [900, 100]
    assert mix_counts([900, 100], strategy="temperature", temperature=1e9) == [500, 500]
    assert mix_counts([900, 100], strategy="ratio", ratios=[1, 3], size=400) == [100, 300]
    mixed = mix([list(range(5)), list(range(100, 103))], [2, 7], seed=0)
    assert sorted(d for d, _ in mixed) == [0, 0] + [1] * 7 and {x for d, x in mixed if d == 1} == {100, 101, 102}


def test_training_config_runs_the_workbench_steps(tmp_path):
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    rows = json.loads(shared("instruct", "llamafactory_demo", "alpaca_en_demo.json").read_text(encoding="utf-8"))
    lines = [json.dumps(r) for r in rows[:60]]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[:40] + lines[:5]) + "\n", encoding="utf-8")  # 5 exact duplicates
    b.write_text("\n".join(lines[40:60]) + "\n", encoding="utf-8")
    raw = tiny_config(tmp_path, a, data={
        "train": [{"path": str(a), "name": "hotel"}, {"path": str(b), "name": "extra", "ratio": 1.0}],
        "max_length": 96,
        "prepare": {"clean": {"conflicts": None}, "split": {"ratios": [0.8, 0.2], "group": "exact"},
                    "weights": {"scheme": "inverse", "by": "dataset"}},
    }, train={"lr": 1e-3, "batch_size": 4, "grad_accum": 1, "max_steps": 3, "precision": "fp32", "seed": 0})
    raw["data"]["train"][0]["ratio"] = 2.0
    raw["data"]["mix"] = {"strategy": "ratio", "size": 40}
    cfg, _ = load_config(None, base=raw)
    out = fine_tune(cfg)
    prep = json.loads((out.run_dir / "data_prepare.json").read_text())
    assert prep["clean"][0]["removed_by_reason"] == {"exact_duplicate": 5}
    assert prep["mix"]["rows"] == {"hotel": 27, "extra": 13}
    assert prep["weights"]["class_weights"]["extra"] == pytest.approx(40 / (2 * 13), rel=1e-4)
    assert (out.run_dir / "prepare_removed.jsonl").read_text().count("exact_duplicate") == 5
    metrics = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert train and all("loss/hotel" in m or "loss/extra" in m for m in train)
    from tunelab.data.workbench import prepare_records

    assert prepare_records(cfg).report["clean"][0]["from_cache"] is True  # fingerprint hit: no re-cleaning
