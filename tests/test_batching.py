"""Rows, packing and the data plan."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tunelab.data.batching import IGNORE, Plan, collate, rows_packed, rows_unpacked


@dataclass
class S:
    input_ids: list[int]
    labels: list[int]
    id: str = "s"


def samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 2) + ids[n // 2 :]
        out.append(S(ids, labels, f"s{i}"))
    return out


def test_packing_fits_and_keeps_every_sample():
    data = samples([30, 60, 10, 90, 45, 5, 70, 20])
    rows = rows_packed(data, 100)
    assert all(len(r) <= 100 for r in rows)
    assert sorted(sum((list(r.segments) for r in rows), [])) == sorted(len(s.input_ids) for s in data)
    assert len(rows) == 4  # 330 tokens in rows of 100: best fit needs exactly 4
    # the first token of every sample is never a target
    for r in rows:
        start = 0
        for seg in r.segments:
            assert r.labels[start] == IGNORE
            start += seg
    assert sum(r.n_targets for r in rows) == sum(r.n_targets for r in rows_unpacked(data))


def test_too_long_sample_is_an_error():
    with pytest.raises(ValueError):
        rows_packed(samples([120]), 100)


def test_collate_packed_position_ids_restart():
    rows = rows_packed(samples([3, 4]), 10)
    batch = collate(rows, pad_id=0, packed=True, pad_to=10)
    pos = batch["position_ids"][0].tolist()
    assert pos == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2] or pos == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    assert "attention_mask" not in batch
    assert (batch["labels"][0, 7:] == IGNORE).all()


def test_collate_padded_and_empty():
    batch = collate(rows_unpacked(samples([3, 5])), pad_id=0, packed=False)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    empty = collate([], pad_id=0, packed=False)
    assert empty["input_ids"].shape == (1, 1) and (empty["labels"] == IGNORE).all()


def test_plan_slices_are_a_partition_and_match_across_layouts():
    one = Plan(n_rows=37, batch_size=8, grad_accum=1, world_size=1, seed=3)
    acc = Plan(n_rows=37, batch_size=2, grad_accum=4, world_size=1, seed=3)
    ddp = Plan(n_rows=37, batch_size=4, grad_accum=1, world_size=2, seed=3)
    for step in range(one.steps_per_epoch * 2):
        a = sorted(one.micro_rows(step, 0, 0))
        b = sorted(sum((acc.micro_rows(step, m, 0) for m in range(4)), []))
        c = sorted(ddp.micro_rows(step, 0, 0) + ddp.micro_rows(step, 0, 1))
        assert a == b == c
    epoch0 = sum((one.step_rows(s) for s in range(one.steps_per_epoch)), [])
    assert sorted(epoch0) == list(range(37))
    assert one.epoch_order(0) != one.epoch_order(1)


def test_packed_row_logits_equal_each_sample_alone():
    """No attention across samples: every token's logits match the sample run by itself (fp32)."""
    from tunelab.models.load import load_model

    model = load_model("tiny-random-llama").eval()
    data = samples([7, 12, 5, 9])
    rows = rows_packed(data, 40)
    assert len(rows) == 1
    batch = collate(rows, pad_id=0, packed=True, pad_to=40)
    with torch.no_grad():
        # use_cache=False matters: with a KV cache transformers does not detect packed position ids
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        by_len = {len(s.input_ids): s for s in data}
        for seg in rows[0].segments:
            ids = batch["input_ids"][0, start : start + seg]
            assert ids.tolist() == by_len[seg].input_ids
            alone = model(input_ids=ids[None]).logits[0]
            torch.testing.assert_close(packed[start : start + seg], alone, atol=1e-5, rtol=1e-5)
            start += seg


def test_packed_loss_equals_unpacked_loss():
    """The training loss path (labels-only chunked CE) gives the same sum packed and padded."""
    from tunelab.models.load import load_model
    from tunelab.objectives.causal_lm import CausalLMLoss

    loss_model = CausalLMLoss(load_model("tiny-random-llama"), chunk=7).eval()
    data = samples([7, 12, 5, 9, 30, 3])
    with torch.no_grad():
        packed = collate(rows_packed(data, 40), pad_id=0, packed=True)
        padded = collate(rows_unpacked(data), pad_id=0, packed=False)
        (lp, np_), (lu, nu) = ((o.total, o.count) for o in (loss_model(**packed), loss_model(**padded)))
    assert np_ == nu == sum(r.n_targets for r in rows_unpacked(data))
    torch.testing.assert_close(lp, lu, atol=1e-4, rtol=1e-6)


def test_length_grouped_plan_is_a_seeded_partition_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = tuple(torch.randint(5, 500, (203,), generator=g).tolist())
    plain = Plan(203, 4, 2, 1, seed=1)
    grouped = Plan(203, 4, 2, 1, seed=1, lengths=lengths)
    order = grouped.epoch_order(0)
    assert sorted(order) == list(range(203)) and order == Plan(203, 4, 2, 1, 1, lengths).epoch_order(0)
    assert grouped.epoch_order(1) != order

    def padded(plan):
        total = 0
        for step in range(plan.steps_per_epoch):
            for micro in range(plan.grad_accum):
                rows = [lengths[i] for i in plan.micro_rows(step, micro, 0)]
                total += len(rows) * max(rows, default=0) - sum(rows)
        return total

    assert padded(grouped) < 0.3 * padded(plain)
    # the same grouping for batch 8 x 1 and batch 4 x 2: layouts stay equivalent
    other = Plan(203, 8, 1, 1, seed=1, lengths=lengths)
    assert all(sorted(other.step_rows(s)) == sorted(grouped.step_rows(s)) for s in range(grouped.steps_per_epoch))


def test_collate_rounds_the_width_up_to_a_multiple():
    """Training pads rows to a multiple of PAD_MULTIPLE tokens (few matmul shapes); the padding is
    unlabelled and, packed, a position-id segment of its own."""
    rows = rows_packed(samples([30, 45]), 100)
    batch = collate(rows, pad_id=0, packed=True, multiple_of=64)
    assert batch["input_ids"].shape == (1, 128)
    assert (batch["labels"][0, 75:] == IGNORE).all() and (batch["input_ids"][0, 75:] == 0).all()
    assert batch["position_ids"][0, 75:].tolist() == list(range(53))
    assert collate(rows, pad_id=0, packed=True, multiple_of=1)["input_ids"].shape == (1, 75)
    assert collate(rows, pad_id=0, packed=False, multiple_of=64)["attention_mask"].sum() == 75
