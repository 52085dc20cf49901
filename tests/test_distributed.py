"""1 process = 2 processes: DDP on CPU (gloo), launched through accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import warm
from conftest import tiny_config, train_one_and_two


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded-accelerate-launch", "packed-train-processes"])
def test_one_process_equals_two_processes(tmp_path, alpaca_path, packing):
    """Padded rows run under `accelerate launch`; packed rows under tunelab's own launcher
    (`train.processes: 2` in the config, plain `tunelab train`)."""
    common = {"lr": 1e-3, "max_steps": 3, "grad_accum": 2, "schedule": "constant", "threads": 1}
    data = {"train": [{"path": str(alpaca_path), "limit": 96 if packing else 48}], "max_length": 128,
            "packing": packing}
    one = tiny_config(tmp_path, alpaca_path, train={**common, "batch_size": 4}, run={"name": "one"}, data=data)
    two = tiny_config(tmp_path, alpaca_path, train={**common, "batch_size": 2}, run={"name": "two"}, data=data)
    one["run"]["output_dir"] = two["run"]["output_dir"] = str(tmp_path / "runs")
    run1, run2 = train_one_and_two(tmp_path, one, two, launcher="tunelab" if packing else "accelerate")
    assert json.loads((run2 / "env.json").read_text())["processes"] == 2
    peaks = [json.loads((r / "summary.json").read_text())["peak_rss_mib"] for r in (run1, run2)]
    assert len(peaks[0]) == 1 and len(peaks[1]) == 2 and all(100 < p < 20_000 for p in peaks[0] + peaks[1])
    l1, l2 = losses(run1), losses(run2)
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2, strict=True):
        assert abs(a - b) < 1e-5, (l1, l2)
    w1 = load_file(str(run1 / "final" / "adapter_model.safetensors"))
    w2 = load_file(str(run2 / "final" / "adapter_model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)


def fake_ranks(tmp_path, monkeypatch, fork: bool, script: str) -> dict:
    """Make the launcher's ranks run ``script`` (shell): as the interpreter it execs, or (``fork``) as the module
    the zygote runs, with nothing preloaded. Returns the keyword arguments for ``run_processes``."""
    from tunelab.train import launch

    if fork:
        (tmp_path / "fake_rank.py").write_text("import os\n\n\ndef main(argv):\n"
                                               f"    os.execvp('sh', ['sh', '-c', {script!r}])\n")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
        return {"fork": True, "module": "fake_rank", "preload": ()}
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(launch.sys, "executable", str(fake))
    return {"fork": False}


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "exec"])
def test_a_failing_rank_stops_the_others_at_once(tmp_path, monkeypatch, capsys, fork):
    """Rank 1 fails while rank 0 would wait (at a collective): the launcher stops rank 0 and
    returns rank 1's exit code instead of waiting for the gloo timeout; the same for ranks forked
    from the zygote and ranks started as interpreters of their own."""
    import time

    from tunelab.train import launch

    how = fake_ranks(tmp_path, monkeypatch, fork, 'if [ "$RANK" = 1 ]; then exit 3; fi\nexec sleep 120')
    start = time.monotonic()
    assert launch.run_processes(["train", "x.yaml"], 2, **how) == 3
    assert time.monotonic() - start < 30
    assert "process 1 of 2 stopped with exit code 3" in capsys.readouterr().err


def test_a_zygote_that_dies_before_forking_fails_the_launch(tmp_path, monkeypatch):
    """A preload that cannot be imported: the zygote's traceback is the message, and the launch fails."""
    from tunelab.train import launch

    assert launch.run_processes(["train", "x.yaml"], 2, fork=True, preload=("no_such_module_here",)) == 1


