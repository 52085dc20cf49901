"""The multi-task objective: each row's task picks its loss (classification head or LM head).

``MultiTaskLoss`` has the contract of the single-task losses: ``forward(batch) -> (loss_sum,
count, {task: (loss_sum, count)})``. The task of a row is its ``groups`` value (set by
:mod:`tunelab.tasks.multitask`; the loop then logs ``loss/<task>`` per step). Each task's rows
go through the task's own loss:

* classification: cross-entropy of the task's head (class weights as in
  :class:`~tunelab.objectives.classification.ClassificationLoss`), count = examples;
* sft / generative_classification: :class:`~tunelab.objectives.causal_lm.CausalLMLoss` on the
  shared LM (sample weights kept), count = labelled tokens.

Training: every optimiser step holds one task (:class:`~tunelab.data.task_mix.TaskPlan`), so the
loop's division by the step's targets gives that task's mean loss, multiplied here by the task's
loss weight. Evaluation batches may mix tasks: the returned sum is scaled so that the loop's
eval loss is ``sum_t w_t * mean_t / sum_t w_t`` (the weighted mean of the per-task eval losses),
and the per-task sums and confusion matrices are kept for :meth:`MultiTaskLoss.take_metrics`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.data.batching import IGNORE
from tunelab.objectives.causal_lm import CausalLMLoss
from tunelab.objectives.classification import metrics_from_confusion
from tunelab.objectives.output import LossSum, Tally


class MultiTaskLoss(nn.Module, Tally):
    def __init__(self, model: nn.Module, tasks: list[str], kinds: list[str], weights: list[float],
                 labels: dict[str, list[str]], class_weights: dict[str, list[float] | None],
                 eval_counts: list[float], eval_rows: int):
        super().__init__()
        self.model = model  # MultiTaskModel
        self.lm_loss = CausalLMLoss(model.lm)
        self.tasks, self.kinds, self.weights = list(tasks), list(kinds), [float(w) for w in weights]
        self.labels = labels
        self.class_weights = {t: torch.tensor(w, dtype=torch.float32) for t, w in class_weights.items() if w}
        self.eval_counts, self.eval_rows = list(eval_counts), eval_rows
        self.confusion = {t: torch.zeros(len(labels[t]), len(labels[t]) + 1, dtype=torch.float64) for t in labels}
        self.eval_sums = torch.zeros(len(tasks), 2, dtype=torch.float64)

    def _classification(self, task: str, input_ids, labels, attention_mask):
        targets = labels.max(dim=1).values
        keep = targets != IGNORE
        logits = self.model.classify(task, input_ids, attention_mask).float()
        ce = nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
        if task in self.class_weights:
            ce = ce * self.class_weights[task].to(ce.device)[targets.clamp(min=0)]
        if not self.training and self.counting:
            for t, p in zip(targets[keep].tolist(), logits.argmax(-1)[keep].tolist(), strict=True):
                self.confusion[task][t, p] += 1
        return (ce * keep).sum(), keep.sum()

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, weights=None, groups=None):
        row_task = groups[:, 0] if groups is not None else torch.zeros(len(input_ids), dtype=torch.long)
        total = None
        count = torch.zeros((), dtype=torch.float64, device=input_ids.device)
        per_task: dict[int, tuple[torch.Tensor, Any]] = {}
        for k in sorted(set(row_task.tolist())):
            sel = (row_task == k).nonzero().squeeze(1)
            mask = attention_mask[sel] if attention_mask is not None else torch.ones_like(input_ids[sel])
            width = int(mask.sum(1).max())  # right padding: drop the columns no row of this task uses
            ids, lab, mask = input_ids[sel, :width], labels[sel, :width], mask[:, :width]
            if self.kinds[k] == "classification":
                part, n = self._classification(self.tasks[k], ids, lab, mask)
            else:
                w = weights[sel, :width] if weights is not None else None
                out = self.lm_loss(ids, lab, attention_mask=mask, weights=w)
                part, n = out.total, out.count
            per_task[k] = (part.detach().double(), n)
            if self.training:
                scaled = part * self.weights[k]
            else:  # the loop's eval loss becomes the weighted mean of the task means
                if self.counting:
                    self.eval_sums[k] += torch.stack([part.detach().double().cpu(), torch.as_tensor(n).double().cpu()])
                share = self.weights[k] / sum(self.weights[j] for j in range(len(self.tasks)) if self.eval_counts[j])
                scaled = part * (share * self.eval_rows / max(self.eval_counts[k], 1e-12))
            total = scaled if total is None else total + scaled
            count = count + (torch.as_tensor(n, dtype=torch.float64) if self.training else len(sel))
        if total is None:  # an empty batch
            total = (input_ids.sum() * 0.0).float()
        return LossSum(total, count, per_task)

    def take_metrics(self, accelerator) -> dict[str, Any]:
        """Per-task eval loss (and accuracy / macro-F1 of classification tasks) of the evaluation just run."""
        sums = accelerator.reduce(self.eval_sums.to(accelerator.device), "sum").cpu() if accelerator else self.eval_sums
        self.eval_sums.zero_()
        out: dict[str, Any] = {"tasks": {}}
        for k, task in enumerate(self.tasks):
            m: dict[str, Any] = {}
            if sums[k, 1] > 0:
                m["eval_loss"] = (sums[k, 0] / sums[k, 1]).item()
            if task in self.confusion:
                conf = self.confusion[task]
                conf = accelerator.reduce(conf.to(accelerator.device), "sum").cpu() if accelerator else conf
                self.confusion[task].zero_()
                m.update(metrics_from_confusion(conf, self.labels[task]))
            if m:
                out["tasks"][task] = m
        return out
