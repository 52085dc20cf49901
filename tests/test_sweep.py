"""tunelab sweep: Optuna search over config paths, pruning, resume, outputs; two workers on PostgreSQL."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import warm
from conftest import tiny_config
from faults import Fault, subprocess_env
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"


def sweep_config(tmp_path: Path, data: Path, sweep: dict, **sections) -> Path:
    cfg = tiny_config(tmp_path, data, **sections)
    cfg["run"]["name"] = "sw"
    cfg["data"] = {"train": [{"path": str(data), "limit": 24}], "eval_ratio": 0.25, "max_length": 64}
    cfg["train"] = {**cfg["train"], "grad_accum": 1, "max_steps": 2, "eval_every": 1, "threads": 1}
    cfg["sweep"] = sweep
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_section_is_strict_with_a_close_match(tmp_path, alpaca_path):
    path = sweep_config(tmp_path, alpaca_path, {"params": {"train.weight_decy": {"type": "float", "low": 1e-4, "high": 1e-3}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "sweep.params.train.weight_decy: no such config path. did you mean 'train.weight_decay'?" in str(err.value)
    bad = sweep_config(tmp_path, alpaca_path, {"params": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
                                                "samplr": "tpe"})
    with pytest.raises(ConfigError, match="sweep.samplr: unknown key. Remove it; did you mean 'sampler'"):
        load_config(bad)
    # a method option is a valid path when a method.name choice has it, and train ignores the section
    ok = sweep_config(tmp_path, alpaca_path, {"params": {"method.name": {"type": "categorical", "choices": ["lora", "ia3"]},
                                               "method.r": {"type": "int", "low": 2, "high": 4}}},
                      method={"name": "ia3"})
    assert load_config(ok)[0].sweep.params["method.r"].high == 4


@pytest.mark.slow  # five training runs
def test_sweep_prunes_writes_outputs_and_resumes(tmp_path, alpaca_path, capsys):
    # lr 1e-7 barely moves the loss: once a 3e-3 trial has finished, a 1e-7 trial is worse than the
    # median at its first evaluation and is pruned (warmup_evals 0); random sampler, seed 3 -> order
    sweep = {"params": {"train.lr": {"type": "categorical", "choices": [3e-3, 1e-7]},
                        "method.r": {"type": "int", "low": 2, "high": 8, "step": 6}},
             "sampler": "random", "seed": 3, "pruner": "median", "startup_trials": 1, "warmup_evals": 0, "trials": 3}
    path = sweep_config(tmp_path, alpaca_path, sweep)
    assert main(["sweep", str(path)]) == 0
    folder = tmp_path / "runs" / "sw-sweep"
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert len(rows) == 3 and [r["number"] for r in rows] == ["0", "1", "2"]
    states = {r["number"]: (r["state"], r["train.lr"]) for r in rows}
    assert any(s == "PRUNED" for s, _ in states.values()), states
    assert all(lr == "1e-07" for s, lr in states.values() if s == "PRUNED")
    # every trial is a run directory trained with its sampled values
    for r in rows:
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert cfg["train"]["lr"] == float(r["train.lr"]) and cfg["method"]["r"] == int(r["method.r"])
        assert "sweep" not in cfg or cfg["sweep"] is None
    # best.yaml is a ready-to-run config with the best trial's values
    best_cfg, _ = load_config(folder / "best.yaml")
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = min(complete, key=lambda r: float(r["eval_loss"]))
    assert best_cfg.train.lr == float(best["train.lr"]) and best_cfg.method.r == int(best["method.r"])
    assert best_cfg.sweep is None and best_cfg.run.name == "sw-best"
    assert (folder / "history.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "pruned" in out and "best: trial" in out
    # resume: the study lives in study.db; asking for 4 trials runs exactly one more
    assert main(["sweep", str(path), "--set", "sweep.trials=4"]) == 0
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]


def test_grid_sampler_tries_every_combination(tmp_path, alpaca_path):
    sweep = {"params": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "grid": [1e-3, 5e-3]},
                        "method.r": {"type": "categorical", "choices": [2]}},
             "sampler": "grid", "pruner": "none", "trials": 2}
    path = sweep_config(tmp_path, alpaca_path, sweep)
    assert main(["sweep", str(path)]) == 0
    rows = list(csv.DictReader((tmp_path / "runs" / "sw-sweep" / "trials.csv").open()))
    assert sorted((float(r["train.lr"]), int(r["method.r"])) for r in rows) == [(1e-3, 2), (5e-3, 2)]
    assert all(r["state"] == "COMPLETE" for r in rows)


# --------------------------------------------------------------------------- PostgreSQL, two workers


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _postgres_bin() -> Path | None:
    """The PostgreSQL server binaries; installed with apt-get when missing and we are root."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True) if Path("/usr/lib/postgresql").is_dir() else []:
        if (candidate / "initdb").is_file():
            return candidate
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], env=env, check=False, capture_output=True)
    return _postgres_bin() if Path("/usr/lib/postgresql").is_dir() else None


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL cluster on a free port (run as the 'postgres' user when we are root)."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the dev extra) is not installed")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed and cannot be (needs root and apt-get): apt-get install postgresql")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "pgdata"
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        data = Path("/tmp") / f"tunelab-pg-{os.getpid()}-{port}"
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    log = data.parent / f"{data.name}.log"
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tunelab"],
                   check=True, capture_output=True)
    if run_as:
        log.touch()
        shutil.chown(log, "postgres", "postgres")
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tunelab", "optuna"],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://tunelab@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
        log.unlink(missing_ok=True)


