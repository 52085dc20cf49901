"""``task: preference`` (DPO, IPO, hinge, ORPO, SimPO, KTO on a causal LM) and ``task: reward`` (a
scalar head trained with the Bradley-Terry loss on pairs).

Data: :mod:`tunelab.data.preference` (pairs, KTO samples, truncation, rows); losses, the reference
model and the metrics: :mod:`tunelab.objectives.preference`. docs/preference.md has the formulas.
"""

from __future__ import annotations

import copy
import json

import torch

from tunelab import methods
from tunelab.data.batching import Plan
from tunelab.data.preference import encode_pairs, kto_rows, pair_kind, pair_rows, unpaired
from tunelab.data.workbench import prepare_records
from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_text
from tunelab.models.classifier import build_classifier, unwrap, write_spec
from tunelab.models.registry import cache_root
from tunelab.objectives.distill import has_adapters
from tunelab.objectives.preference import (
    REFERENCE_FREE,
    PreferenceLoss,
    Reference,
    RewardLoss,
    cached_reference,
)
from tunelab.tasks.common import refuse_empty, reject_counts, report
from tunelab.tasks.lm import CausalLMTask, lm_with_method, no_multitask_sections
from tunelab.tasks.protocol import PreparedData

NO_ADAPTERS = ("full", "freeze")  # methods that train the base weights themselves: no adapters to switch off


def _common_rules(cfg, task: str) -> list[str]:
    p = []
    if getattr(methods.get(cfg.method.name), "VIRTUAL_TOKENS", False) or cfg.method.name == "llama_adapter":
        p.append(f"method {cfg.method.name} with task: {task}: its virtual tokens / adaption prompts would have to "
                 "precede both replies of a pair, which share one packed row. Use lora, qlora, ia3, adapter, full or "
                 "freeze")
    if cfg.data.packing:
        p.append(f"data.packing with task: {task}: each row already packs one pair's chosen and rejected replies. "
                 "Set data.packing: false")
    if cfg.objectives.distill is not None:
        p.append(f"objectives.distill with task: {task}: the preference losses keep the model near its reference "
                 "already (beta). Use objectives.l2sp or objectives.ewc to add a penalty")
    if cfg.objectives.replay is not None:
        p.append(f"objectives.replay with task: {task}: replay mixes SFT rows into the pair batches. Remove "
                 "objectives.replay (or add preference.sft_weight for an SFT term on the chosen replies)")
    return p + no_multitask_sections(cfg)


def _records(cfg, run, console, is_main: bool, *, kto: bool):
    """The workbench's records, checked to be the kind of preference data the loss needs."""
    prep = prepare_records(cfg, run, console, is_main)
    for which, records, files in (("data.train", prep.train, prep.files), ("data.eval", prep.eval, prep.eval_files)):
        kind = pair_kind(records)
        names = ", ".join(f["path"] for f in files) or "the held-out records"
        if records and kind is None:
            raise UserError(f"{which}: {names} holds no preference data (format "
                            f"{', '.join(sorted({f['format'] for f in files})) or 'unknown'}), but task is {cfg.task}. "
                            "Give pairs with chosen and rejected replies (format: preference) or KTO samples (messages "
                            "+ boolean label, format: kto); for plain chats use task: sft")
        if kind == "kto" and not kto:
            loss = cfg.preference.loss if cfg.task == "preference" else "bradley-terry (task: reward)"
            raise UserError(f"{which}: {names} holds KTO samples (one reply + a boolean label), but the loss is {loss}, "
                            "which needs chosen and rejected replies. Set preference.loss: kto, or give pairs")
    if kto:  # pairs for KTO: the chosen reply desirable, the rejected one undesirable
        prep.train, prep.eval = unpaired(prep.train), unpaired(prep.eval)
    return prep


def _rows(cfg, tokenizer, run, console, is_main: bool, *, kto: bool) -> PreparedData:
    d = cfg.data
    prep = _records(cfg, run, console, is_main, kto=kto)
    encode = dict(max_length=d.max_length, truncation=d.truncation, max_prompt_length=cfg.preference.max_prompt_length,
                  use_cache=d.cache)
    train, rejects = encode_pairs(prep.train, tokenizer, **encode)
    evals, eval_rejects = encode_pairs(prep.eval, tokenizer, **encode)
    rejects = prep.rejects + rejects + eval_rejects
    what = "sample" if kto else "pair"
    refuse_empty(train, rejects, run, is_main, what)
    make = kto_rows if kto else pair_rows
    train_rows, eval_rows = make(train), make(evals)
    summary = {
        "task": cfg.task, "files": prep.files, "eval_files": prep.eval_files,
        f"train_{what}s": len(train), f"eval_{what}s": len(evals),
        "train_tokens": sum(len(r) for r in train_rows), "train_target_tokens": sum(r.n_targets for r in train_rows),
        "truncated": sum(1 for s in train + evals if s.truncated), **reject_counts(rejects),
        **({"desirable": sum(1 for s in train if s.desirable)} if kto else {}),
        **({"prepare": prep.report} if prep.report else {}),
    }
    report(summary, rejects, run, console, is_main,
           f"data ({cfg.task}): {len(train)} train / {len(evals)} eval {what}s, {summary['train_tokens']:,} train "
           f"tokens" + (f", {summary['truncated']} truncated" if summary["truncated"] else ""))
    return PreparedData(train_rows, eval_rows, summary)


