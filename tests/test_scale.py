"""train.distributed: FSDP2 and DeepSpeed ZeRO over 2 processes (gloo, CPU) equal 1 process; sharded
checkpoints resume exactly; final/ is the ordinary HF / PEFT layout; two "nodes" on loopback; bad input.

The 2-process runs take ~15-30 s each on the 2-core machine (DeepSpeed's own shared-memory op, which
serves only its inference all-reduce, is never built: engines._without_inference_shm_op)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

import warm
from conftest import assert_adam_close, fork_ranks, shared, tiny_config, train_here
from faults import Fault, subprocess_env
from tunelab.train.cpu_tuning import rank_environment, scalable_malloc_libraries
from tunelab.train.shm_collectives import mapped_bytes

COMMON = {"lr": 1e-3, "max_steps": 3, "grad_accum": 2, "schedule": "constant", "threads": 1}
# freeze: the top layer only, so that the lowest trained layer's input needs no gradient (ZeRO-3's leaf modules)
METHODS = {"lora": {"name": "lora", "r": 4, "alpha": 8}, "full": {"name": "full"}, "freeze": {"name": "freeze", "layers": 1}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cfg(root: Path, alpaca_path: Path, name: str, *, method: str, packing: bool, engine: str | None = None,
         **train) -> dict:
    """A tiny run: 1 process x batch 4, or 2 processes x batch 2 with ``engine`` (``fsdp``, ``ds2``, ``ds3``);
    the same global batch, 2 micro-batches per step."""
    t = {**COMMON, "batch_size": 4, **train}
    if engine is not None:
        t.update(batch_size=2, processes=2, distributed="fsdp" if engine == "fsdp" else "deepspeed")
        if engine.startswith("ds"):
            t["deepspeed"] = {"stage": int(engine[2])}
    data = {"train": [{"path": str(alpaca_path), "limit": 96 if packing else 48}], "max_length": 128,
            "packing": packing}
    return tiny_config(root, alpaca_path, run={"name": name, "output_dir": str(root / "runs")}, data=data,
                       method=METHODS[method], train=t)


def _train(root: Path, cfg: dict, *extra: str, env: dict | None = None, check: bool = True):
    """``tunelab train`` of ``cfg``: a 1-process run in this process (conftest.train_here), else through the CLI."""
    path = root / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if cfg["train"].get("processes", 1) == 1 and not extra and env is None and check:
        return train_here(path)
    done = warm.run(["train", str(path), *extra], env=env or ENV, timeout=600, tbb=_tbb_ranks(cfg, env or ENV))
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _tbb_ranks(cfg: dict, env: dict) -> bool:
    """Whether the launcher gives this run's ranks TBB's allocator (cpu_tuning.rank_environment, asked under the
    run's environment); such a run is forked from the warm server that has it."""
    train = cfg["train"]
    with mock.patch.dict(os.environ, env, clear=True):
        return "LD_PRELOAD" in rank_environment(SimpleNamespace(cpu_tuning=train.get("cpu_tuning", True)),
                                                sharded=train.get("distributed", "ddp") != "ddp")


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(final / name))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process reference runs, trained once per (method, packing) the tests ask for."""
    root, runs = tmp_path_factory.mktemp("one"), {}
    alpaca_path = shared("instruct", "llamafactory_demo", "alpaca_en_demo.json")

    def get(method: str, packing: bool) -> Path:
        key = (method, packing)
        if key not in runs:
            cfg = _cfg(root, alpaca_path, f"one-{method}-{packing}", method=method, packing=packing)
            _train(root, cfg)
            runs[key] = root / "runs" / cfg["run"]["name"]
        return runs[key]

    return get


def _from_shards(shards: Path) -> dict[str, torch.Tensor]:
    """The trained tensors as the ranks wrote them (torch.distributed.checkpoint files, or DeepSpeed's ZeRO
    files read by its own zero_to_fp32), named as in final/ (no loss-module prefix, no PEFT adapter name)."""
    if (shards / "zero").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state, prefix = get_fp32_state_dict_from_zero_checkpoint(str(shards), tag="zero"), "model."
    else:
        import torch.distributed.checkpoint as dcp

        meta = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
        state = {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("model.")}
        dcp.load(state, checkpoint_id=str(shards), no_dist=True)
        prefix = "model.model."
    return {k.removeprefix(prefix).replace(".default.", "."): v for k, v in state.items()}


EXTENDED = pytest.mark.extended  # run with pytest -m extended (make test's 15 minutes leave them out)


@pytest.mark.slow
# LoRA under FSDP is the two-node test's run
@pytest.mark.parametrize("engine,method,packing", [
    # ZeRO-3 full: its decoder layers gathered whole (leaf modules); LoRA under ZeRO-3 is the SIGKILL test's run
    ("fsdp", "full", True), pytest.param("ds3", "lora", True, marks=EXTENDED),
    ("ds2", "full", False), pytest.param("fsdp", "lora", False, marks=EXTENDED),
    ("ds3", "full", True), pytest.param("ds2", "lora", True, marks=EXTENDED), ("ds3", "freeze", True),
    pytest.param("fsdp", "freeze", True, marks=EXTENDED),
], ids=["fsdp-full-packed", "zero3-lora-packed", "zero2-full-padded", "fsdp-lora-padded", "zero3-full-packed",
        "zero2-lora-packed", "zero3-freeze-packed", "fsdp-freeze-packed"])
def test_two_sharded_processes_equal_one_process(tmp_path, alpaca_path, one_process, engine, method, packing):
    """Same global batch (1 x 4 x accumulation 2 = 2 x 2 x 2), fp32: per-step losses within 1e-5. final/ holds
    exactly the weights of the ranks' shards in the ordinary layout (plain transformers / PEFT file names; a
    full model's logits from AutoModelForCausalLM equal those of the shards' weights within 1e-5), and they
    are the 1-process run's within 1e-4 (Adam divides by sqrt(v): a near-zero gradient that differs in its
    7th digit moves a weight by up to ~lr x that difference's relative size)."""
    ref = one_process(method, packing)
    done = _train(tmp_path, _cfg(tmp_path, alpaca_path, "two", method=method, packing=packing, engine=engine))
    # the ranks print tunelab's lines only: no library chatter (quiet.py, engines.quiet_deepspeed)
    for chatter in ("built successfully", "Setting accelerator", "OMP_NUM_THREADS", "warnings.warn", "WARNING"):
        assert chatter not in done.stdout + done.stderr, (chatter, done.stdout + done.stderr)
    run = tmp_path / "runs" / "two"
    env = json.loads((run / "env.json").read_text())
    assert env["processes"] == 2 and env["distributed"]["engine"] == ("fsdp" if engine == "fsdp" else "deepspeed")
    # one machine: FSDP2's and ZeRO's all-gathers and reduce-scatters go through /dev/shm (shm_collectives)
    assert env["distributed"]["collectives"] == "shared memory (/dev/shm, 2 ranks)"
    if engine == "ds3":  # ZeRO-3 gathers each decoder layer whole (a leaf module), as FSDP a unit
        assert env["distributed"]["leaf_modules"] == ["LlamaDecoderLayer"]
        # fp32: the optimiser steps the model's own partition (no DeepSpeed master copy); each layer is freed
        # after its forward
        assert env["distributed"]["master_weights"] == "shared"
        assert env["distributed"]["max_reuse_distance"] == 0
    if engine == "fsdp":
        assert env["distributed"]["reduce_scatter"] == "shared memory" and env["distributed"]["buffer_pool"] is True
    # the launcher runs a sharded engine's ranks with TBB's allocator where tbb is installed (make setup installs it),
    # else glibc's returns freed memory at once
    assert env["cpu_tuning"]["malloc"].startswith("TBB" if scalable_malloc_libraries() else "returns freed memory")
    assert env["optimizer"]["fused"] is True  # fused AdamW steps FSDP2's DTensors and ZeRO's flat partitions
    l1, l2 = _losses(ref), _losses(run)
    assert len(l1) == len(l2) == 3
    assert max(abs(a - b) for a, b in zip(l1, l2, strict=True)) < 1e-5, (l1, l2)
    shards = run / "checkpoints" / "step-000003" / "shards"
    assert shards.is_dir() and not (shards.parent / "trainable.safetensors").exists()
    w1, w2, from_shards = _weights(ref), _weights(run), _from_shards(shards)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=0)
        if method == "lora" or k in from_shards:  # tied head: one of its two names is in the shards
            assert torch.equal(w2[k], from_shards[k]), k
    if method == "full":  # consolidated final/: plain transformers loads it, with the shards' logits
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([[1, 200, 300, 400, 500, 600, 700, 2]])
        plain = AutoModelForCausalLM.from_pretrained(run / "final").eval()
        with torch.no_grad():
            a = plain(ids).logits
            plain.load_state_dict(from_shards, strict=False)
            b = plain(ids).logits
        assert (a - b).abs().max().item() < 1e-5


