"""Preference tuning: data, losses against TRL (the test oracle), reference models, accumulation,
caching, bad input, the reward model.

The oracle tests run TRL's own trainers (DPOTrainer, the experimental ORPOTrainer / CPOTrainer, KTOTrainer)
on the same tokens, model (tiny-random-llama + LoRA with non-zero adapters, fp32) and settings, and
compare the loss and the gradients of the trained parameters.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import warm
from conftest import assert_adam_close, shared, tiny_config
from tunelab.config import load_config
from tunelab.data.batching import IGNORE, collate
from tunelab.data.formats import read_records
from tunelab.data.preference import encode_pairs, kto_rows, pair_rows, unpaired
from tunelab.errors import ConfigError, UserError
from tunelab.objectives.preference import PreferenceLoss, Reference, cached_reference
from tunelab.rundocs import pair_history, run_row
from tunelab.train.recipe import fine_tune

BETA = 0.1


def demo(name: str):
    return shared("preference", "llamafactory_demo", name)


@pytest.fixture(scope="module")
def tokenizer():
    from tunelab.models.load import load_tokenizer

    return load_tokenizer("tiny-random-llama")


def lora_model(seed: int = 0):
    """tiny-random-llama + LoRA whose B matrices are non-zero (so the policy differs from its reference)."""
    from tunelab import methods
    from tunelab.methods import METHODS
    from tunelab.models.load import load_model

    torch.manual_seed(seed)
    model = methods.get("lora").apply(load_model("tiny-random-llama", dtype=torch.float32),
                                      METHODS["lora"].Config(name="lora", r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def samples(tokenizer, name="dpo_en_demo.json", n=4, max_length=64, kto=False):
    records = read_records(demo(name), limit=n).records
    if kto:
        records = unpaired(records)
    out, rejects = encode_pairs(records, tokenizer, max_length=max_length, truncation="truncate",
                                max_prompt_length=None, use_cache=False)
    assert not rejects
    return out


def padded(seqs, completion_starts, pad):
    """TRL-style right-padded ids, attention mask and completion mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (s, k) in enumerate(zip(seqs, completion_starts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        comp[i, k : len(s)] = 1
    return ids, att, comp


def without_ref_adapter(trainer):
    """TRL copies an adapter it is handed into a "ref" adapter (the reference of re-training an adapter);
    tunelab's reference for adapter methods is the base model (adapters off), which TRL uses without it."""
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    trainer.model.set_adapter("default")
    return trainer


def trained(model):
    return [p for p in model.parameters() if p.requires_grad]


def ours(model, rows, loss, **settings):
    module = PreferenceLoss(model, loss, beta=BETA, reference=Reference("adapters_off"), **settings)
    module.train()
    out = module(**collate(rows, pad_id=0, packed=True))
    mean = out.total / out.count
    return mean.detach(), torch.autograd.grad(mean, trained(model))


def assert_same(mine, theirs):
    """Loss and every gradient within 1e-5 (relative to the value where it exceeds 1: IPO's loss is ~25,
    where fp32 resolves 2e-6)."""
    (loss_a, grads_a), (loss_b, grads_b) = mine, theirs
    assert abs(float(loss_a) - float(loss_b)) <= 1e-5 * max(1.0, abs(float(loss_b))), (float(loss_a), float(loss_b))
    worst = max(float(((a - b).abs() / b.abs().clamp(min=1.0)).max()) for a, b in zip(grads_a, grads_b, strict=True))
    assert worst <= 1e-5, worst
    assert max(float(g.abs().max()) for g in grads_a) > 1e-4  # the comparison is not between zeros


def trl_args(cls, **kw):
    return cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
               fp16=False, **kw)


def pair_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "hi", "chosen": " a", "rejected": " b"}] * 2)


