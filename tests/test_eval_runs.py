"""The run registry (list, filter, sort, show, CLI) and MLflow logging against a real local store."""

from __future__ import annotations

import json

import pytest

from eval_fixtures import write_run_files
from tunelab.errors import UserError
from tunelab.eval.runs import filter_runs, list_runs, show_run, sort_runs


def _eval_doc(run, name, accuracy):
    (run / "eval").mkdir(exist_ok=True)
    doc = {"name": name, "task": "classification", "source": "x.jsonl",
           "systems": {"base 0-shot": {"headline": {"accuracy": 0.1}, "metrics": {}},
                       "tuned": {"headline": {"accuracy": accuracy, "macro_f1": accuracy - 0.1}, "metrics": {}}}}
    (run / "eval" / f"{name}.json").write_text(json.dumps(doc))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run_files(root / "alpha", lr=1e-4, steps=4)
    write_run_files(root / "beta", method="full", lr=5e-5, steps=8)
    write_run_files(root / "gamma", lr=3e-4, steps=2)
    (root / "gamma" / "final").mkdir()
    _eval_doc(root / "alpha", "policy", 0.6)
    _eval_doc(root / "gamma", "policy", 0.8)
    (root / "not-a-run").mkdir()
    return root


def test_list_filter_sort(runs):
    rows = list_runs(runs)
    assert [r["name"] for r in rows] == ["alpha", "beta", "gamma"]  # not-a-run skipped
    alpha = rows[0]
    assert alpha["model"] == "tiny-random-llama" and alpha["method"] == "lora" and alpha["lr"] == 1e-4
    assert alpha["batch"] == "2x2" and alpha["steps"] == 4 and alpha["eval_loss"] == 1.9
    assert alpha["train_loss"] == pytest.approx(2.5 - 0.2 * 3)
    assert alpha["metrics"] == {"policy/accuracy": 0.6, "policy/macro_f1": pytest.approx(0.5)}
    assert rows[2]["status"] == "completed" and rows[0]["status"] == "running or stopped"
    assert [r["name"] for r in filter_runs(rows, ["method=lora"])] == ["alpha", "gamma"]
    assert [r["name"] for r in filter_runs(rows, ["lr<2e-4"])] == ["alpha", "beta"]
    assert [r["name"] for r in filter_runs(rows, ["policy/accuracy>0.7"])] == ["gamma"]
    assert [r["name"] for r in sort_runs(rows, "-policy/accuracy")] == ["gamma", "alpha", "beta"]  # missing last
    assert [r["name"] for r in sort_runs(rows, "lr")] == ["beta", "alpha", "gamma"]
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        filter_runs(rows, ["lora"])
    with pytest.raises(UserError, match="needs a number"):
        filter_runs(rows, ["lr<abc"])


def test_show_and_cli(runs, capsys):
    from tunelab.cli import main

    info = show_run(runs, "alpha")
    assert info["config"]["method"]["name"] == "lora" and info["evaluations"][0]["name"] == "policy"
    with pytest.raises(UserError, match="no run 'zeta'"):
        show_run(runs, "zeta")
    capsys.readouterr()
    assert main(["runs", "--dir", str(runs), "--filter", "method=lora", "--sort=-policy/accuracy", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ["gamma", "alpha"]
    assert main(["runs", "show", "beta", "--dir", str(runs)]) == 0
    assert "full" in capsys.readouterr().out
    assert main(["runs", "--dir", str(runs / "nope")]) == 2


def test_mlflow_logging_to_a_local_sqlite_store(runs, monkeypatch):
    """Real MLflow: the default store is sqlite beside the runs, artifacts in runs/mlartifacts."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tunelab.eval.tracking import log_to_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (runs / "alpha" / "report.html").write_text("<html></html>")
    rid = log_to_mlflow(runs / "alpha", experiment="tests")
    assert (runs / "mlflow.db").is_file() and (runs / "mlartifacts").is_dir()
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.info.run_name == "alpha"
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["method.name"] == "lora"
    history = client.get_metric_history(rid, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4] and history[0].value == pytest.approx(2.5)
    assert [m.value for m in client.get_metric_history(rid, "eval/loss")] == [2.2, 1.9]
    assert run.data.metrics["eval/policy/accuracy"] == 0.6
    assert run.data.metrics["baseline/base 0-shot/policy/accuracy"] == 0.1
    artifacts = {a.path for a in client.list_artifacts(rid)}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "report.html", "eval"} <= artifacts
