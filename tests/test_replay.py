"""Experience replay (objectives.replay): exact replay counts per step, determinism, the loss it adds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from tunelab.config import load_config
from tunelab.data.batching import Plan
from tunelab.data.replay import ReplayPlan, replay_count, spread
from tunelab.errors import ConfigError, UserError
from tunelab.train.recipe import fine_tune


def _plan(batch, accum, world, ratio, schedule=(), n_task=37, n_replay=11, seed=3):
    return ReplayPlan(Plan(n_task, batch, accum, world, seed), n_replay, ratio, tuple(schedule))


def test_replay_count_rounds_half_up():
    assert [replay_count(r, 8) for r in (0.2, 0.25, 0.3, 0.0625, 0.5)] == [2, 2, 2, 1, 4]  # 1.6, 2.0, 2.4, 0.5, 4
    assert replay_count(0.3125, 8) == 3  # 2.5 -> 3 (not banker's rounding to 2)


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.6])
def test_every_step_has_the_exact_replay_count_for_every_batch_layout(ratio):
    layouts = [(8, 1, 1), (2, 4, 1), (4, 1, 2), (1, 2, 4)]  # 8 rows per step each
    plans = [_plan(b, a, w, ratio) for b, a, w in layouts]
    k = replay_count(ratio, 8)
    for step in range(40):  # > 3 task epochs and > 10 replay epochs
        rows = plans[0].step_rows(step)
        assert sum(i >= 37 for i in rows) == k and len(rows) == 8
        for p in plans[1:]:  # the same rows whatever the batch / accumulation / process split
            got = [i for m in range(p.task.grad_accum) for r in range(p.world_size) for i in p.micro_rows(step, m, r)]
            assert sorted(got) == sorted(rows)
    # a fresh plan (a resumed run) gives the same rows at any step: a pure function of (seed, step)
    assert _plan(8, 1, 1, ratio).step_rows(29) == plans[0].step_rows(29)


def test_task_and_replay_streams_cover_each_epoch_once():
    p = _plan(4, 2, 1, 0.25)  # 6 task + 2 replay rows per step
    task, replay = Counter(), Counter()
    for step in range(37):  # 37 steps x 6 = 222 task rows = 6 epochs of 37; 74 replay rows
        for i in p.step_rows(step):
            (replay if i >= 37 else task)[i] += 1
    assert set(task.values()) == {6} and len(task) == 37
    assert sum(replay.values()) == 74 and max(replay.values()) - min(replay.values()) <= 1
    assert p.steps_per_epoch == 7  # ceil(37 / 6)


def test_schedule_changes_the_count_from_its_step_on():
    p = _plan(8, 1, 1, 0.5, schedule=[(3, 0.125)])
    assert [p.replay_rows_at(s) for s in range(6)] == [4, 4, 4, 1, 1, 1]
    assert p.replay_before(5) == 4 * 3 + 1 * 2
    assert [sum(i >= 37 for i in p.step_rows(s)) for s in range(6)] == [4, 4, 4, 1, 1, 1]


def test_replay_rows_are_spread_over_the_step():
    assert [i for i, r in enumerate(spread(6, 2)) if r] == [2, 6]  # one in each half of the step
    assert sum(spread(5, 3)) == 3


def test_a_ratio_rounding_to_nothing_is_a_user_error():
    with pytest.raises(UserError, match="rounds to 0 replay rows"):
        _plan(2, 1, 1, 0.2).check()
    with pytest.raises(UserError, match="rounds to 4 replay rows"):
        _plan(4, 1, 1, 0.9).check()


def _replay_file(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Name a colour number {i}."},
                          {"role": "assistant", "content": ["red", "green", "blue", "amber"][i % 4] * (1 + i % 3)}]}
            for i in range(10)]
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path, cfg, name):
    cfg = {**cfg, "run": {**cfg["run"], "name": name}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return fine_tune(*load_config(path))


def _train_records(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_replay_training_logs_replay_loss_and_batch_8_equals_2x4(tmp_path, alpaca_path):
    replay = {"replay": {"data": [{"path": str(_replay_file(tmp_path))}], "ratio": 0.25}}
    common = {"lr": 1e-3, "max_steps": 2, "schedule": "constant"}
    data = {"train": [{"path": str(alpaca_path), "limit": 16, "name": "task"}], "max_length": 64}
    a = _run(tmp_path, tiny_config(tmp_path, alpaca_path, data=data, objectives=replay,
                                   train={**common, "batch_size": 8, "grad_accum": 1}), "b8")
    b = _run(tmp_path, tiny_config(tmp_path, alpaca_path, data=data, objectives=replay,
                                   train={**common, "batch_size": 2, "grad_accum": 4}), "b2x4")
    ra, rb = _train_records(a.run_dir), _train_records(b.run_dir)
    assert len(ra) == 2 and all("loss/replay" in r and "loss/task" in r for r in ra)
    for x, y in zip(ra, rb, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["loss/replay"] - y["loss/replay"]) < 1e-5
    info = json.loads((a.run_dir / "replay.json").read_text())
    assert info["replay_rows_per_step"] == 2 and info["task_rows_per_step"] == 6 and info["samples"] == 10


def test_replay_config_errors_are_one_line(tmp_path, alpaca_path):
    cfg = tiny_config(tmp_path, alpaca_path, objectives={"replay": {"ratio": 1.5, "schedule": [[0, 2.0]]}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "objectives.replay.ratio" in text and "objectives.replay.schedule.0.1" in text
    cfg = tiny_config(tmp_path, alpaca_path, objectives={"replay": {"ratio": 0.25}})
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="objectives.replay.data: empty"):
        fine_tune(*load_config(path))