def _one_and_two_sharded(tmp_path: Path, cfg, engine: str) -> tuple[Path, Path, list[float]]:
    """``cfg(name, **train)`` trained in 1 process x batch 4 and in 2 processes x batch 2 under ``engine``
    (``fsdp``, ``ds2``, ``ds3``): the per-step losses are equal within 1e-5 and final/ within 1e-4 (the
    LoRA factors and any head in the adapter file). Returns both runs and the 1-process losses."""
    sharded = ({"distributed": "fsdp"} if engine == "fsdp"
               else {"distributed": "deepspeed", "deepspeed": {"stage": int(engine[2])}})
    _train(tmp_path, cfg("one"))
    _train(tmp_path, cfg("two", batch_size=2, processes=2, **sharded))
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 3 and max(abs(a - b) for a, b in zip(l1, l2, strict=True)) < 1e-5, (l1, l2)
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert_adam_close(w2[k], w1[k], bulk=1e-4)  # Adam amplifies fp32 rounding (see there)
    return one, two, l1


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", pytest.param("ds2", marks=EXTENDED), pytest.param("ds3", marks=EXTENDED)])
def test_a_classification_head_trains_sharded_as_in_one_process(tmp_path, engine):
    """task: classification (LoRA + a new class head) with 2 sharded processes: per-step losses, the evaluation
    (loss and accuracy, every rank scoring its share of the rows) and final/ (the adapter with the head) equal the
    1-process run's with the same global batch."""
    from test_classification import write_task

    # 21 validation rows: rank 0 scores 11 (6 forwards), rank 1 10 (5 and one on a borrowed row, not counted)
    train_file, eval_file = write_task(tmp_path / "train.jsonl", 64, 0), write_task(tmp_path / "eval.jsonl", 21, 1)

    def cfg(name: str, **train) -> dict:
        return {"task": "classification", "run": {"name": name, "output_dir": str(tmp_path / "runs")},
                "model": {"path": "tiny-random-llama"}, "method": {"name": "lora", "r": 4, "alpha": 8},
                "data": {"train": [{"path": str(train_file)}], "eval": [{"path": str(eval_file)}], "max_length": 32},
                "train": {**COMMON, "batch_size": 4, "precision": "fp32", "seed": 0, "eval_every": 3, **train}}

    one, two, _ = _one_and_two_sharded(tmp_path, cfg, engine)
    assert any("score" in k for k in _weights(one))  # the head (PEFT's modules_to_save) is in final/

    def evaluation(run: Path) -> dict:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["kind"] == "eval")

    e1, e2 = evaluation(one), evaluation(two)
    assert e1["eval_loss"] == pytest.approx(e2["eval_loss"], abs=1e-5)
    assert e1["n"] == e2["n"] == 21 and (e1["accuracy"], e1["confusion"]) == (e2["accuracy"], e2["confusion"])