@pytest.mark.parametrize(("loss", "trl_loss"), [("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")])
def test_dpo_ipo_hinge_loss_and_gradients_equal_trl_dpo_trainer(tokenizer, loss, trl_loss):
    trl = pytest.importorskip("trl")
    warnings.simplefilter("ignore")
    pairs = samples(tokenizer)
    model = lora_model()
    mine = ours(model, pair_rows(pairs), loss)
    trainer = trl.DPOTrainer(model=model, args=trl_args(trl.DPOConfig, beta=BETA, loss_type=[trl_loss]),
                             train_dataset=pair_dataset(), processing_class=tokenizer)
    without_ref_adapter(trainer)
    seqs = [s.prompt + s.chosen for s in pairs] + [s.prompt + s.rejected for s in pairs]
    ids, att, comp = padded(seqs, [len(s.prompt) for s in pairs] * 2, tokenizer.eos_token_id)
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, {"input_ids": ids, "attention_mask": att, "completion_mask": comp},
                                   False)
    assert_same(mine, (theirs.detach(), torch.autograd.grad(theirs, trained(model))))


def _orpo_cpo_batch(pairs, pad):
    batch = {}
    for key in ("chosen", "rejected"):
        seqs = [s.prompt + getattr(s, key) for s in pairs]
        ids, att, comp = padded(seqs, [len(s.prompt) for s in pairs], pad)
        batch |= {f"{key}_input_ids": ids, f"{key}_attention_mask": att,
                  f"{key}_labels": ids.masked_fill(comp == 0, IGNORE)}
    return batch


def test_simpo_loss_and_gradients_equal_trl_cpo_trainer_simpo(tokenizer):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    warnings.simplefilter("ignore")
    pairs = samples(tokenizer)
    model = lora_model()
    beta, gamma, eps = 2.0, 0.8, 0.1
    module = PreferenceLoss(model, "simpo", beta=beta, gamma=gamma, label_smoothing=eps)
    out = module(**collate(pair_rows(pairs), pad_id=0, packed=True))
    mean = out.total / out.count
    mine = (mean.detach(), torch.autograd.grad(mean, trained(model)))
    trainer = CPOTrainer(model=model, args=trl_args(CPOConfig, beta=beta, loss_type="simpo", cpo_alpha=0.0,
                                                    simpo_gamma=gamma, label_smoothing=eps),
                         train_dataset=pair_dataset(), processing_class=tokenizer)
    theirs, _ = trainer.get_batch_loss_metrics(trainer.model, _orpo_cpo_batch(pairs, tokenizer.eos_token_id))
    assert_same(mine, (theirs.detach(), torch.autograd.grad(theirs, trained(model))))


