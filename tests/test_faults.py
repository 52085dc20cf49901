"""Faults during training, and an exact resume after each.

Every case interrupts a run at a point inside a step (see ``faults.POINTS``), with a Ctrl-C or
a death, then resumes it with ``--resume``; the resumed run must end with the same trained
weights, bit for bit, and the same per-step losses (one record per step in ``metrics.jsonl``) as
a run that never stopped. The points are drawn with a fixed seed, so a failure reproduces: its
test id names the point, the occurrence and the action.

Single-process kinds (LoRA with dropout, full, classification) run in this process (a run takes
about a second); the two-process kind and the disk-full case run ``tunelab`` as subprocesses.
"""

from __future__ import annotations

import json
import random
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import warm
from conftest import tiny_config
from faults import POINTS, Fault, SimulatedKill, install, subprocess_env
from tunelab import metrics_log
from tunelab.config import load_config
from tunelab.errors import UserError
from tunelab.train.recipe import fine_tune

STEPS = 6
# occurrences of each point in a 6-step run: 2 micro-batches a step, evaluations at steps 3 and 6,
# checkpoints at steps 2, 4 and 6
OCCURRENCES = {"before_forward": STEPS, "between_micro_batches": STEPS, "after_update": STEPS,
               "during_eval": 2, "during_checkpoint": 3}


def fault_plan(kind: str, actions: tuple[str, ...]) -> list[Fault]:
    """Every point with every action, each at a seeded random occurrence: 10 faults a kind."""
    rng = random.Random(f"faults-{kind}")
    return [Fault(point, rng.randint(1, OCCURRENCES[point]), action) for point in POINTS for action in actions]


def classification_file(path: Path) -> Path:
    rng = random.Random(0)
    words = {"colour": ["red", "green", "blue"], "animal": ["cat", "dog", "owl"]}
    rows = []
    for i in range(64):
        label = ("colour", "animal")[i % 2]
        rows.append({"text": f"item {i} is a {rng.choice(words[label])}", "label_text": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kind_config(kind: str, tmp_path: Path, alpaca: Path) -> dict:
    train = {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "save_every": 2, "eval_every": 3,
             "threads": 1, "lr": 1e-3, "micro_batch_threads": 1}
    data = {"train": [{"path": str(alpaca), "limit": 40}], "max_length": 96, "eval_ratio": 0.1}
    if kind == "lora":  # dropout: the RNG state must come back too
        return tiny_config(tmp_path, alpaca, train=train, data=data,
                           method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1})
    if kind == "full":
        return tiny_config(tmp_path, alpaca, train=train, data=data, method={"name": "full"})
    file = classification_file(tmp_path / "cls.jsonl")
    return tiny_config(tmp_path, alpaca, task="classification", train=train, method={"name": "lora", "r": 4},
                       data={"train": [{"path": str(file)}], "max_length": 32, "eval_ratio": 0.1})


def write_config(tmp_path: Path, cfg: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "run": {**cfg["run"], "name": name}}))
    return path


def train(path: Path, *, resume: bool = False):
    config, sources = load_config(path)
    return fine_tune(config, sources, resume=resume)


def final_state(run: Path) -> dict[str, torch.Tensor]:
    (last,) = sorted((run / "checkpoints").glob("step-*"))[-1:]
    assert last.name == f"step-{STEPS:06d}"
    return load_file(str(last / "trainable.safetensors"))


def step_losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]  # raw lines: no step twice


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = final_state(a), final_state(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert step_losses(a) == step_losses(b)
    evals = [[(r["step"], r["eval_loss"]) for r in metrics_log.read(run / "metrics.jsonl") if r["kind"] == "eval"]
             for run in (a, b)]
    assert evals[0] == evals[1]


def killed_run(tmp_path: Path, cfg: dict, name: str, at_step: int) -> tuple[Path, Path]:
    """Run ``cfg`` as ``name`` until it dies before the forward of step ``at_step``; (config, run dir)."""
    path = write_config(tmp_path, {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "runs")}}, name)
    armed = install(Fault("before_forward", at_step, "kill"))
    try:
        with pytest.raises(SimulatedKill):
            train(path)
    finally:
        armed.uninstall()
    return path, tmp_path / "runs" / name