def reference_model(cfg, model, data: PreparedData, tokenizer) -> Reference | None:
    """The reference of ``preference.loss`` (None for ORPO and SimPO); its description goes to
    ``<run>/reference.json``."""
    p = cfg.preference
    if p.loss in REFERENCE_FREE:
        return None
    kind = p.reference if p.reference != "auto" else ("adapters_off" if has_adapters(model) else "cached")
    if kind == "adapters_off":
        if not has_adapters(model):
            raise UserError(f"preference.reference: adapters_off needs adapters, and method {cfg.method.name} has none. "
                            "Set preference.reference: cached or copy")
        ref = Reference("adapters_off")
    elif kind == "copy":
        ref = Reference("copy", model=copy.deepcopy(model).requires_grad_(False).eval())
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ref = cached_reference(model, data.train + data.eval, pad_id=pad, batch_size=cfg.train.batch_size,
                               folder=cache_root() / "preference_ref", settings={"what": "sequence log-probs"})
    if cfg.run_dir.is_dir():
        atomic_write_text(cfg.run_dir / "reference.json", json.dumps(ref.info, indent=2))
    return ref


class Preference(CausalLMTask):
    name = "preference"
    always_packed = True  # a row packs one pair: chosen and rejected, position ids restarting
    continual = False
    pair_metric = True  # forgetting scores held-out pairs by the log-probability of each reply
    shards = True  # the reference: the same sharded model with adapters off, a copy sharded the same way, or cached
    zero3 = False  # the per-token log-prob function keeps the head's weight for its backward (ZeRO-3 frees it)
    builds_without_data = False  # the advisor probes it as sft (the same decoder, one sequence per row)

    def rules(self, cfg) -> list[str]:
        p = super().rules(cfg) + _common_rules(cfg, "preference")
        pref = cfg.preference
        if pref.loss in REFERENCE_FREE and pref.reference != "auto":
            p.append(f"preference.reference: {pref.reference} with preference.loss: {pref.loss}, which uses no "
                     "reference model. Remove preference.reference")
        if pref.reference == "adapters_off" and cfg.method.name in NO_ADAPTERS:
            p.append(f"preference.reference: adapters_off with method {cfg.method.name}, which has no adapters to "
                     "switch off. Set preference.reference: cached (log-probs on disk) or copy (a frozen copy)")
        if pref.label_smoothing and pref.loss not in ("dpo", "simpo"):
            p.append(f"preference.label_smoothing applies to dpo and simpo, not {pref.loss}. Remove it")
        if pref.sft_weight and pref.loss == "kto":
            p.append("preference.sft_weight adds an SFT term on the chosen reply of a pair; kto has no pairs. Remove it")
        return p

    def rows(self, cfg, tokenizer, run, console, is_main: bool) -> PreparedData:
        return _rows(cfg, tokenizer, run, console, is_main, kto=cfg.preference.loss == "kto")

    def model_and_loss(self, cfg, data, dtype: torch.dtype, tokenizer):
        model = lm_with_method(cfg, dtype)
        p = cfg.preference
        loss = PreferenceLoss(model, p.loss, beta=p.beta, label_smoothing=p.label_smoothing, gamma=p.gamma,
                              desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
                              sft_weight=p.sft_weight, reference=reference_model(cfg, model, data, tokenizer))
        return model, loss, loss.take_metrics


class Reward:
    name = "reward"
    causal_lm_rows = False
    always_packed = True
    class_head = True
    labelled = False
    continual = False
    pair_metric = False  # a scalar head: no general loss to compare, so no forgetting block
    unused_parameters = False
    shards = True  # a class head on the backbone, sharded as an LM (tests/test_scale.py)
    zero3 = True
    builds_without_data = False

    def rules(self, cfg) -> list[str]:
        return _common_rules(cfg, "reward")

    def rows(self, cfg, tokenizer, run, console, is_main: bool) -> PreparedData:
        return _rows(cfg, tokenizer, run, console, is_main, kto=False)

    def model_and_loss(self, cfg, data, dtype, tokenizer):
        model = build_classifier(cfg.model.path, ["reward"], pooling=cfg.classification.pooling, dtype=dtype,
                                 **methods.load_options(cfg.method, dtype))
        model = methods.get(cfg.method.name).apply(model, cfg.method)
        if not hasattr(model, "peft_config"):  # PEFT trains it via modules_to_save; other methods may freeze it
            unwrap(model).score.requires_grad_(True)
        loss = RewardLoss(model)
        return model, loss, loss.take_metrics

    def plan(self, cfg, data, processes: int, plan: Plan) -> Plan:
        return plan

    def save(self, model, method, folder) -> None:
        method.save(model, folder)
        write_spec(model, folder)