def test_train_processes_user_error_is_one_line_once(tmp_path, alpaca_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "no output"}\n' * 4)
    cfg = tiny_config(tmp_path, alpaca_path, train={"processes": 2, "threads": 1, "max_steps": 1},
                      data={"train": [{"path": str(bad)}]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = warm.run(["train", str(tmp_path / "c.yaml")])
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.jsonl" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_the_launcher_starts_the_ranks_without_the_model_stack_and_rank_0_reports_the_task_rules(tmp_path,
                                                                                                alpaca_path):
    """`tunelab train` with train.processes: 2 reads the config without the task's own rules, whose modules
    import transformers and peft (about 6 s before any rank started); rank 0 checks them and prints a problem
    once. A sharded engine's launcher asks whether there is a GPU (for the allocator) without torch either."""
    cfg = tiny_config(tmp_path, alpaca_path, train={"processes": 2, "threads": 1, "max_steps": 1})
    stack = ("torch", "transformers", "peft", "deepspeed")
    for distributed, imported in (("ddp", []), ("fsdp", [])):
        path = tmp_path / f"{distributed}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "distributed": distributed}}))
        probe = ("import sys; from tunelab.train import launch; launch.run_processes = lambda *a, **k: 0; "
                 f"from tunelab.cli import main; assert main(['train', {str(path)!r}]) == 0; "
                 f"print([m for m in {stack!r} if m in sys.modules])")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == repr(imported), (distributed, out.stdout, out.stderr)
    (tmp_path / "head.yaml").write_text(yaml.safe_dump({**cfg, "method": {"name": "head"}}))
    out = warm.run(["train", str(tmp_path / "head.yaml")], env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "method.name=head trains a classification head, but task is 'sft'" in out.stderr


def test_an_existing_run_is_refused_before_the_ranks_start_and_by_the_ranks_in_one_line(tmp_path, alpaca_path,
                                                                                        capsys):
    """`tunelab train` refuses a run folder that already trained before it starts any rank; ranks started by
    the launcher (the check raced by another run) agree on rank 0's refusal: one line, no gloo traceback."""
    from tunelab.cli import main

    cfg = tiny_config(tmp_path, alpaca_path, train={"processes": 2, "threads": 1, "max_steps": 1},
                      run={"name": "taken", "output_dir": str(tmp_path / "runs")})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "metrics.jsonl").write_text("")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "runs/taken: a run with this name already exists" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-c", "import sys; from tunelab.train import launch; "
                          f"sys.exit(launch.run_processes(['train', {str(tmp_path / 'c.yaml')!r}], 2))"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "a run with this name already exists" in errors[0]


def test_python_api_refuses_train_processes(tmp_path, alpaca_path):
    from tunelab.config import load_config
    from tunelab.errors import UserError
    from tunelab.train.recipe import fine_tune

    cfg = tiny_config(tmp_path, alpaca_path, train={"processes": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="train.processes: 2 processes are started by `tunelab train CONFIG`"):
        fine_tune(*load_config(tmp_path / "c.yaml"))


@pytest.mark.slow
# DDP's Ctrl-C is also in test_faults' chain of faults (there, resumed bit-identical to an uninterrupted run)
@pytest.mark.parametrize("engine", [pytest.param({}, marks=pytest.mark.extended), pytest.param(
    {"distributed": "fsdp"}, marks=pytest.mark.extended), {"distributed": "deepspeed", "deepspeed": {"stage": 3}}],
    ids=["ddp", "fsdp", "zero3"])
def test_ctrl_c_with_two_processes_saves_one_checkpoint_and_resumes(tmp_path, alpaca_path, engine):
    """SIGINT to `tunelab train` with train.processes: 2: both ranks stop after the same step,
    one checkpoint is saved (under a sharded engine, with both ranks' shards), the error is one line, and
    --resume finishes the run from there."""
    import signal
    import time

    # 24 steps: the interrupt lands after about 4 of them, and the resumed run has few left
    cfg = tiny_config(tmp_path, alpaca_path, train={"processes": 2, "threads": 1, "batch_size": 2, "grad_accum": 1,
                                                   "max_steps": 24, "lr": 1e-3, **engine},
                      data={"train": [{"path": str(alpaca_path), "limit": 120}], "max_length": 128})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "tiny"
    cmd = [sys.executable, "-m", "tunelab.cli", "train", str(path)]
    # a shell running the suite in the background (`make test &`) starts it with SIGINT ignored, and
    # tunelab, like any program, keeps an inherited SIG_IGN: give the run the default disposition
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(losses(run)) >= 3:  # early: the run is short
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if "interrupted at step" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    step = int(lines[0].split("interrupted at step ")[1].split(":")[0])
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [f"step-{step:06d}"]
    shards = run / "checkpoints" / f"step-{step:06d}" / "shards"
    if engine.get("distributed") == "deepspeed":  # each rank's ZeRO partition of the model and the optimiser
        assert len(list((shards / "zero").glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == 2
    elif engine:  # torch.distributed.checkpoint: one file a rank
        assert len(list(shards.glob("__*_0.distcp"))) == 2

    from tunelab.train.cpu_tuning import scalable_malloc_libraries

    done = warm.run(["train", str(path), "--resume"], tbb=bool(engine) and scalable_malloc_libraries() is not None)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == summary["total_steps"] and summary["steps_this_session"] == summary["total_steps"] - step