def test_orpo_odds_ratio_term_and_log_probs_equal_trl_orpo_trainer(tokenizer):
    """TRL's ORPO puts its NLL on prompt + reply tokens, averaged over the batch's tokens; ours is the
    chosen reply's mean NLL per token, per pair (the paper's L_SFT on the response): TRL's own log-probs
    (its mean per reply token) and odds-ratio term give that NLL as ``-mean(chosen_logps)``."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    warnings.simplefilter("ignore")
    pairs = samples(tokenizer)
    model = lora_model()
    mine = ours(model, pair_rows(pairs), "orpo")
    trainer = ORPOTrainer(model=model, args=trl_args(ORPOConfig, beta=BETA), train_dataset=pair_dataset(),
                          processing_class=tokenizer)
    chosen, rejected = trainer.concatenated_forward(trainer.model, _orpo_cpo_batch(pairs, tokenizer.eos_token_id))[:2]
    odds_ratio_terms = trainer.odds_ratio_loss(chosen, rejected)[0]
    theirs = (-chosen).mean() - odds_ratio_terms.mean()
    assert_same(mine, (theirs.detach(), torch.autograd.grad(theirs, trained(model))))


def test_kto_loss_and_gradients_equal_trl_kto_trainer(tokenizer):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    warnings.simplefilter("ignore")
    kto = samples(tokenizer, "kto_en_demo.json", n=6)
    assert {s.desirable for s in kto} == {True, False}
    model = lora_model()
    wd, wu = 1.3, 0.7
    mine = ours(model, kto_rows(kto), "kto", desirable_weight=wd, undesirable_weight=wu)
    ds = Dataset.from_list([{"prompt": "hi", "completion": " a", "label": True},
                            {"prompt": "hi", "completion": " b", "label": False}])
    trainer = trl.KTOTrainer(model=model, args=trl_args(trl.KTOConfig, beta=BETA, desirable_weight=wd,
                                                        undesirable_weight=wu), train_dataset=ds,
                             processing_class=tokenizer)
    without_ref_adapter(trainer)
    pad = tokenizer.eos_token_id
    ids, att, comp = padded([s.prompt + s.chosen for s in kto], [len(s.prompt) for s in kto], pad)
    # the mismatched sample of sample i: its prompt with sample i-1's completion (as kto_rows builds it)
    mism = [s.prompt + kto[i - 1].chosen for i, s in enumerate(kto)]
    kl_ids, kl_att, kl_comp = padded(mism, [len(s.prompt) for s in kto], pad)
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, {
        "input_ids": ids, "attention_mask": att, "completion_mask": comp, "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_att, "KL_completion_mask": kl_comp,
        "label": torch.tensor([s.desirable for s in kto])}, False)
    assert_same(mine, (theirs.detach(), torch.autograd.grad(theirs, trained(model))))


def test_conservative_dpo_and_sft_term_follow_the_papers(tokenizer):
    """TRL 1.16's sigmoid loss has no label smoothing and its sft term is a token mean over the batch:
    cDPO (Mitchell 2023) and RPO's per-pair NLL (Pang et al. 2024) are checked against the formulas."""
    pairs = samples(tokenizer)
    model = lora_model()
    eps, alpha = 0.2, 0.5
    module = PreferenceLoss(model, "dpo", beta=BETA, label_smoothing=eps, sft_weight=alpha,
                            reference=Reference("adapters_off"))
    batch = collate(pair_rows(pairs), pad_id=0, packed=True)
    out = module(**batch)
    logp, ref, tag, length, _ = module.sequences(batch["input_ids"], batch["labels"], None, batch["position_ids"],
                                                  batch["tags"])
    c, r = tag == 0, tag == 1
    z = BETA * ((logp[c] - ref[c]) - (logp[r] - ref[r]))
    expected = (-(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)
                - alpha * logp[c] / length[c]).sum()
    assert abs(float(out.total) - float(expected)) < 1e-5


# --------------------------------------------------------------------------- data


def test_demo_files_read_as_pairs_and_kto_samples_and_truncation_keeps_prompt_tail_and_reply_heads(tokenizer):
    for name, fmt, key in (("dpo_en_demo.json", "preference", "rejected"), ("dpo_zh_demo.json", "preference", "rejected"),
                           ("kto_en_demo.json", "kto", "desirable")):
        res = read_records(demo(name))
        assert (res.format, len(res.records), res.rejects) == (fmt, 300, [])
        assert all(key in r.meta and r.messages[-1].role == "assistant" for r in res.records)
    records = read_records(demo("dpo_en_demo.json"), limit=8).records
    full, _ = encode_pairs(records, tokenizer, max_length=1 << 20, truncation="truncate", max_prompt_length=None,
                           use_cache=False)
    cut, _ = encode_pairs(records, tokenizer, max_length=48, truncation="truncate", max_prompt_length=16,
                          use_cache=False)
    assert any(c.truncated for c in cut)
    for f, c in zip(full, cut, strict=True):
        assert len(c.prompt) + max(len(c.chosen), len(c.rejected)) <= 48
        assert f.prompt[len(f.prompt) - len(c.prompt):] == c.prompt  # the prompt's tail
        assert f.chosen[: len(c.chosen)] == c.chosen and f.rejected[: len(c.rejected)] == c.rejected  # heads
        assert len(c.chosen) == min(len(f.chosen), 48 - len(c.prompt))  # one budget for both replies
        assert len(c.rejected) == min(len(f.rejected), 48 - len(c.prompt))
    row = pair_rows(cut[:1])[0]
    batch = collate([row], pad_id=0, packed=True)
    labelled = batch["labels"][0] != IGNORE  # loss only on the two replies' tokens
    assert int(labelled.sum()) == len(cut[0].chosen) + len(cut[0].rejected)
    assert batch["position_ids"][0, len(cut[0].prompt) + len(cut[0].chosen)] == 0  # rejected restarts: no cross-attention