@pytest.mark.slow
@pytest.mark.parametrize("task,loss,engine", [
    ("preference", "dpo", "fsdp"), pytest.param("preference", "kto", "fsdp", marks=EXTENDED),
    pytest.param("preference", "dpo", "ds2", marks=EXTENDED), ("reward", None, "ds3"),
], ids=["dpo-fsdp", "kto-fsdp", "dpo-zero2", "reward-zero3"])
def test_preference_and_reward_train_sharded_as_in_one_process(tmp_path, task, loss, engine):
    """LoRA DPO (the reference: the same sharded model with its adapters off), KTO (its KL estimate over the
    whole step, every rank) and a reward model with 2 sharded processes: per-step losses and final/ equal the
    1-process run's with the same global batch."""
    data_file = shared("preference", "llamafactory_demo", "kto_en_demo.json" if loss == "kto" else "dpo_en_demo.json")

    def cfg(name: str, **train) -> dict:
        c = tiny_config(tmp_path, data_file, run={"name": name, "output_dir": str(tmp_path / "runs")},
                        data={"train": [{"path": str(data_file), "limit": 32}], "max_length": 128},
                        train={**COMMON, "batch_size": 4, **train})
        c["task"] = task
        if loss:
            c["preference"] = {"loss": loss, "beta": 0.5}
        return c

    _, _, losses = _one_and_two_sharded(tmp_path, cfg, engine)
    assert abs(losses[2] - losses[0]) > 1e-4, losses  # the steps changed the model


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ds3", pytest.param("fsdp", marks=EXTENDED)])
def test_sigkill_of_one_rank_then_resume_equals_the_uninterrupted_run(tmp_path, alpaca_path, engine):
    """Rank 1 is killed after its 5th update (checkpoints at steps 2 and 4); --resume reads every rank's
    shards back, and the run ends with the uninterrupted run's losses and weights, bit for bit. Resuming
    on another number of processes is refused in one line."""
    kw = {"max_steps": 6, "save_every": 2, "save_total_limit": 3}
    straight = _cfg(tmp_path, alpaca_path, "straight", method="lora", packing=False, engine=engine, **kw)
    killed = _cfg(tmp_path, alpaca_path, "killed", method="lora", packing=False, engine=engine, **kw)
    _train(tmp_path, straight)
    out = _train(tmp_path, killed, env={**subprocess_env(Fault("after_update", 5, "sigkill", rank=1)),
                                        "OMP_NUM_THREADS": "1"}, check=False)
    assert out.returncode != 0
    run = tmp_path / "runs" / "killed"
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    other = _train(tmp_path, killed, "--resume", "--set", "train.processes=1", check=False)
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert other.returncode == 2 and len(errors) == 1 and "Traceback" not in other.stderr, other.stderr[-2000:]
    assert "the number of processes = 2" in errors[0] and "this run has 1" in errors[0]
    _train(tmp_path, killed, "--resume")
    assert _losses(tmp_path / "runs" / "straight") == _losses(run)
    a, b = _weights(tmp_path / "runs" / "straight"), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _nodes_equal_one_node(tmp_path: Path, alpaca_path: Path, launchers: list[str]) -> None:
    """Two launchers with --nnodes 2 (one rank each, FSDP) meet at 127.0.0.1 and train as the single-node
    2-process run does, once for each of ``launchers`` (tunelab's, torchrun's, accelerate's multi-node flags). The
    "nodes" keep to gloo's collectives (TUNELAB_COLLECTIVES=gloo), as two machines would (they cannot map each
    other's /dev/shm): FSDP's reduce-scatter is then gloo's all-reduce (engines.AllReduceScatter), while the
    single-node run's collectives go through shared memory."""
    from tunelab.train.launch import free_port

    one_node = _cfg(tmp_path, alpaca_path, "node", method="lora", packing=False, engine="fsdp")
    _train(tmp_path, one_node)
    reference = _losses(tmp_path / "runs" / "node")
    assert json.loads((tmp_path / "runs" / "node" / "env.json").read_text())["distributed"]["reduce_scatter"] \
        == "shared memory"
    bin_ = Path(sys.executable).parent
    commands = {
        "tunelab": lambda r, port: ["train", "{config}", "--nnodes", "2", "--node-rank", str(r), "--master-addr",
                                    "127.0.0.1", "--master-port", port],  # forked from the warm server
        "torchrun": lambda r, port: [str(bin_ / "torchrun"), "--nnodes", "2", "--node-rank", str(r),
                                     "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                                     "-m", "tunelab.cli", "train", "{config}"],
        "accelerate": lambda r, port: [str(bin_ / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2",
                                       "--machine_rank", str(r), "--num_processes", "2", "--main_process_ip",
                                       "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
                                       "--dynamo_backend", "no", "-m", "tunelab.cli", "train", "{config}"],
    }
    for name in launchers:
        two = _cfg(tmp_path, alpaca_path, f"nodes-{name}", method="lora", packing=False, engine="fsdp")
        two["train"]["processes"] = 1  # one rank a node
        path = tmp_path / f"nodes-{name}.yaml"
        path.write_text(yaml.safe_dump(two))
        port = str(free_port())
        env = {**ENV, "TUNELAB_COLLECTIVES": "gloo"}
        argvs = [[x.replace("{config}", str(path)) for x in commands[name](r, port)] for r in (0, 1)]
        procs = [warm.start(argv, env=env, tbb=_tbb_ranks(two, env)) if name == "tunelab" else
                 subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for argv in argvs]
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], (name, [o[1][-2000:] for o in outs])
        nodes = tmp_path / "runs" / f"nodes-{name}"
        env = json.loads((nodes / "env.json").read_text())
        assert env["processes"] == 2, name
        assert env["distributed"]["collectives"] == "gloo (TUNELAB_COLLECTIVES=gloo)", name
        assert env["distributed"]["reduce_scatter"] == "all_reduce", name
        assert _losses(nodes) == pytest.approx(reference, abs=1e-6), name


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_one_node_with_two_processes(tmp_path, alpaca_path):
    """tunelab's `--nnodes 2 --node-rank R` and torchrun's multi-node flags (see _nodes_equal_one_node)."""
    _nodes_equal_one_node(tmp_path, alpaca_path, ["tunelab", "torchrun"])


@EXTENDED
@pytest.mark.slow
def test_two_accelerate_nodes_on_loopback_equal_one_node_with_two_processes(tmp_path, alpaca_path):
    """`accelerate launch --num_machines 2 --machine_rank R` (its single-node launch is in make test:
    test_distributed's padded-accelerate-launch)."""
    _nodes_equal_one_node(tmp_path, alpaca_path, ["accelerate"])


# ---------------------------------------------------------------------------- bad input: one line each


def _problems(tmp_path, alpaca_path, **sections) -> str:
    from tunelab.config import load_config
    from tunelab.errors import ConfigError

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, alpaca_path, **sections)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


