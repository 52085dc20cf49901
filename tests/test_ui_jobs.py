"""tunelab ui's runs: state, progress and ETA read back from a run directory as it is written; a run that
fails shows the CLI's one-line error."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml

from tunelab import metrics_log
from tunelab.errors import UserError
from tunelab.ui.form import to_yaml
from tunelab.ui.jobs import Jobs
from tunelab.ui.workspace import Workspace


def test_progress_eta_and_curves_come_from_metrics_jsonl(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 2.0, "max_steps": None}}))
    for step in range(1, 5):  # 8 steps an epoch: epoch = step / 8; 0.5 s a step
        metrics_log.append(run / "metrics.jsonl", {"kind": "train", "step": step, "epoch": step / 8, "loss": 3.0 - step / 10,
                                                   "lr": 1e-3, "tokens_per_s": 100.0 + step, "elapsed_s": 0.5 * step})
    metrics_log.append(run / "metrics.jsonl", {"kind": "eval", "step": 4, "eval_loss": 2.5, "eval_accuracy": 0.75})
    jobs = Jobs(Workspace(tmp_path))
    st = jobs.state(run)
    assert (st.state, st.step, st.total_steps) == ("stopped", 4, 16)  # no process, no checkpoint: ended early
    assert st.curves["loss"] == [(s, 3.0 - s / 10) for s in range(1, 5)] and st.curves["eval_accuracy"] == [(4, 0.75)]
    assert st.eval_loss == 2.5 and st.tokens_per_s == 104.0
    st.state = "running"
    st.eta_s = 0.5 * (16 - 4)
    assert st.progress_line() == "running · step 4/16 · 104 tokens/s · ETA 0m06s · loss 2.6000 · eval loss 2.5000"


def test_a_failing_run_shows_the_cli_error_and_a_name_is_never_reused_for_another_config(tmp_path):
    ws = Workspace(tmp_path)
    jobs = Jobs(ws)
    tree = {"run": {"name": "bad"}, "model": {"path": "tiny-random-llama"}, "data": {"train": [{"path": "missing.jsonl"}]}}
    run = jobs.start(tree, to_yaml(tree))
    try:
        deadline = time.time() + 600
        while jobs.is_running(run) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        if jobs.pid(run) is not None:  # never leave the run behind when the test fails
            os.kill(jobs.pid(run), signal.SIGKILL)
    st = jobs.state(run)
    assert st.state == "failed" and st.detail.startswith("error: ") and "missing.jsonl" in st.detail, st.detail
    assert (tmp_path / "configs" / "bad.yaml").read_text() == to_yaml(tree)
    other = {**tree, "train": {"lr": 1e-3}}
    with pytest.raises(UserError, match=r"^run.name: configs/bad.yaml already exists with another config"):
        jobs.start(other, to_yaml(other))
    with pytest.raises(UserError, match="not a usable name"):
        jobs.start({**tree, "run": {"name": "../x"}}, "")