def test_each_reject_kind_is_reported_with_its_reason(tmp_path):
    rows = [
        {"instruction": "Say hi", "chosen": "Hi!", "rejected": "Go away."},
        {"instruction": "Say hi", "chosen": "Hi!", "rejected": " Hi! "},
        {"instruction": "Say hi", "chosen": "", "rejected": "No."},
        {"instruction": "", "input": "", "chosen": "Hi!", "rejected": "No."},
        {"chosen": "Hi!", "rejected": "No."},
        {"messages": [{"role": "user", "content": "Hi"}], "chosen": {"role": "assistant", "content": "Hello"},
         "rejected": [{"role": "assistant", "content": "Bye"}]},
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
         "rejected": {"from": "human", "value": "Bye"}},
    ]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    res = read_records(path)
    assert res.format == "preference" and [r.id for r in res.records] == ["pairs.json:0", "pairs.json:5"]
    reasons = {r.row: r.reason for r in res.rejects}
    assert reasons == {1: "identical_pair", 2: "empty_response", 3: "missing_prompt", 4: "missing_prompt",
                       6: "wrong_role"}
    assert all("\n" not in r.detail and f"row {r.row}" in r.detail for r in res.rejects)


def config_file(tmp_path, name, **sections) -> Path:
    cfg = tiny_config(tmp_path, demo("dpo_en_demo.json"), **sections)
    cfg["run"]["name"] = name
    cfg["data"] = {"train": [{"path": str(demo("dpo_en_demo.json")), "limit": 16}], "max_length": 64,
                   **sections.get("data", {})}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(tmp_path, name, **sections):
    config, sources = load_config(config_file(tmp_path, name, **sections))
    return fine_tune(config, sources)


