"""Classification objectives and their evaluation metrics.

``ClassificationLoss`` wraps a :class:`~tunelab.models.classifier.SequenceClassifier` (possibly
PEFT-wrapped) with the same contract as :class:`~tunelab.objectives.causal_lm.CausalLMLoss`:
``forward(batch) -> (loss_sum, count)``, where ``count`` is the number of examples. The loop
divides by the examples of the whole optimiser step, so batch 8 = batch 2 x accumulation 4 holds
exactly. With class weights, each example's cross-entropy is multiplied by its class's weight
(``loss = sum_i w[y_i] * CE_i / N``); unweighted, it is the plain mean cross-entropy.

In eval mode the module also counts a confusion matrix (gold x predicted); the loop's
evaluation reads it through :meth:`ClassificationLoss.take_metrics`, which sums it over
processes and scores it with :func:`tunelab.eval.metrics.classification_metrics` (scikit-learn):
accuracy and macro-F1 at every evaluation with no second pass over the data.

``GenerativeEval`` does the same for ``task: generative_classification``: greedy answers to the
evaluation prompts (left-padded batches, KV cache), parsed into labels with
:func:`tunelab.eval.metrics.parse_label`; an unparseable answer counts as wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.data.batching import IGNORE
from tunelab.eval.metrics import classification_metrics, parse_label
from tunelab.objectives.output import LossSum, Tally
from tunelab.progress import progress_bar


def metrics_from_confusion(confusion: torch.Tensor, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (and the rest of ``classification_metrics``) from counts.

    ``confusion[i, j]`` counts gold ``labels[i]`` predicted as ``labels[j]``; a last extra
    column counts unparseable predictions.
    """

    y_true: list[str] = []
    y_pred: list[str | None] = []
    counts = confusion.to(torch.long).tolist()
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            y_true += [labels[i]] * n
            y_pred += [labels[j] if j < len(labels) else None] * n
    if not y_true:
        return {}
    full = classification_metrics(y_true, y_pred, labels)
    keep = ("n", "accuracy", "macro_f1", "micro_f1", "weighted_f1", "n_unparsed")
    out = {k: full[k] for k in keep}
    out["per_class_f1"] = {lab: round(v["f1"], 4) for lab, v in full["per_class"].items()}
    # what the report shows of a run's own evaluation: the per-class table and the confusion matrix
    # (columns: labels, then <unparsed> and <other>, as classification_metrics counts them)
    out["per_class"] = full["per_class"]
    out["labels"] = full["labels"]
    out["confusion"] = full["confusion"]
    return out


class ClassificationLoss(nn.Module, Tally):
    """``forward(input_ids, labels, attention_mask) -> (sum of weighted CE, number of examples)``.

    The class id of a row is its only label that is not -100 (the shared ``collate`` pads the
    rows built by :func:`tunelab.data.tasks.classification_rows`).
    """

    def __init__(self, model: nn.Module, labels: list[str], class_weights: list[float] | None = None):
        super().__init__()
        self.model = model
        self.labels = list(labels)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.register_buffer("confusion", torch.zeros(len(labels), len(labels) + 1, dtype=torch.float64),
                             persistent=False)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        from tunelab.models.classifier import unwrap

        targets = labels.max(dim=1).values  # -100 everywhere but at the class id
        keep = targets != IGNORE
        logits = unwrap(self.model)(input_ids=input_ids, attention_mask=attention_mask).float()
        ce = nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
        if self.class_weights is not None:
            ce = ce * self.class_weights[targets.clamp(min=0)]
        loss_sum = (ce * keep).sum()
        if not self.training and self.counting:
            pred = logits.argmax(dim=-1)
            for t, p in zip(targets[keep].tolist(), pred[keep].tolist(), strict=True):
                self.confusion[t, p] += 1
        return LossSum(loss_sum, keep.sum())

    def take_metrics(self, accelerator) -> dict[str, Any]:
        """Metrics of the evaluation just run (summed over processes); resets the counts."""
        total = accelerator.reduce(self.confusion.clone(), "sum") if accelerator is not None else self.confusion
        self.confusion.zero_()
        return metrics_from_confusion(total.cpu(), self.labels)


def answer_budget(tokenizer: Any, labels: list[str], max_new_tokens: int | None = None) -> int:
    """Tokens generated for a label answer: ``max_new_tokens``, else the longest label's tokens + 4."""
    longest = max((len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels), default=1)
    return max_new_tokens or longest + 4


class GenerativeEval:
    """Accuracy and macro-F1 of greedy answers to the evaluation prompts (one label each)."""

    def __init__(self, model: nn.Module, tokenizer: Any, prompts: list[tuple[list[int], str]], labels: list[str], *,
                 max_new_tokens: int | None = None, batch_size: int = 16):
        self.model, self.tokenizer, self.prompts, self.labels = model, tokenizer, prompts, list(labels)
        self.max_new_tokens = answer_budget(tokenizer, labels, max_new_tokens)
        self.batch_size = batch_size

    @torch.no_grad()
    def run(self, accelerator=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(metrics, per-example answers of this process).

        With several processes, every rank runs as many ``generate`` calls as the rank with the most prompts
        (the first; a rank out of prompts answers a borrowed one, not counted), each with ``synced_gpus``
        (every rank runs forwards until the last one's answers end): a sharded model's forward is collective
        (FSDP / ZeRO-3 gather each layer), so a rank that stopped early would leave the others waiting."""

        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        mine = self.prompts[rank::world]
        rounds = -(-len(self.prompts[::world]) // self.batch_size)
        device = next(self.model.parameters()).device
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        was_training = self.model.training
        self.model.eval()
        confusion = torch.zeros(len(self.labels), len(self.labels) + 1, dtype=torch.float64, device=device)
        index = {lab: i for i, lab in enumerate(self.labels)}
        answers = []
        with progress_bar("eval: generate", len(mine), enabled=rank == 0) as advance:
            for r in range(rounds):
                chunk = mine[r * self.batch_size : (r + 1) * self.batch_size]
                asked = chunk or self.prompts[:1]
                width = max(len(ids) for ids, _ in asked)
                ids = torch.full((len(asked), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(asked), width), dtype=torch.long)
                for i, (p, _) in enumerate(asked):
                    ids[i, width - len(p):] = torch.tensor(p)
                    mask[i, width - len(p):] = 1
                ctx = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
                with ctx:
                    out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                              max_new_tokens=self.max_new_tokens, do_sample=False, temperature=None,
                                              top_p=None, top_k=None, pad_token_id=pad_id,
                                              eos_token_id=tok.eos_token_id, synced_gpus=world > 1)
                for (_, gold), row in zip(chunk, out[: len(chunk)], strict=True):  # none for a borrowed prompt
                    text = tok.decode(row[width:], skip_special_tokens=True).strip()
                    pred = parse_label(text, self.labels)
                    confusion[index[gold], index[pred] if pred is not None else len(self.labels)] += 1
                    answers.append({"gold": gold, "answer": text, "parsed": pred})
                advance(len(chunk))
        if was_training:
            self.model.train()
        total = accelerator.reduce(confusion, "sum") if accelerator is not None else confusion
        return metrics_from_confusion(total.cpu(), self.labels), answers
