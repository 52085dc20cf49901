"""Preference tuning: data, losses against TRL (the test oracle), reference models, accumulation,
caching, bad input, the reward model.

The oracle tests run TRL's own trainers (DPOTrainer, the experimental ORPOTrainer / CPOTrainer, KTOTrainer)
on the same tokens, model (tiny-random-llama + LoRA with non-zero adapters, fp32) and settings, and
compare the loss and the gradients of the trained parameters.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings

import pytest
import torch
import yaml

from tests.conftest import shared, tiny_config
from tunelab.config import TuneConfig
from tunelab.data.batching import IGNORE, collate
from tunelab.data.formats import read_records
from tunelab.data.preference import encode_pairs, kto_rows, pair_rows, unpaired
from tunelab.errors import UserError
from tunelab.objectives.preference import PreferenceLoss, Reference

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