@pytest.mark.parametrize("train,method,expected", [
    ({"distributed": "deepspeed", "deepspeed": {"stage": 4}}, None, "train.deepspeed.stage"),
    ({"deepspeed": {"offload_optimizer": "cpu"}}, None, "train.deepspeed is set, but train.distributed is ddp"),
    ({"fsdp": {"offload_params": True}}, None, "train.fsdp is set, but train.distributed is ddp"),
    ({"distributed": "deepspeed", "deepspeed": {"stage": 2, "offload_params": "cpu"}}, None,
     "offload_params: cpu needs ZeRO stage 3 (got train.deepspeed.stage: 2)"),
    ({"distributed": "deepspeed", "deepspeed": {"stage": 3}}, {"name": "prefix"},
     "method.name=prefix with train.distributed: deepspeed is not supported"),
    ({"distributed": "deepspeed", "deepspeed": {"stage": 3}}, {"name": "lora", "dora": True},
     "method.dora: true with train.deepspeed.stage: 3"),
    ({"distributed": "fsdp"}, {"name": "qlora"}, "method.name=qlora with train.distributed: fsdp"),
    ({"distributed": "deepspeed", "deepspeed": {"stage": 3}}, "preference",
     "task: preference with train.deepspeed stage 3 is not supported"),
    ({"distributed": "fsdp"}, "multitask", "task: multitask with train.distributed: fsdp is not supported"),
], ids=["unknown-stage", "ds-offload-under-ddp", "fsdp-offload-under-ddp", "param-offload-stage-2",
        "zero3-prefix", "zero3-dora", "fsdp-qlora", "zero3-preference", "fsdp-multitask"])
