"""What the causal-LM tasks (sft, pretrain, generative classification) share."""

from __future__ import annotations

import torch

from tunelab import methods
from tunelab.data.batching import Plan
from tunelab.models.load import load_model
from tunelab.objectives.causal_lm import CausalLMLoss


def lm_with_method(cfg, dtype: torch.dtype) -> torch.nn.Module:
    """The base causal LM, loaded as the method needs it (QLoRA: 4-bit), with the method applied."""
    method = methods.get(cfg.method.name)
    return method.apply(load_model(cfg.model.path, dtype=dtype, **methods.load_options(cfg.method, dtype)), cfg.method)


class CausalLMTask:
    """Defaults of a task that trains a causal LM on its rows with the chunked cross-entropy."""

    name = ""
    causal_lm_rows = True
    always_packed = False
    class_head = False
    labelled = False
    continual = True
    pair_metric = False
    unused_parameters = False
    shards = True
    zero3 = True  # the chunked cross-entropy computes its gradients in the forward
    builds_without_data = True

    def rules(self, cfg) -> list[str]:
        p = []
        if methods.fact(cfg.method.name, "CLASS_HEAD"):
            p.append(f"method.name={cfg.method.name} trains a classification head, but task is {cfg.task!r}. "
                     "Set task: classification.")
        return p + no_multitask_sections(cfg)

    def model_and_loss(self, cfg, data, dtype: torch.dtype, tokenizer):
        model = lm_with_method(cfg, dtype)
        return model, CausalLMLoss(model), None

    def plan(self, cfg, data, processes: int, plan: Plan) -> Plan:
        return plan

    def save(self, model, method, folder) -> None:
        method.save(model, folder)


def no_multitask_sections(cfg) -> list[str]:
    """The multitask-only sections, set on another task."""
    p = []
    if cfg.tasks:
        p.append(f"tasks is set but task is {cfg.task!r}. Set task: multitask, or remove tasks.")
    if any(s.task is not None for s in cfg.data.train + cfg.data.eval):
        p.append("data.train/data.eval entries name a task, but task is not multitask. Set task: multitask "
                 "or remove their task fields.")
    return p