@pytest.mark.slow
def test_two_workers_share_one_postgres_study_without_losing_or_repeating_a_trial(tmp_path, alpaca_path, postgres):
    import optuna

    sweep = {"params": {"train.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2}}, "sampler": "tpe",
             "pruner": "none", "trials": 4, "storage": postgres, "study": "pg"}
    path = sweep_config(tmp_path, alpaca_path, sweep)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    # `--workers 2` starts two worker processes (`tunelab sweep sweep.yaml --worker`) on the one study
    t0 = time.time()
    done = warm.run(["sweep", str(path), "--workers", "2"], env=env, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    outs = [done.stdout]
    trials = optuna.load_study(study_name="pg", storage=postgres).get_trials()
    # no trial lost: every trial finished; none run twice: numbers and run folders unique, each by one worker
    assert 4 <= len(trials) <= 5, [t.state for t in trials]  # two workers may both start the last one
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == len(trials)
    for t in trials:
        cfg = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert cfg["train"]["lr"] == pytest.approx(t.params["train.lr"])
        assert (Path(t.user_attrs["run_dir"]) / "summary.json").is_file()
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, workers  # both workers trained trials
    lines = [line for out in outs for line in out.splitlines() if line.startswith("trial ")]
    assert len(lines) == len(trials), outs  # each trial reported by exactly one worker
    rows = list(csv.DictReader((tmp_path / "runs" / "sw-sweep" / "trials.csv").open()))
    assert len(rows) == len(trials) and (tmp_path / "runs" / "sw-sweep" / "best.yaml").is_file()
    assert time.time() - t0 < 400


@pytest.mark.slow
def test_a_trial_whose_worker_was_killed_is_rerun_with_its_parameters(tmp_path, alpaca_path):
    import optuna

    sweep = {"params": {"train.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2}}, "sampler": "random",
             "pruner": "none", "trials": 1, "heartbeat": 1}
    path = sweep_config(tmp_path, alpaca_path, sweep)
    env = {**subprocess_env(Fault("after_update", 1, "sigkill")), "HF_HUB_OFFLINE": "1"}
    killed = warm.run(["sweep", str(path), "--worker"], env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL after optimiser step 1, mid-trial
    storage = f"sqlite:///{tmp_path / 'runs' / 'sw-sweep' / 'study.db'}"
    (stale,) = optuna.load_study(study_name="sw", storage=storage).get_trials()
    assert stale.state == optuna.trial.TrialState.RUNNING
    time.sleep(5)  # 4 missed heartbeats
    assert main(["sweep", str(path)]) == 0
    trials = optuna.load_study(study_name="sw", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert states == ["FAIL", "COMPLETE"], states
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == stale.params