def test_bad_combinations_are_one_line_naming_the_fields(tmp_path, alpaca_path, train, method, expected):
    """``method`` is a method section, or a task name."""
    if isinstance(method, str):
        text = _problems(tmp_path, alpaca_path, train=train, task=method)
        assert expected in text, text
        return
    sections = {"train": train, **({"method": method} if method else {})}
    text = _problems(tmp_path, alpaca_path, **sections)
    assert expected in text, text
    line = next(x for x in text.splitlines() if expected in x)
    assert len(line) < 400


def test_the_config_and_the_engines_agree_on_which_engines_shard():
    """The launcher reads ``train.sharded`` from the config (it never imports the engines); the loop asks the
    engine. The two must say the same for every engine the config accepts."""
    from tunelab.config import TrainSection
    from tunelab.train.engines import ENGINES

    names = TrainSection.model_fields["distributed"].annotation.__args__
    assert sorted(names) == sorted(ENGINES)
    assert {n: TrainSection(distributed=n).sharded for n in names} == {n: ENGINES[n].sharded for n in names}
    assert [n for n in names if ENGINES[n].sharded] == ["fsdp", "deepspeed"]


def test_objectives_needing_a_second_view_are_refused_under_sharding(tmp_path, alpaca_path):
    text = _problems(tmp_path, alpaca_path, train={"distributed": "fsdp"}, objectives={"l2sp": {"weight": 0.01}})
    assert "objectives.l2sp with train.distributed: fsdp is not supported" in text


def test_deepspeed_missing_is_one_line(monkeypatch, tmp_path, alpaca_path):
    from tunelab.config import load_config
    from tunelab.errors import UserError
    from tunelab.train import engines

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, alpaca_path, train={"distributed": "deepspeed"})))
    cfg, _ = load_config(path)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # an import of it fails as if not installed
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=2)
    with pytest.raises(UserError, match=r"train.distributed: deepspeed needs deepspeed: pip install "
                                        r"'tunelab\[deepspeed\]'"):
        engines.make_engine(cfg, acc, "fp32")


