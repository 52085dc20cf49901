"""The other verbs: config show, generate, chat; and the LR schedules."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import tiny_config
from tunelab.cli import main
from tunelab.train.schedule import lr_factor, warmup_steps


def test_config_show_prints_values_and_sources(tmp_path, alpaca_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, alpaca_path)))
    assert main(["config", "show", str(path), "--set", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "train.lr" in out and "0.5" in out and "--set" in out and "default" in out
    assert main(["config", "show", str(path), "--yaml"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["method"]["r"] == 4 and shown["train"]["schedule"] == "cosine"


def test_generate_and_chat_on_a_trained_run(tmp_path, alpaca_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, alpaca_path, train={"max_steps": 1})))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    cli = [sys.executable, "-m", "tunelab.cli"]
    gen = subprocess.run([*cli, "generate", str(run), "--prompt", "hello", "--prompt", "again",
                          "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.count("\n") == 2  # one reply per prompt (a random model may reply with nothing)
    chat = subprocess.run([*cli, "chat", str(run), "--max-new-tokens", "4", "--system", "be brief"],
                          input="hi\n/reset\nhello there\n\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("model> ") == 2 and "lora on tiny-random-llama" in chat.stdout
    missing = subprocess.run([*cli, "generate", str(run), "--checkpoint", "best", "--prompt", "x"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no 'best' weights" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedules(kind):
    total, warm = 10, warmup_steps(10, None, 0.2)
    assert warm == 2
    f = [lr_factor(s, total_steps=total, warmup=warm, kind=kind) for s in range(total)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    if kind == "constant":
        assert all(x == 1.0 for x in f[1:])
    else:
        assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False)) and f[-1] < 0.2
    if kind == "linear":
        assert f[6] == pytest.approx(1 - 4 / 8)
    if kind == "cosine":
        assert f[6] == pytest.approx(0.5)
    assert warmup_steps(10, 3, None) == 3 and warmup_steps(10, None, None) == 0


def test_tensorboard_logging(tmp_path, alpaca_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, alpaca_path, train={"max_steps": 3, "tensorboard": True},
                                               data={"eval_ratio": 0.2})))
    assert main(["train", str(path)]) == 0
    events = EventAccumulator(str(tmp_path / "runs" / "tiny" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [3]