def run_two_processes(tmp_path, name, **sections) -> Path:
    """``tunelab train`` with ``train.processes: 2`` (one thread each), through the CLI; the run folder."""
    sections["train"] = {**sections.get("train", {}), "processes": 2, "threads": 1}
    path = config_file(tmp_path, name, **sections)
    done = warm.run(["train", str(path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "runs" / name


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_bad_input_gives_one_line_errors_and_rejects_file(tmp_path):
    with pytest.raises(UserError) as err:  # a pair file given to task: sft
        run(tmp_path, "sft", task="sft")
    assert "holds preference pairs" in str(err.value) and "task: preference" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError) as err:  # KTO data given to DPO
        run(tmp_path, "kto_as_dpo", task="preference", data={"train": [{"path": str(demo("kto_en_demo.json")),
                                                                          "limit": 8}]})
    assert "holds KTO samples" in str(err.value) and "preference.loss: kto" in str(err.value)
    assert "\n" not in str(err.value)
    for bad, needle in (({"method": {"name": "full"}, "preference": {"reference": "adapters_off"}}, "has no adapters"),
                        ({"preference": {"loss": "orpo", "reference": "copy"}}, "uses no reference model"),
                        ({"data": {"packing": True}}, "each row already packs")):
        cfg = tiny_config(tmp_path, demo("dpo_en_demo.json"), task="preference", **bad)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert needle in str(err.value)
    rows = json.loads(demo("dpo_en_demo.json").read_text())[:8]
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[2]["chosen"] = {"from": "gpt", "value": " "}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    out = run(tmp_path, "rejects", task="preference", train={"max_steps": 1},
              data={"train": [{"path": str(path)}]})
    rejected = [json.loads(x) for x in (out.run_dir / "rejects.jsonl").read_text().splitlines()]
    assert {(r["row"], r["reason"]) for r in rejected} == {(1, "identical_pair"), (2, "empty_response")}
    assert out.summary["data"]["train_pairs"] == 6 and out.summary["data"]["rejected"] == 2


# --------------------------------------------------------------------------- training invariants


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_batch_8_equals_2x4_accumulation_equals_2_processes_x_4(tmp_path, loss):
    """One optimiser step of 8 pairs (KTO: samples) three ways: one micro-batch of 8, 4 micro-batches of
    2, and 2 processes (DDP on CPU, gloo) with 4 each. KTO's KL estimate is the step's over every
    micro-batch and process."""
    data = {"train": [{"path": str(demo("kto_en_demo.json" if loss == "kto" else "dpo_en_demo.json")), "limit": 16}]}
    common = dict(task="preference", data=data, preference={"loss": loss, "beta": 0.5})
    train = {"max_steps": 2, "lr": 2e-2, "eval_every": 0}
    one = run(tmp_path, f"{loss}_b8", **common, train={**train, "batch_size": 8, "grad_accum": 1})
    accumulated = run(tmp_path, f"{loss}_b2x4", **common, train={**train, "batch_size": 2, "grad_accum": 4})
    two = run_two_processes(tmp_path, f"{loss}_2px4", **common, train={**train, "batch_size": 4, "grad_accum": 1})
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    runs = (one.run_dir, accumulated.run_dir, two)
    losses = [[r["loss"] for r in metrics(d)] for d in runs]
    assert len(losses[0]) == 2 and abs(losses[0][1] - losses[0][0]) > 1e-4  # the step changed the model
    for other in losses[1:]:
        assert max(abs(x - y) for x, y in zip(losses[0], other, strict=True)) < 1e-5, losses
    if loss == "kto":  # the second step's KL estimate is over the whole step, whatever the micro-batches
        kl = [metrics(d)[1]["train_kl_estimate"] for d in runs]
        assert max(kl) - min(kl) < 1e-6, kl
    # the train records' pair metrics are the step's, over every micro-batch and process
    for key in ("train_reward_desirable", "train_reward_undesirable") if loss == "kto" else ("train_margin",
                                                                                           "train_logp_chosen"):
        values = [[r.get(key) for r in metrics(d)] for d in runs]
        assert any(v is not None for v in values[0]), key
        for other in values[1:]:
            assert all(x is y is None or abs(x - y) <= 1e-5 * max(1.0, abs(x))
                       for x, y in zip(values[0], other, strict=True)), (key, values)
    for p, q in zip(one.model.parameters(), accumulated.model.parameters(), strict=True):
        assert_adam_close(p, q)  # Adam amplifies fp32 rounding (see there); the losses agree within 1e-5
    w1 = load_file(str(one.run_dir / "final" / "adapter_model.safetensors"))
    w2 = load_file(str(two / "final" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert_adam_close(w2[k], w1[k])


def test_adapters_off_reference_equals_a_frozen_copy_exactly(tokenizer):
    from tunelab.models.load import load_model

    model = lora_model()
    base = load_model("tiny-random-llama", dtype=torch.float32).requires_grad_(False).eval()
    batch = collate(pair_rows(samples(tokenizer)), pad_id=0, packed=True)
    module = PreferenceLoss(model, "dpo", reference=Reference("adapters_off"))
    logp, off, *_ = module.sequences(batch["input_ids"], batch["labels"], None, batch["position_ids"], batch["tags"])
    module.reference = Reference("copy", model=base)
    _, frozen, *_ = module.sequences(batch["input_ids"], batch["labels"], None, batch["position_ids"], batch["tags"])
    assert torch.equal(off, frozen)
    assert not torch.allclose(logp, off)  # the adapters do change the policy


def test_cached_reference_is_reused_by_a_second_run_and_invalidated_by_data_or_model(tmp_path, monkeypatch,
                                                                                     tokenizer):
    import tunelab.tasks.preference as task_module

    monkeypatch.setattr(task_module, "cache_root", lambda: tmp_path / "cache")
    forwards = []
    real = Reference.sequence_logps

    def counting(self, *args, **kwargs):
        if self.kind != "cached":
            forwards.append(self.kind)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Reference, "sequence_logps", counting)
    settings = dict(task="preference", method={"name": "full"}, train={"max_steps": 1, "lr": 1e-3, "eval_every": 0},
                    preference={"reference": "cached"})
    first = run(tmp_path, "first", **settings)
    info1 = json.loads((first.run_dir / "reference.json").read_text())
    assert info1["kind"] == "cached" and info1["sequences"] == 32 and forwards
    forwards.clear()
    second = run(tmp_path, "second", **settings)
    info2 = json.loads((second.run_dir / "reference.json").read_text())
    assert info2["from_cache"] and info2["key"] == info1["key"] and "computed" not in info2
    assert forwards == []  # no reference forward at all: neither to fill the cache nor during training
    assert metrics(first.run_dir)[0]["loss"] == metrics(second.run_dir)[0]["loss"]
    other = run(tmp_path, "other_data", **{**settings, "data": {"train": [{"path": str(demo("dpo_en_demo.json")),
                                                                            "limit": 12}]}})
    info3 = json.loads((other.run_dir / "reference.json").read_text())
    assert not info3["from_cache"] and info3["key"] != info1["key"]
    model = lora_model()
    rows = pair_rows(samples(tokenizer))
    a = cached_reference(model, rows, pad_id=0, batch_size=4, folder=tmp_path / "c2", settings={})
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" not in n and p.ndim == 2).add_(1e-3)
    b = cached_reference(model, rows, pad_id=0, batch_size=4, folder=tmp_path / "c2", settings={})
    assert a.info["key"] != b.info["key"] and not b.info["from_cache"]


def test_orpo_and_simpo_train_and_log_pair_metrics(tmp_path):
    for loss in ("orpo", "simpo"):
        out = run(tmp_path, loss, task="preference", preference={"loss": loss},
                  data={"eval_ratio": 0.25}, train={"max_steps": 2, "eval_every": 1})
        assert not (out.run_dir / "reference.json").exists()
        ev = metrics(out.run_dir, "eval")[-1]
        assert {"eval_loss", "pair_accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen",
                "logp_rejected"} <= set(ev)
        # what the report plots and the registry lists: the logged names, read back from run JSON
        history = pair_history(out.run_dir)
        assert {"margin", "pair_accuracy"} <= set(history["train"]) & set(history["eval"])
        assert run_row(out.run_dir)["pair_accuracy"] == ev["pair_accuracy"]


# --------------------------------------------------------------------------- reward model


def test_reward_model_trains_and_tunelab_eval_reports_pair_accuracy(tmp_path):
    from tunelab.eval.evaluate import EvalRequest, evaluate

    out = run(tmp_path, "rm", task="reward", data={"eval_ratio": 0.25},
              train={"max_steps": 3, "eval_every": 3, "lr": 5e-3})
    ev = metrics(out.run_dir, "eval")[-1]
    assert {"eval_loss", "pair_accuracy", "margin", "score_chosen", "score_rejected"} <= set(ev)
    assert run_row(out.run_dir)["pair_accuracy"] == ev["pair_accuracy"]
    assert json.loads((out.run_dir / "final" / "tunelab.json").read_text())["task"] == "reward"
    results = evaluate(out.run_dir, EvalRequest(data=[str(demo("dpo_en_demo.json"))], limit=8))
    m = results[0]["systems"]["tuned"]["metrics"]
    assert m["scored_by"] == "reward model" and 0.0 <= m["pair_accuracy"] <= 1.0 and m["n"] == 8
    with pytest.raises(UserError, match="reward model; it scores preference pairs only"):  # not a generator
        evaluate(out.run_dir, EvalRequest(data=[str(shared("instruct", "llamafactory_demo", "alpaca_en_demo.json"))],
                                          limit=2))