def test_mlflow_is_hidden_only_while_deepspeed_imports(monkeypatch):
    """engines.import_deepspeed: while DeepSpeed imports, `import mlflow` fails (its autotuner then skips mlflow);
    afterwards, and when the import fails, nothing of it is left in sys.modules; with mlflow or DeepSpeed
    imported already, nothing is hidden."""
    from tunelab.errors import UserError
    from tunelab.train import engines

    seen = []

    def fake_require(module, **_):
        try:
            import mlflow  # noqa: F401
            seen.append("importable")
        except ImportError:
            seen.append("hidden")
        if module == "deepspeed" and len(seen) == 2:
            raise UserError("train.distributed: deepspeed needs deepspeed")
        return "deepspeed module"

    monkeypatch.setattr(engines, "require", fake_require)
    for name in ("mlflow", "deepspeed"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert engines.import_deepspeed() == "deepspeed module" and "mlflow" not in sys.modules
    with pytest.raises(UserError):
        engines.import_deepspeed()
    assert "mlflow" not in sys.modules
    monkeypatch.setitem(sys.modules, "mlflow", SimpleNamespace())  # imported already (by the tracker)
    engines.import_deepspeed()
    assert seen == ["hidden", "hidden", "importable"]


@pytest.mark.extended
def test_deepspeed_imports_without_mlflow_and_mlflow_imports_after_it():
    """The real DeepSpeed (9 s here: a new interpreter, where neither is imported yet): its autotuner does not
    import mlflow (1.7 s of every rank's start here), and mlflow stays importable for tunelab's tracker."""
    if not _has_deepspeed():
        pytest.skip("DeepSpeed is not installed: pip install 'tunelab[deepspeed]'")
    code = ("import sys\nfrom tunelab.train.engines import import_deepspeed\nimport_deepspeed()\n"
            "from deepspeed.autotuning import autotuner\nprint(autotuner.has_mlflow, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    # not imported, and no None left in sys.modules: a later `import mlflow` imports it
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


def test_a_users_deepspeed_json_is_merged_and_a_conflict_names_both_values(tmp_path, alpaca_path):
    from tunelab.config import load_config
    from tunelab.errors import UserError
    from tunelab.train.engines import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                                "zero_optimization": {"stage": 3, "overlap_comm": False}, "bf16": {"enabled": "auto"}}))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, alpaca_path, train={
        "distributed": "deepspeed", "batch_size": 2, "grad_accum": 4, "deepspeed": {"config": str(user)}})))
    cfg, _ = load_config(path)
    merged = deepspeed_config(cfg, world=2, precision="fp32")
    assert merged["train_micro_batch_size_per_gpu"] == 2 and merged["train_batch_size"] == 16
    # the user's stage and settings kept; ZeRO-3 frees each layer after its forward (reshard_after_forward)
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": False, "stage3_max_reuse_distance": 0}
    assert merged["bf16"] == {"enabled": False} and merged["gradient_clipping"] == 1.0
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(UserError, match=r"train_micro_batch_size_per_gpu is 8 in .*ds.json, but train.batch_size "
                                        r"gives 2"):
        deepspeed_config(cfg, world=2, precision="fp32")
    keep = cfg.model_copy(update={"train": cfg.train.model_copy(update={"deepspeed": cfg.train.deepspeed.model_copy(
        update={"reshard_after_forward": False})})})
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert deepspeed_config(keep, world=2, precision="fp32")["zero_optimization"]["stage3_max_reuse_distance"] == 10**9
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 5e7}}))
    assert deepspeed_config(cfg, world=2, precision="fp32")["zero_optimization"]["stage3_max_reuse_distance"] == 5e7
    with pytest.raises(UserError, match=r"train.deepspeed: reshard_after_forward is false, and zero_optimization."
                                        r"stage3_max_reuse_distance is 50000000.0 in .*ds.json. Keep one of the two"):
        deepspeed_config(keep, world=2, precision="fp32")
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(UserError, match=r"train.deepspeed.reshard_after_forward applies to ZeRO stage 3 \(got stage 2"):
        deepspeed_config(keep, world=2, precision="fp32")
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))  # stage 3 from the JSON, for a task without it
    with pytest.raises(UserError, match=r"task: preference with train.deepspeed stage 3 is not supported.*"
                                        r"\(zero_optimization.stage is 3 in .*ds.json\)"):
        deepspeed_config(cfg.model_copy(update={"task": "preference"}), world=2, precision="fp32")


def test_zero_bucket_sizes_left_out_or_auto_follow_the_hidden_size_and_a_users_value_stays():
    """As transformers' Trainer fills them (hidden², 0.9 hidden², 10 hidden), not DeepSpeed's 5e8-element buckets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.train.engines import bucket_sizes

    model = torch.nn.Sequential(LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)))
    three = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 5000}}
    bucket_sizes(three, model)
    assert three["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1024, "stage3_prefetch_bucket_size": 5000,
                                          "stage3_param_persistence_threshold": 320}
    two = {"zero_optimization": {"stage": 2}}
    bucket_sizes(two, model)
    assert two["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1024}


# ---------------------------------------------------------------------------- memory per rank (tunelab advise)


def _sharded_rank_peaks(rank: int, world: int, port: int, model: str, out: str,
                        runs: list[tuple[str, str]]) -> None:
    """One rank of 2-rank runs of two full fine-tuning steps, one run per (advisor engine row, precision)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # as a launcher sets it (DeepSpeed reads it)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for distributed, precision in runs:
        _sharded_rank_peak(rank, world, model, Path(out, f"{distributed}-{precision}-{rank}"), distributed, precision)
    dist.destroy_process_group()