@pytest.fixture
def sigint_enabled():
    """A suite started in the background has SIGINT ignored, which tunelab respects: undo it here."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """One uninterrupted run per kind, the reference every interrupted one must match."""
    from conftest import shared

    alpaca = shared("instruct", "llamafactory_demo", "alpaca_en_demo.json")
    tmp = tmp_path_factory.mktemp("straight")
    out = {}
    for kind in ("lora", "full", "classification"):
        cfg = kind_config(kind, tmp, alpaca)
        out[kind] = (cfg, train(write_config(tmp, cfg, kind)).run_dir)
    return out


CASES = [(kind, fault) for kind in ("lora", "full", "classification") for fault in fault_plan(kind, ("sigint", "kill"))]


@pytest.mark.parametrize(("kind", "fault"), CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_interrupt_then_resume_is_bit_identical(tmp_path, straight_runs, sigint_enabled, kind, fault):
    cfg, reference = straight_runs[kind]
    cfg = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "runs")}}
    path = write_config(tmp_path, cfg, kind)
    armed = install(fault)
    try:
        train(path)
        stopped = None  # a Ctrl-C in the last step, its evaluation or its checkpoint: the run finishes
    except UserError as err:
        assert fault.action == "sigint", err
        stopped = str(err)
    except SimulatedKill:
        stopped = "killed"
    finally:
        armed.uninstall()
    assert armed.fired, f"{fault} never happened"
    run = tmp_path / "runs" / kind
    if fault.action == "sigint" and stopped is not None:  # at a step boundary, with that step's checkpoint
        assert stopped.startswith("interrupted at step ") and "--resume" in stopped, stopped
        step = int(stopped.split("interrupted at step ")[1].split(":")[0])
        saved = json.loads((run / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())
        assert saved["step"] == step
    if stopped is not None:
        train(path, resume=True)
    assert_same_run(reference, run)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, straight_runs, sigint_enabled):
    cfg, _ = straight_runs["lora"]
    path = write_config(tmp_path, {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "runs")}}, "twice")
    first, second = install(Fault("before_forward", 3, "sigint")), install(Fault("between_micro_batches", 3, "sigint"))
    try:  # both within step 3: the second stops the run mid-step, where nothing consistent can be saved
        with pytest.raises(UserError, match=r"^interrupted twice at step 2: stopped without saving"):
            train(path)
    finally:
        second.uninstall()
        first.uninstall()
    run = tmp_path / "runs" / "twice"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000002"]


def test_metrics_hold_one_record_per_step_after_resume(tmp_path, straight_runs):
    """Killed after step 5 (checkpoint at 4): steps 5 and 6 are logged again on resume, once each."""
    cfg, reference = straight_runs["lora"]
    path, run = killed_run(tmp_path, cfg, "m", 6)
    assert [s for s, _ in step_losses(run)] == [1, 2, 3, 4, 5]
    train(path, resume=True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if r["kind"] == "train"]
    assert train_steps == list(range(1, STEPS + 1)), train_steps
    assert [r["step"] for r in lines if r["kind"] == "resume"] == [4]
    assert_same_run(reference, run)


def test_rejects_are_not_written_twice_by_a_resumed_run(tmp_path, straight_runs, alpaca_path):
    rows = json.loads(alpaca_path.read_text())[:40]
    rows[3]["output"], rows[7]["instruction"] = "", ""  # an empty reply, an empty prompt: 2 rejects
    data = tmp_path / "with_bad.json"
    data.write_text(json.dumps(rows))
    cfg, _ = straight_runs["lora"]
    path, run = killed_run(tmp_path, {**cfg, "data": {**cfg["data"], "train": [{"path": str(data)}]}}, "rej", 5)
    rejects = run / "rejects.jsonl"
    first = rejects.read_text()
    assert len(first.splitlines()) == 2
    train(path, resume=True)
    assert rejects.read_text() == first


# --------------------------------------------------------------------------- corrupt checkpoints


@pytest.mark.parametrize("damage", ["trainable.safetensors", "optimizer.pt", "state.json", "scheduler.pt"])
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, straight_runs, damage, capsys):
    cfg, reference = straight_runs["lora"]
    path, run = killed_run(tmp_path, cfg, "c", 6)
    victim = run / "checkpoints" / "step-000004" / damage
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # cut short, as a full disk would
    from tunelab.cli import main

    assert main(["train", str(path), "--resume"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"checkpoint step-000004 is corrupt ({damage} does not match its checksum" in out, out
    assert "resuming from step-000002" in out
    assert_same_run(reference, run)


def test_no_checkpoint_verifies_is_one_line(tmp_path, straight_runs, capsys):
    cfg, _ = straight_runs["lora"]
    path, run = killed_run(tmp_path, cfg, "n", 4)
    (run_ckpt,) = (run / "checkpoints").glob("step-*")
    (run_ckpt / "state.json").write_text("{\"step\": ")
    from tunelab.cli import main

    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no checkpoint verifies (step-000002: state.json does not match its checksum" in err


def test_an_old_checkpoint_without_manifest_that_is_truncated_is_one_line(tmp_path, straight_runs, capsys):
    cfg, _ = straight_runs["lora"]
    path, run = killed_run(tmp_path, cfg, "o", 4)
    (ck,) = (run / "checkpoints").glob("step-*")
    (ck / "manifest.json").unlink()
    (ck / "optimizer.pt").write_bytes((ck / "optimizer.pt").read_bytes()[:100])
    from tunelab.cli import main

    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "step-000002: checkpoint is unreadable" in err


# --------------------------------------------------------------------------- subprocesses


def _cli(args: list[str], fault: Fault | None = None, timeout: int = 300, **kwargs):
    """``tunelab ARGS`` with ``fault`` armed, forked from the warm server (:mod:`warm`) with the default SIGINT
    disposition: a suite started in the background (`make test &`) has SIGINT ignored, which tunelab, like any
    program, would keep."""
    return warm.run(args, env=subprocess_env(fault), timeout=timeout, **kwargs)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_stops_cleanly_and_keeps_the_previous_one(tmp_path, straight_runs):
    cfg, reference = straight_runs["full"]
    path = write_config(tmp_path, {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "runs")}}, "full")
    first = _cli(["train", str(path)], Fault("after_update", 3, "sigkill"))
    assert first.returncode == -9, first.stderr[-2000:]
    run = tmp_path / "runs" / "full"
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-000002").iterdir()}
    limit = max(len(b) for b in before.values()) // 2  # the weights no longer fit; the small files still do

    full = _cli(["train", str(path), "--resume"], file_size_limit=limit)  # a write past it fails with EFBIG
    assert full.returncode == 2, full.stderr[-2000:]
    err = full.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "could not write checkpoint step 4 (" in err and "file size limit" in err, err
    assert "the previous checkpoint" in err and "step-000002 is intact" in err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-000002").iterdir()} == before
    assert not list((run / "checkpoints").glob(".tmp-*"))
    done = _cli(["train", str(path), "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(reference, run)


# (fault, the step the session resumes from, then the step a Ctrl-C stops at / None for a death). A rank
# that is asked to stop after the step's all-reduce (during the update, the evaluation or the checkpoint)
# is heard at the next step's all-reduce, so all ranks stop one step later.
# Every fault point at least once, a Ctrl-C and a death on each rank, both kinds while a checkpoint is
# written (the single-process test takes every point x action x method).
TWO_PROCESS_CHAIN = [
    (Fault("before_forward", 2, "sigint", 0), 0, 2),
    (Fault("between_micro_batches", 3, "sigkill", 1), 2, None),  # dies in step 5; checkpoint 4
    (Fault("after_update", 2, "sigint", 1), 4, 7),
    (Fault("during_eval", 1, "sigkill", 0), 7, None),  # dies in step 8's evaluation
    (Fault("during_checkpoint", 1, "sigint", 0), 7, 9),  # rank 0 writes the shared files
    (Fault("during_checkpoint", 1, "sigkill", 0), 9, None),  # dies writing step 10's checkpoint
]


@pytest.mark.slow
def test_two_processes_survive_a_chain_of_faults(tmp_path, alpaca_path):
    """One 2-process run, stopped by each of 6 faults in turn (a Ctrl-C or a death on one rank)
    and resumed after each, ends bit-identical to a 2-process run that never stopped."""
    cfg = kind_config("lora", tmp_path, alpaca_path)
    cfg = {**cfg, "train": {**cfg["train"], "processes": 2, "max_steps": 16, "eval_every": 4},
           "data": {**cfg["data"], "train": [{"path": str(alpaca_path), "limit": 80}]}}
    straight = write_config(tmp_path, cfg, "straight")
    assert _cli(["train", str(straight)]).returncode == 0
    path = write_config(tmp_path, cfg, "chain")
    run = tmp_path / "runs" / "chain"
    for i, (fault, start, stop) in enumerate(TWO_PROCESS_CHAIN):
        out = _cli(["train", str(path), *(["--resume"] if i else [])], fault)
        # rich wraps the line at the terminal width, the path included: join the lines back
        resumed = [int(n) for n in re.findall(r"resumed from\s*\S+ at step (\d+)", "".join(out.stdout.splitlines()))]
        assert resumed == ([start] if start else []), (fault, out.stdout[-2000:])
        if stop is None:  # a death: the launcher stops the other rank and fails
            assert out.returncode not in (0, 2), (fault, out.stderr[-3000:])
        else:  # a Ctrl-C: one line, and that step's checkpoint
            err = out.stderr.strip()
            assert out.returncode == 2 and "Traceback" not in err, (fault, err[-3000:])
            assert f"interrupted at step {stop}:" in err, (fault, err[-3000:])
            assert (run / "checkpoints" / f"step-{stop:06d}" / "manifest.json").is_file()
    done = _cli(["train", str(path), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(tmp_path / "runs" / "straight" / "checkpoints" / "step-000016" / "trainable.safetensors"))
    b = load_file(str(run / "checkpoints" / "step-000016" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(tmp_path / "runs" / "straight") == step_losses(run)
