"""``task: classification``: a new class head on the pooled states of a backbone; accuracy and F1."""

from __future__ import annotations

import torch

from tunelab import methods
from tunelab.data.batching import Plan
from tunelab.data.tasks import class_weights, classification_task_rows
from tunelab.data.workbench import prepare_records
from tunelab.models.classifier import build_classifier, unwrap, write_spec
from tunelab.objectives.classification import ClassificationLoss
from tunelab.tasks.lm import no_multitask_sections
from tunelab.tasks.pretrain import task_data
from tunelab.tasks.protocol import PreparedData


class Classification:
    name = "classification"
    causal_lm_rows = False
    always_packed = False
    class_head = True
    labelled = True
    continual = False  # a new class head per task: nothing for the next stage to start from
    pair_metric = False
    unused_parameters = False
    shards = True  # one backbone and one head: FSDP / ZeRO shard them as an LM (tests/test_scale.py)
    zero3 = True
    builds_without_data = True

    def rules(self, cfg) -> list[str]:
        p = []
        if not methods.fact(cfg.method.name, "CLASSIFICATION"):
            p.append(f"method {cfg.method.name} with task: classification: its virtual tokens / adaption prompts "
                     "are not fed to the classifier's backbone. Use lora, qlora, ia3, adapter, full, freeze or head "
                     "(or task: generative_classification).")
        if cfg.data.packing:
            p.append("data.packing with task: classification: each row is one example. Set data.packing: false.")
        if cfg.objectives.distill is not None:
            p.append("objectives.distill with task: classification: the class head is new, so the base model has "
                     "no class distribution to distil from. Use objectives.l2sp or objectives.ewc instead")
        return p + no_multitask_sections(cfg)

    def rows(self, cfg, tokenizer, run, console, is_main: bool) -> PreparedData:
        prep = prepare_records(cfg, run, console, is_main)
        rows = classification_task_rows(cfg.data, cfg.classification, tokenizer, prep.train, prep.eval,
                                        seed_rejects=prep.rejects)
        return task_data(cfg, rows, prep, run, console, is_main)

    def model_and_loss(self, cfg, data, dtype, tokenizer):
        labels = data.task.labels
        if getattr(cfg.method, "unfreeze_top", 0) and cfg.model.dtype == "auto":  # head with unfrozen blocks
            dtype = torch.float32  # unfrozen blocks train in fp32 master weights
        model = build_classifier(cfg.model.path, labels, pooling=cfg.classification.pooling, dtype=dtype,
                                 **methods.load_options(cfg.method, dtype))  # QLoRA: a 4-bit backbone
        model = methods.get(cfg.method.name).apply(model, cfg.method)
        if not hasattr(model, "peft_config"):  # PEFT trains it via modules_to_save; other methods may freeze it
            unwrap(model).score.requires_grad_(True)  # the new head always trains
        weights = class_weights(cfg.classification.class_weights, labels, data.task.label_counts)
        loss = ClassificationLoss(model, labels, weights)
        return model, loss, loss.take_metrics

    def plan(self, cfg, data, processes: int, plan: Plan) -> Plan:
        return plan

    def save(self, model, method, folder) -> None:
        method.save(model, folder)
        write_spec(model, folder)  # labels, pooling and head shape for load_classifier
