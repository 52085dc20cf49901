"""Every malformed file or row in tests/data/bad gives a one-line error or a rejects entry: never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main

BAD = Path(__file__).parent / "data" / "bad"


@pytest.mark.parametrize("bad_file", sorted(BAD.iterdir()), ids=lambda p: p.name)
def test_train_on_bad_file(tmp_path, capsys, bad_file):
    cfg = {
        "run": {"name": "bad", "output_dir": str(tmp_path / "runs")},
        "model": {"path": "tiny-random-llama"},
        "data": {"train": [{"path": str(bad_file)}], "max_length": 128},
        "method": {"name": "lora", "r": 2},
        "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    run = tmp_path / "runs" / "bad"
    rejects = run / "rejects.jsonl"
    if code == 0:  # good rows trained; each bad one is in the rejects file with its reason
        lines = [json.loads(x) for x in rejects.read_text().splitlines()]
        assert lines and all(r["reason"] and r["detail"] and r["source"] == str(bad_file) for r in lines)
    else:
        assert code == 2
        message = err.strip()
        assert message.startswith("error:") and len(message.splitlines()) == 1, message
        assert bad_file.name in message
        if "no usable training sample" in message:  # every row was bad: all are in the rejects file
            assert rejects.is_file() and rejects.read_text().strip()


def test_every_row_rejected_writes_the_rejects_file_the_error_names(tmp_path, capsys):
    data = tmp_path / "empty_answers.jsonl"
    rows = [{"instruction": f"question {i}", "output": ""} for i in range(3)] + ['{"instruction": oops']
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    cfg = {
        "run": {"name": "allbad", "output_dir": str(tmp_path / "runs")},
        "model": {"path": "tiny-random-llama"},
        "data": {"train": [{"path": str(data)}], "max_length": 128},
        "method": {"name": "lora", "r": 2},
        "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    rejects = tmp_path / "runs" / "allbad" / "rejects.jsonl"
    assert "no usable training sample" in err and str(rejects) in err and len(err.splitlines()) == 1
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert sorted(r["reason"] for r in lines) == ["bad_json", "empty_response", "empty_response", "empty_response"]
