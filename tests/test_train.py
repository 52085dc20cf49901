"""End-to-end training on tiny-random-llama: the run directory, what changes, and the invariants.

Invariants (all fp32 on CPU): batch 8 = batch 2 x accumulation 4 (same losses within 1e-5),
packed = unpacked, resume after SIGKILL = uninterrupted (bit-identical weights),
1 process = 2 processes (in tests/test_distributed.py).
"""

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
from conftest import tiny_config, train_here
from faults import Fault, subprocess_env
from tunelab.config import load_config
from tunelab.train.recipe import fine_tune


def run_config(tmp_path: Path, cfg: dict, name: str):
    cfg = {**cfg, "run": {**cfg["run"], "name": name}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config, sources = load_config(path)
    return fine_tune(config, sources)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    return [by_step[k] for k in sorted(by_step)]


def test_lora_run_directory_and_what_changed(tmp_path, alpaca_path):
    from peft import PeftModel

    from tunelab.models.load import load_model

    cfg = tiny_config(tmp_path, alpaca_path, train={"epochs": 3, "eval_every": 4, "save_every": 4, "lr": 5e-2},
                      data={"train": [{"path": str(alpaca_path), "limit": 48}], "eval_ratio": 0.1,
                            "max_length": 128})
    out = run_config(tmp_path, cfg, "lora")
    run = out.run_dir
    for name in ("config.yaml", "config.sources.json", "env.json", "data.json", "metrics.jsonl", "summary.json",
                 "final/adapter_config.json", "final/adapter_model.safetensors", "final/tokenizer.json",
                 "final/tunelab.json", "best/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    total = out.summary["total_steps"]
    assert total == 3 * -(-43 // 8)  # 48 rows, 10% held out; 3 epochs of ceil(43 / 8) steps
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000016", f"step-{total:06d}"]
    env = json.loads((run / "env.json").read_text())
    assert env["precision"] == "fp32" and env["processes"] == 1

    losses = train_losses(run)
    assert len(losses) == total
    # a random 64-wide model with rank-4 adapters can only learn so much; it must still learn
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses

    # exactly the LoRA matrices were trained; the base weights are bit-identical to a fresh load
    base = load_model("tiny-random-llama")
    base_sd = base.state_dict()
    tuned = out.model
    for name, p in tuned.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
        else:
            assert not p.requires_grad, name
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base_sd[key]), name
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if "lora_B" in n)

    # the saved adapter reloads onto a fresh base and gives the same logits
    reloaded = PeftModel.from_pretrained(load_model("tiny-random-llama"), run / "final").eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_full_fine_tuning_through_the_cli(tmp_path, alpaca_path, capsys):
    from transformers import AutoModelForCausalLM

    from tunelab.cli import main
    from tunelab.models.load import load_model

    cfg = tiny_config(tmp_path, alpaca_path, method={"name": "full"}, train={"lr": 1e-2, "max_steps": 6},
                      run={"name": "full"})
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--set", "train.weight_decay=0.01"]) == 0
    run = tmp_path / "runs" / "full"
    assert "train.weight_decay = --set" in (run / "config.yaml").read_text()
    losses = train_losses(run)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    plain = AutoModelForCausalLM.from_pretrained(run / "final").eval()  # plain transformers loads it
    base = load_model("tiny-random-llama").state_dict()
    tuned = plain.state_dict()
    assert all(not torch.equal(tuned[k], base[k]) for k in base)  # every weight was trained
    assert "6 / 6" in capsys.readouterr().out


def test_a_single_process_steps_with_fused_adamw_and_it_equals_the_loop(tmp_path, alpaca_path, monkeypatch):
    """The plain engine asks for torch's fused AdamW (build_optimizer's docstring has the speed-up); its steps
    equal the per-tensor loop's within float rounding."""
    import tunelab.train.build as build
    from tunelab.config import TrainSection
    from tunelab.models.load import load_model

    built = []
    real = build.build_optimizer
    monkeypatch.setattr(build, "build_optimizer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    cfg = tiny_config(tmp_path, alpaca_path, method={"name": "full"}, train={"max_steps": 1}, run={"name": "fused"})
    run_config(tmp_path, cfg, "fused")
    assert built and built[0].defaults["fused"] is True

    models = [load_model("tiny-random-llama") for _ in range(2)]
    t = TrainSection(lr=1e-2, weight_decay=0.01)
    optimizers = [real(models[0], t, fused=True), real(models[1], t, fused=False)]
    assert [o.defaults["fused"] for o in optimizers] == [True, None]
    torch.manual_seed(0)
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in models[0].named_parameters()}
        for model, optimizer in zip(models, optimizers, strict=True):
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
            optimizer.step()
    fused, loop = (dict(m.named_parameters()) for m in models)
    base = dict(load_model("tiny-random-llama").named_parameters())
    assert all(not torch.equal(fused[n], base[n]) for n in base)  # three steps moved every weight
    for n in loop:
        torch.testing.assert_close(fused[n], loop[n], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_batch_8_equals_batch_2_times_accumulation_4(tmp_path, alpaca_path, packing):
    common = {"lr": 1e-3, "max_steps": 4, "schedule": "constant"}
    data = {"train": [{"path": str(alpaca_path), "limit": 96 if packing else 48}], "max_length": 128,
            "packing": packing}
    a = run_config(tmp_path, tiny_config(tmp_path, alpaca_path, data=data,
                                         train={**common, "batch_size": 8, "grad_accum": 1}), "b8")
    b = run_config(tmp_path, tiny_config(tmp_path, alpaca_path, data=data,
                                         train={**common, "batch_size": 2, "grad_accum": 4}), "b2x4")
    # on 2+ threads the 4 micro-batches of b2x4 run 2 at a time (train.micro_batch_threads auto)
    threads = json.loads((b.run_dir / "env.json").read_text())["threads"]
    assert (a.summary["micro_batch_threads"], b.summary["micro_batch_threads"]) == (1, 2 if threads >= 2 else 1)
    la, lb = train_losses(a.run_dir), train_losses(b.run_dir)
    assert len(la) == 4
    for x, y in zip(la, lb, strict=True):
        assert abs(x - y) < 1e-5, (la, lb)
    wa = load_file(str(a.run_dir / "final" / "adapter_model.safetensors"))
    wb = load_file(str(b.run_dir / "final" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_micro_batches_in_threads_equal_one_at_a_time(tmp_path, alpaca_path):
    # the same 4 micro-batches per step, one after the other or 2 at a time in worker threads, with an
    # L2-SP penalty (added once per step): the gradient sums differ only in rounding
    common = {"lr": 1e-3, "max_steps": 3, "schedule": "constant", "batch_size": 2, "grad_accum": 4, "threads": 2}
    data = {"train": [{"path": str(alpaca_path), "limit": 96}], "max_length": 128, "packing": True}
    objectives = {"l2sp": {"weight": 0.5}}
    one = run_config(tmp_path, tiny_config(tmp_path, alpaca_path, data=data, objectives=objectives,
                                           train={**common, "micro_batch_threads": 1}), "one")
    two = run_config(tmp_path, tiny_config(tmp_path, alpaca_path, data=data, objectives=objectives,
                                           train={**common, "micro_batch_threads": 2}), "two")
    assert (one.summary["micro_batch_threads"], two.summary["micro_batch_threads"]) == (1, 2)
    for x, y in zip(train_losses(one.run_dir), train_losses(two.run_dir), strict=True):
        assert abs(x - y) < 1e-6 * abs(x), (x, y)
    wa = load_file(str(one.run_dir / "final" / "adapter_model.safetensors"))
    wb = load_file(str(two.run_dir / "final" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)  # it trained
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_micro_batch_threads_where_they_do_not_apply(tmp_path, alpaca_path):
    from tunelab.errors import UserError

    cfg = tiny_config(tmp_path, alpaca_path, train={"micro_batch_threads": 2, "gradient_checkpointing": True,
                                                    "max_steps": 1})
    with pytest.raises(UserError, match=r"^train\.micro_batch_threads: 2 .* gradient checkpointing\. Set "
                                        r"train\.micro_batch_threads: 1"):
        run_config(tmp_path, cfg, "ckpt")
    # the default turns itself off for full fine-tuning (each in-flight micro-batch holds a full gradient)
    out = run_config(tmp_path, tiny_config(tmp_path, alpaca_path, method={"name": "full"},
                                           train={"max_steps": 1, "threads": 2}), "full")
    assert out.summary["micro_batch_threads"] == 1


def test_packed_training_matches_unpacked(tmp_path, alpaca_path):
    # one row per step both ways: the packed run packs all 12 samples into rows of 512 tokens
    # and takes them all in one step; the unpacked run takes the same 12 samples in one step.
    data = {"train": [{"path": str(alpaca_path), "limit": 12}], "max_length": 512}
    common = {"lr": 1e-3, "max_steps": 3, "grad_accum": 1}
    packed = run_config(tmp_path, tiny_config(tmp_path, alpaca_path, data={**data, "packing": True},
                                              train={**common, "batch_size": 12}), "packed")
    plain = run_config(tmp_path, tiny_config(tmp_path, alpaca_path, data=data, train={**common, "batch_size": 12}),
                       "plain")
    lp, lu = train_losses(packed.run_dir), train_losses(plain.run_dir)
    assert json.loads((packed.run_dir / "data.json").read_text())["train_rows"] < 12
    for x, y in zip(lp, lu, strict=True):
        assert abs(x - y) < 1e-4 * abs(y), (lp, lu)


def _cli(args: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``tunelab ARGS`` in a new interpreter (what a user's shell starts: the import-time messages included);
    commands that need no more than the CLI's code run in a fork of the warm server (:mod:`warm`)."""
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


@pytest.mark.slow
# the padded case: -m extended (make test's 15 minutes); packed rows are the harder case and stay
@pytest.mark.parametrize("packing", [pytest.param(False, marks=pytest.mark.extended), True], ids=["padded", "packed"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, alpaca_path, packing):
    # padded: LoRA dropout (RNG state in the checkpoints), micro-batches one at a time; packed: no dropout,
    # micro-batches 2 at a time in worker threads (their gradients are summed in micro-batch order)
    cfg = tiny_config(tmp_path, alpaca_path,
                      train={"max_steps": 8, "save_every": 2, "lr": 1e-3, "threads": 2,
                             "micro_batch_threads": 2 if packing else 1},
                      method={"name": "lora", "r": 4, "dropout": 0.0 if packing else 0.1},
                      data={"train": [{"path": str(alpaca_path), "limit": 128 if packing else 48}],
                            "max_length": 128, "packing": packing})
    for name in ("straight", "killed"):
        c = {**cfg, "run": {**cfg["run"], "name": name}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(c))
    train_here(tmp_path / "straight.yaml")
    killed = warm.run(["train", str(tmp_path / "killed.yaml")], env=subprocess_env(Fault("after_update", 5, "sigkill")))
    assert killed.returncode == -9  # SIGKILL, mid-run
    run = tmp_path / "runs" / "killed"
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    again = warm.run(["train", str(tmp_path / "killed.yaml")])
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    resumed = warm.run(["train", str(tmp_path / "killed.yaml"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "runs" / "straight" / "final" / "adapter_model.safetensors"))
    b = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert train_losses(tmp_path / "runs" / "straight") == train_losses(run)


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, alpaca_path):
    cfg = tiny_config(tmp_path, alpaca_path, method={"name": "full"},
                      train={"lr": 1e12, "max_grad_norm": None, "max_steps": 20, "max_nonfinite_steps": 3,
                             "optimizer": "sgd", "momentum": 0.0})
    path = tmp_path / "div.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = warm.run(["train", str(path)])
    assert out.returncode == 2
    assert "training diverged" in out.stderr and "Traceback" not in out.stderr
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in metrics if m.get("skipped")) == 3
    assert list((tmp_path / "runs" / "tiny" / "checkpoints").glob("step-*"))


def test_early_stopping_keeps_the_best(tmp_path, alpaca_path):
    # a learning rate far too high makes the eval loss climb after the first evaluations
    cfg = tiny_config(tmp_path, alpaca_path, method={"name": "full"},
                      data={"train": [{"path": str(alpaca_path), "limit": 48}], "eval_ratio": 0.2, "max_length": 128},
                      train={"lr": 0.3, "optimizer": "adamw", "max_steps": 40, "eval_every": 1,
                             "early_stopping_patience": 2, "max_grad_norm": None, "schedule": "constant"})
    out = run_config(tmp_path, cfg, "early")
    assert out.summary["stop_reason"] == "early_stopping"
    assert out.summary["step"] < 40
    evals = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    best = json.loads((out.run_dir / "best.json").read_text())
    assert best["eval_loss"] == min(e["eval_loss"] for e in evals)
    assert (out.run_dir / "best" / "model.safetensors").is_file()


def test_cli_user_errors_are_one_line(tmp_path, alpaca_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"path": "tiny-random-llama"}, "data": {"train": [{"path": "nope.jsonl"}]},
                                   "train": {"lr": "fast"}}))
    out = _cli(["train", str(bad)])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "train.lr" in out.stderr and "'fast'" in out.stderr
    bad.write_text(yaml.safe_dump({"model": {"path": "tiny-random-llama"},
                                   "data": {"train": [{"path": str(tmp_path / 'nope.jsonl')}]},
                                   "run": {"output_dir": str(tmp_path / "runs")}}))
    out = _cli(["train", str(bad)])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nope.jsonl" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def _leaf_fields(model, prefix: str = ""):
    """(dotted path, field) of every leaf of a pydantic model, walked from ``model_fields`` (a nested
    section is ``a.b``, a list or optional of sections ``a[].b``): independent of describe_schema."""
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
            continue
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            yield from _leaf_fields(inner[0], f"{prefix}{name}[].")
        else:
            yield f"{prefix}{name}", field


def test_train_help_documents_every_option():
    out = _cli(["train", "--help"])
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    # A few keys every user needs, with their defaults, written out by hand.
    for line in ("  model.path (str, default required)", "  run.output_dir (str, default 'runs')",
                 "  data.max_length (int, default 1024)", "  train.lr (float, default 0.0002)",
                 "  train.batch_size (int, default 4)", "  train.schedule (Literal, default 'cosine')",
                 "  method[lora].r (int, default 16)", "  method.name=lora: "):
        assert any(x.startswith(line) for x in lines), line
    # Every leaf of the config model, and of every method's settings, is listed with its default.
    from tunelab.config import TuneConfig
    from tunelab.methods import METHODS

    leaves = [(p, f) for p, f in _leaf_fields(TuneConfig) if not p.startswith(("method.", "method[]"))]
    leaves += [(f"method[{m}].{p}", f) for m, module in METHODS.items() for p, f in _leaf_fields(module.Config)
               if p != "name"]
    assert len(leaves) > 100
    for path, field in leaves:
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        assert any(x.startswith(f"  {path} (") and x.endswith(f", default {default})") for x in lines), path


@pytest.mark.parametrize("option", ["gradient_checkpointing", "compile"])
def test_speed_and_memory_options_keep_the_loss_curve(tmp_path, alpaca_path, option):
    """Recomputing activations, or compiling the decoder, must not change what is learned. Compiled, no step
    compiles again: each step packs its rows differently, and our fused layers and attention, which read the
    packing's segment bounds, run eagerly inside the compiled decoder."""
    data = {"train": [{"path": str(alpaca_path), "limit": 48}], "max_length": 128, "packing": True}
    common = {"lr": 1e-3, "max_steps": 3, "batch_size": 2}
    base = run_config(tmp_path, tiny_config(tmp_path, alpaca_path, data=data, train=common), "base")
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):  # compiled again: error
        other = run_config(tmp_path, tiny_config(tmp_path, alpaca_path, data=data, train={**common, option: True}),
                           option)
    for x, y in zip(train_losses(base.run_dir), train_losses(other.run_dir), strict=True):
        assert abs(x - y) < 1e-4, (option, x, y)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_gemma_and_phi3_train_with_all_linear_lora(tmp_path, alpaca_path, family):
    """The families the GGUF writer exports train too: Gemma 2, which transformers runs without SDPA (its attention
    soft-cap), loads with eager attention; Phi-3's fused qkv_proj / gate_up_proj are adapted as they are."""
    from gguf_fixtures import tiny_causal_lm

    src = tiny_causal_lm(tmp_path / "model", family)
    cfg = tiny_config(tmp_path, alpaca_path, model={"path": str(src)}, train={"max_steps": 2},
                      method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"})
    out = fine_tune(load_config(None, base=cfg)[0])
    losses = train_losses(out.run_dir)
    assert len(losses) == 2 and all(loss == loss and loss < 20 for loss in losses)
    targets = json.loads((out.run_dir / "final" / "adapter_config.json").read_text())["target_modules"]
    assert any(t.endswith({"phi3": "qkv_proj"}.get(family, "q_proj")) for t in targets)
    assert out.model.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