def _sharded_rank_peak(rank: int, world: int, model: str, out: Path, distributed: str, precision: str) -> None:
    """A rank's run under ``distributed`` (an advisor engine row but DDP) in ``precision``: its peak of live tensor bytes (the
    advisor's measure; TensorMemory counts a DTensor as its local shard and, ``resizable``, a storage that FSDP2
    resized to 0 or ZeRO-3 swapped for an empty one as freed) written to ``out``, with the bytes of the
    collectives' own buffers (the shared memory they map, the buffers FSDP's pool keeps; not the model's) and,
    under ZeRO, of the flat buffers it keeps between steps. Each run counts only the tensors it makes."""
    from tunelab.search.advise import build_for_training, synthetic_batch
    from tunelab.search.memory import TensorMemory, model_tensors
    from tunelab.train.build import build_optimizer
    from tunelab.train.engines import make_engine

    cfg = _advise_cfg(model, distributed, precision)
    model_, loss, optimizer = build_for_training(cfg, precision)
    acc = SimpleNamespace(device=torch.device("cpu"), is_main_process=rank == 0, num_processes=world,
                          autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"))
    engine = make_engine(cfg, acc, precision)
    engine.shard(loss)
    optimizer = build_optimizer(model_, cfg.train)  # FSDP2 replaced the parameters: an optimiser on the shards
    tracker = TensorMemory(resizable=True)
    if distributed == "fsdp":
        step_model = loss
        tracker.track(model_tensors(model_, optimizer))
    else:
        step_model, zero = engine.prepare(loss, optimizer)
        assert engine.master_weights == ("shared" if (distributed, precision) == ("zero3", "fp32") else "fp32 copy")
        tracker.track([*_zero_buffers(zero), *model_.buffers()])
    batch = synthetic_batch(cfg, 2048)
    with tracker:
        for _ in range(2):
            with engine.context(step_model, True):  # FSDP: autocast; ZeRO: the accumulation boundary
                out_ = step_model(**batch)
            engine.backward(out_.total / out_.count)
            if distributed == "fsdp":
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                step_model.step()
    buffers = mapped_bytes(world, engine.shm.piece_bytes) if engine.shm is not None else 0
    pool = getattr(engine, "pool", None)
    buffers += sum(t.numel() * t.element_size() for kept in pool.kept.values() for t in kept) if pool else 0
    states = 0  # ZeRO: the bytes it keeps between steps (weights, gradient partition, masters, optimiser state)
    if distributed != "fsdp":
        kept = [*_zero_buffers(zero),
                *(v for st in zero.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())]
        states = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}.values())
    out.write_text(f"{tracker.peak} {buffers} {states}")


def _zero_buffers(zero) -> list[torch.Tensor]:
    """DeepSpeed's flat buffers of this rank: ZeRO-3's partition of the model, its gradient partition and the
    masters (the partition itself where shared); ZeRO-1/2's whole flattened model and its fp32 masters."""
    if hasattr(zero, "lp_param_buffer"):  # with the optimiser offloaded, the masters also keep a gradient buffer
        masters = zero.fp32_partitioned_groups_flat
        return [zero.lp_param_buffer, zero.grad_partitions_flat_buffer, *masters,
                *(m.grad for m in masters if m.grad is not None)]
    return [*zero.bit16_groups_flat, *zero.single_partition_of_fp32_groups]


def _advise_cfg(model: str, distributed: str = "fsdp", precision: str = "fp32"):
    """A 2-process full fine-tuning config for the advisor's engine row ``distributed``."""
    from tunelab.config import load_config

    if distributed == "fsdp":
        engine = {"distributed": "fsdp"}
    else:
        zero = {"stage": int(distributed[4]), **({"offload_optimizer": "cpu"} if distributed.endswith("offload") else {})}
        engine = {"distributed": "deepspeed", "deepspeed": zero}
    return load_config(None, base={
        "model": {"path": model}, "method": {"name": "full"}, "data": {"train": [{"path": "unused.jsonl"}],
                                                                       "max_length": 64},
        "train": {"batch_size": 2, "precision": precision, "max_grad_norm": None, "processes": 2, **engine}})[0]


@pytest.mark.slow
def test_per_rank_estimates_are_within_20_percent_of_the_measured_peaks(tmp_path):
    """`tunelab advise`'s per-rank memory for FSDP and ZeRO-1/2/3 (and ZeRO-3 with the optimiser offloaded) with 2
    processes, in fp32 and bf16, from its 1-process probes, against two real ranks' peak of live tensors (a
    6-layer Llama whose layers hold most of the weights). ZeRO-3 runs with its defaults here: each layer freed
    after its forward, and in fp32 the optimiser stepping the model's own partition
    (engines._share_master_weights); ZeRO-1/2, bf16 and offload keep DeepSpeed's fp32 copy of the partition
    beside the model (offload: and a gradient buffer for it), which the estimate counts and ``states`` (the flat
    buffers kept between steps, fp32) checks to 5%."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.search.advise import Probes, estimate_with_layer, per_rank
    from tunelab.train.launch import free_port

    engines = ["fsdp"] + (["zero1", "zero2", "zero3", "zero3+offload"] if _has_deepspeed() else [])
    runs = [(e, p) for p in ("fp32", "bf16") for e in engines]
    folder = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                     ).save_pretrained(folder)
    probes, steps = Probes(str(folder)), {}
    try:  # one process's step in each precision, the same under every engine's config
        for precision in ("fp32", "bf16"):
            steps[precision] = estimate_with_layer(_advise_cfg(str(folder), precision=precision), "full", probes,
                                                   precision=precision, checkpointing=False)
    finally:
        probes.close()
    fork_ranks(_sharded_rank_peaks, (2, free_port(), str(folder), str(tmp_path), runs), 2)
    single, _, _, _ = steps["fp32"]
    w, g, o = single.weights, single.gradients, single.optimizer
    kept = {"zero3": (w + g + o) / 2,  # half of one process's weights, gradients and optimiser state: one copy
            "zero3+offload": (w + g + o) / 2 + w / 2 + g / 2,  # and DeepSpeed's fp32 copy, with its gradient buffer
            "zero2": w + w / 2 + o / 2, "zero1": w + w / 2 + o / 2}  # the whole model, half the copy and the state
    for distributed, precision in runs:
        measured, buffers, states = max(
            tuple(map(int, (tmp_path / f"{distributed}-{precision}-{r}").read_text().split())) for r in (0, 1))
        one, trainable, _, layer = steps[precision]
        predicted = per_rank(one, layer, 6, distributed, 2, "cpu", trainable=trainable, precision=precision).peak
        assert buffers > 0, distributed  # the ranks gathered and scattered through /dev/shm (FSDP: a buffer pool)
        assert abs(predicted / measured - 1) < 0.20, (distributed, precision, predicted, measured)
        if distributed == "fsdp":  # sharding measurably lowers the model's share of the peak
            assert measured - buffers < 0.8 * per_rank(one, layer, 6, "ddp", 2, "cpu").peak, precision
        elif precision == "fp32":
            assert abs(states / kept[distributed] - 1) < 0.05, (distributed, states, kept[distributed])


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "exec"])
def test_a_failing_rank_on_another_node_is_named_with_its_host(tmp_path, monkeypatch, capsys, fork):
    """Node 1 of 2 (one rank: global rank 1) fails: its launcher stops and names the rank and this host."""
    import socket

    from test_distributed import fake_ranks
    from tunelab.train import launch

    how = fake_ranks(tmp_path, monkeypatch, fork, 'if [ "$RANK" = 1 ] && [ "$WORLD_SIZE" = 2 ] && '
                     '[ "$MASTER_PORT" = 29999 ]; then exit 3; fi\nexec sleep 120')
    nodes = launch.Nodes(nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=29999)
    assert launch.run_processes(["train", "x.yaml"], 1, nodes=nodes, **how) == 3
    err = capsys.readouterr().err
    assert f"process 1 of 2 on host {socket.gethostname()} (node 1) stopped with exit code 3" in err


@pytest.mark.parametrize("nodes,expected", [
    ({"nnodes": 2, "node_rank": 2, "master_port": 29500}, "--node-rank 2 with --nnodes 2"),
    ({"nnodes": 2, "node_rank": 0}, "--nnodes 2 needs --master-port"),
])
def test_bad_node_flags_are_one_line(nodes, expected):
    from tunelab.errors import UserError
    from tunelab.train import launch

    with pytest.raises(UserError, match=expected):
        launch.run_processes(["train", "x.yaml"], 1, nodes=launch.Nodes(**nodes))


@pytest.mark.slow
def test_fsdp_evaluates_rows_that_do_not_split_evenly_over_the_ranks(tmp_path):
    """task: generative_classification, 9 validation rows, 2 FSDP ranks x batch 2. The eval loss: rank 0 has 5 rows
    (3 forwards), rank 1 has 4 (2); generation (8 prompts a call): rank 0 makes 2 calls, rank 1 one. FSDP's
    forward is collective, so rank 1 runs one more of each on a borrowed row, not counted (the run hung or
    failed before), and generate runs with synced_gpus, the root unit gathered. The eval loss and the answers'
    metrics equal a 1-process run's over the same rows."""
    from test_classification import write_task

    train_file, eval_file = write_task(tmp_path / "train.jsonl", 32, 0), write_task(tmp_path / "eval.jsonl", 9, 1)
    evaluated = {}
    for name, sharded in (("one-eval", {}), ("two-eval", {"batch_size": 2, "processes": 2, "distributed": "fsdp"})):
        cfg = {"task": "generative_classification", "run": {"name": name, "output_dir": str(tmp_path / "runs")},
               "model": {"path": "tiny-random-llama"}, "method": METHODS["lora"],
               "data": {"train": [{"path": str(train_file)}], "eval": [{"path": str(eval_file)}], "max_length": 128},
               "train": {**COMMON, "batch_size": 4, "precision": "fp32", "seed": 0, "eval_every": 3, **sharded}}
        _train(tmp_path, cfg)
        rows = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        evaluated[name] = [r for r in rows if r["kind"] == "eval"]
    one, two = evaluated["one-eval"], evaluated["two-eval"]
    assert len(one) == len(two) == 1
    assert two[0]["eval_loss"] == pytest.approx(one[0]["eval_loss"], abs=1e-5)
    assert one[0]["n"] == two[0]["n"] == 9 and one[0]["confusion"] == two[0]["confusion"]
