"""The evaluation tasks on one loaded model: language modelling, generation, classification.

Each task takes a model, its tokenizer and records (:class:`tunelab.data.records.Record`) and
returns ``{"metrics": {...}, "examples": [...]}``: corpus metrics, and one row per example
with its ``id`` and a ``score`` (the per-example value paired comparisons use: 1/0 for a
correct answer, token F1 for generation, the mean token loss for language modelling).

* ``lm``: loss, perplexity and next-token accuracy on the tokens training would score
  (assistant replies; every token of plain-text records), tokenised exactly as training does
  (:func:`tunelab.data.tokenize.encode_records`).
* ``generation``: the prompt is the conversation up to its last assistant turn, the reference
  that turn; batched generation (:mod:`tunelab.eval.generate`) and
  :func:`tunelab.eval.metrics.generation_metrics`.
* ``classification`` (generative): both ways side by side. *constrained*: the label whose
  text, as the complete assistant reply (with the template's end of turn), has the highest
  log-likelihood; *generated*: free generation parsed with
  :func:`tunelab.eval.metrics.parse_label` (unparsed answers are wrong and counted).
  A classification *head* (a weights folder whose model has ``id2label``) is scored by
  :func:`classify_with_head` instead.

Few-shot prompting (the baselines): ``shots`` are records whose turns are put before each
prompt as earlier turns of the conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunelab.data.batching import IGNORE, PAD_MULTIPLE, Row, collate
from tunelab.data.preference import CHOSEN, REJECTED, encode_pairs, pair_rows
from tunelab.data.records import Record
from tunelab.data.tasks import class_input_ids, record_text
from tunelab.data.tokenize import encode_records
from tunelab.errors import UserError
from tunelab.eval.generate import GenerationSettings, encode_prompt, generate, loglik_continuations
from tunelab.eval.metrics import classification_metrics, generation_metrics, lm_metrics, parse_label
from tunelab.eval.progress import progress_bar
from tunelab.models.classifier import is_classifier
from tunelab.objectives.preference import PreferenceLoss

TASKS = ("auto", "lm", "generation", "classification", "preference")


# --------------------------------------------------------------------------- records -> prompts


def _messages(record: Record) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in record.messages]


def split_reply(record: Record) -> tuple[list[dict], str | None]:
    """(the conversation before the last assistant turn, that turn's text or None)."""
    msgs = _messages(record)
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"]
    return msgs, None


def gold_label(record: Record) -> str | None:
    """A record's class: its ``label``, else its last assistant reply."""
    return record.label if record.label is not None else split_reply(record)[1]


def shot_turns(shots: Sequence[Record]) -> list[dict]:
    """Earlier turns showing ``shots``: each shot's prompt and its answer (label or reply)."""
    turns: list[dict] = []
    for s in shots:
        prompt, reply = split_reply(s)
        answer = reply if reply is not None else s.label
        if answer is None:
            continue
        turns += [m for m in prompt if m["role"] != "system"] + [{"role": "assistant", "content": answer}]
    return turns


def with_shots(prompt: list[dict], shots: Sequence[Record]) -> list[dict]:
    """``prompt`` with the shots inserted after its system message (if any)."""
    if not shots:
        return prompt
    system = [m for m in prompt[:1] if m["role"] == "system"]
    return system + shot_turns(shots) + prompt[len(system):]


def detect_task(records: Sequence[Record], labels: Sequence[str] | None = None) -> str:
    """``classification`` when every record has a label (or ``labels`` are given) or the replies
    look like a small label set; ``lm`` for plain text; else ``generation``."""
    if not records:
        raise UserError("eval: no records to evaluate (got 0). Check --data and --limit")
    if all("rejected" in r.meta for r in records):
        return "preference"
    if labels or all(r.label is not None for r in records):
        return "classification"
    if all(r.is_text for r in records):
        return "lm"
    replies = [split_reply(r)[1] for r in records]
    if any(x is None for x in replies):
        raise UserError(f"eval: record {records[0].id} has no assistant reply to score. "
                        "Use chat data with a final assistant turn, classification data, or --task lm")
    distinct = set(replies)
    if len(records) >= 10 and len(distinct) <= min(50, len(records) // 3) and all(len(x.split()) <= 5 for x in distinct):
        return "classification"
    return "generation"


def label_set(records: Sequence[Record], labels: Sequence[str] | None) -> list[str]:
    if labels:
        return list(labels)
    seen: dict[str, None] = {}
    for r in records:
        g = gold_label(r)
        if g is not None:
            seen.setdefault(g, None)
    return sorted(seen)


# --------------------------------------------------------------------------- tasks


@torch.no_grad()
def eval_lm(model, tokenizer, records: Sequence[Record], *, batch_size: int = 8, max_length: int = 1024,
            console=None) -> dict[str, Any]:
    """Loss, perplexity and token accuracy over the target tokens (see the module docstring)."""

    encoded, rejects = encode_records(list(records), tokenizer, max_length=max_length)
    if not encoded:
        raise UserError(f"eval: no record could be tokenised ({len(rejects)} rejected, e.g. {rejects[0].detail if rejects else ''})")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_sum, n_tok, n_ok, examples = 0.0, 0, 0, []
    with progress_bar("loss", len(encoded), console) as advance:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, e in enumerate(chunk):
                ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
                labels[i, : len(e.labels)] = torch.tensor(e.labels)
                mask[i, : len(e.input_ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            target = labels[:, 1:].to(device)
            logits = logits[:, :-1]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
            valid = target != -100
            correct = (logits.argmax(-1) == target) & valid
            for i, e in enumerate(chunk):
                n = int(valid[i].sum())
                s = float(ce[i][valid[i]].sum())
                k = int(correct[i].sum())
                loss_sum, n_tok, n_ok = loss_sum + s, n_tok + n, n_ok + k
                examples.append({"id": e.id, "tokens": n, "loss": s / max(n, 1), "token_accuracy": k / max(n, 1),
                                 "score": s / max(n, 1)})
            advance(len(chunk))
    metrics = lm_metrics(loss_sum, n_tok, n_ok)
    metrics.update(n=len(encoded), rejected=len(rejects))
    return {"metrics": metrics, "examples": examples}


def eval_generation(model, tokenizer, records: Sequence[Record], settings: GenerationSettings, *,
                    shots: Sequence[Record] = (), metrics: list[str] | None = None, console=None) -> dict[str, Any]:
    """Generate a reply to each prompt and score it against the record's last assistant turn."""
    prompts, refs, ids = [], [], []
    for r in records:
        prompt, reply = split_reply(r)
        if reply is None:
            raise UserError(f"eval: record {r.id} has no assistant reply to compare with. Use chat data whose "
                            "last turn is the reference answer")
        prompts.append(with_shots(prompt, shots))
        refs.append([reply, *r.meta.get("references", [])] if isinstance(r.meta.get("references"), list) else [reply])
        ids.append(r.id)
    with progress_bar("generate", len(prompts), console) as advance:
        preds = generate(model, tokenizer, prompts, settings, progress=advance)
    scores = generation_metrics(preds, refs, metrics=metrics)
    per = scores.pop("per_example")
    examples = [{"id": i, "prompt": _last_user(p), "reference": r[0], "prediction": y, "exact_match": em, "f1": f,
                 "score": f} for i, p, r, y, em, f in zip(ids, prompts, refs, preds, per["exact_match"], per["f1"], strict=True)]
    return {"metrics": scores, "examples": examples}


def _last_user(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def label_continuations(tokenizer, prompt: list[dict], prompt_ids: list[int], labels: Sequence[str]) -> list[list[int]]:
    """Token ids of each label as the complete assistant reply (the template's end of turn included)."""
    out = []
    for label in labels:
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": label}], tokenize=True,
                                             return_dict=True)["input_ids"]
        full = list(full)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            out.append(full[len(prompt_ids):])
        else:  # a template that renders the last turn differently: the label's own tokens
            out.append(list(tokenizer(label, add_special_tokens=False)["input_ids"]))
    return out


def eval_classification(model, tokenizer, records: Sequence[Record], labels: Sequence[str],
                        settings: GenerationSettings, *, shots: Sequence[Record] = (),
                        aliases: dict[str, list[str]] | None = None, modes: Sequence[str] = ("constrained", "generated"),
                        console=None) -> dict[str, Any]:
    """Generative classification, constrained and generated, side by side (see the module docstring)."""
    labels = list(labels)
    gold = [gold_label(r) for r in records]
    prompts = [with_shots(split_reply(r)[0], shots) for r in records]
    out: dict[str, Any] = {"metrics": {"labels": labels}, "examples": [
        {"id": r.id, "prompt": _last_user(p), "reference": g} for r, p, g in zip(records, prompts, gold, strict=True)]}
    if "constrained" in modes:
        ctx = [encode_prompt(tokenizer, p) for p in prompts]
        conts = [label_continuations(tokenizer, p, c, labels) for p, c in zip(prompts, ctx, strict=True)]
        with progress_bar("score labels", sum(len(c) for c in conts), console) as advance:
            scores = loglik_continuations(model, tokenizer, ctx, conts, batch_size=settings.batch_size, progress=advance)
        pred = [labels[max(range(len(s)), key=s.__getitem__)] for s in scores]
        out["metrics"]["constrained"] = classification_metrics(gold, pred, labels)
        for ex, p in zip(out["examples"], pred, strict=True):
            ex["constrained"] = p
    if "generated" in modes:
        with progress_bar("generate", len(prompts), console) as advance:
            replies = generate(model, tokenizer, prompts, settings, progress=advance)
        pred = [parse_label(t, labels, aliases) for t in replies]
        out["metrics"]["generated"] = classification_metrics(gold, pred, labels)
        for ex, t, p in zip(out["examples"], replies, pred, strict=True):
            ex.update(prediction=t, generated=p)
    primary = "generated" if "generated" in modes else "constrained"
    out["metrics"]["primary"] = primary
    for ex in out["examples"]:
        ex["score"] = float(ex[primary] == ex["reference"])
    return out


@torch.no_grad()
def classify_with_head(model, tokenizer, records: Sequence[Record], id2label: dict[int, str], *,
                       batch_size: int = 8, max_length: int = 512, console=None) -> dict[str, Any]:
    """A classification head: the argmax of its logits for each record's text.

    The text and its tokens are what training gave the head (:func:`tunelab.data.tasks.record_text`,
    the tokenizer's special tokens, :func:`tunelab.data.tasks.class_input_ids` with the run's
    ``max_length``), batched as the training loop's evaluation batches them; so on the rows of a
    run's evaluation file the metrics are the run's own.
    """
    device = next(model.parameters()).device
    labels = [id2label[i] for i in sorted(id2label)]
    texts = [record_text(r) for r in records]
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    rows = [Row(tuple(ids), (IGNORE,) * len(ids), (len(ids),))
            for ids in (class_input_ids(e, tokenizer, max_length) for e in encoded)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pred: list[str] = []
    with progress_bar("classify", len(rows), console) as advance:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id=pad, packed=False, multiple_of=PAD_MULTIPLE)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            pred += [labels[int(i)] for i in logits.argmax(-1)]
            advance(len(rows[start : start + batch_size]))
    gold = [gold_label(r) for r in records]
    metrics = {"labels": labels, "head": classification_metrics(gold, pred, labels), "primary": "head"}
    examples = [{"id": r.id, "prompt": t, "reference": g, "head": p, "score": float(p == g)}
                for r, t, g, p in zip(records, texts, gold, pred, strict=True)]
    return {"metrics": metrics, "examples": examples}


def eval_pairs(model, tokenizer, records: Sequence[Record], *, batch_size: int = 8, max_length: int = 1024,
               console=None) -> dict[str, Any]:
    """Preference pairs: is the chosen reply preferred? A reward model (a one-score classifier) by its
    scores; a causal LM by the log-probability of each reply given the prompt, summed and per token."""
    pairs, rejects = encode_pairs(records, tokenizer, max_length=max_length, truncation="truncate",
                                  max_prompt_length=None, use_cache=False)
    if not pairs:
        raise UserError(f"eval: no pair could be tokenised ({len(rejects)} rejected: {rejects[0].detail if rejects else ''})")
    inner = getattr(model, "model", None)
    reward = inner is not None and is_classifier(inner)
    device = next(model.parameters()).device
    chosen: list[float] = []
    rejected: list[float] = []
    norm: list[tuple[float, float]] = []
    scorer = None if reward else PreferenceLoss(model, "simpo").eval()
    with torch.no_grad(), progress_bar("pairs", len(pairs), console) as advance:
        for start in range(0, len(pairs), batch_size):
            part = pairs[start : start + batch_size]
            if reward:
                seqs = [s.prompt + r for s in part for r in (s.chosen, s.rejected)]
                width = max(len(x) for x in seqs)
                ids = torch.zeros((len(seqs), width), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, x in enumerate(seqs):
                    ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
                scores = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()[:, 0].tolist()
                chosen += scores[0::2]
                rejected += scores[1::2]
            else:
                b = {k: v.to(device) for k, v in collate(pair_rows(part), pad_id=tokenizer.pad_token_id or 0,
                                                          packed=True).items()}
                logp, _, tag, length, _ = scorer.sequences(b["input_ids"], b["labels"], None, b["position_ids"],
                                                           b["tags"], grad=False)
                c, r = tag == CHOSEN, tag == REJECTED
                chosen += logp[c].tolist()
                rejected += logp[r].tolist()
                norm += list(zip((logp[c] / length[c]).tolist(), (logp[r] / length[r]).tolist(), strict=True))
            advance(len(part))
    n = len(chosen)
    metrics: dict[str, Any] = {"n": n, "rejected_rows": len(rejects),
                               "pair_accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
                               "margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n,
                               "scored_by": "reward model" if reward else "log-probability of the reply"}
    if norm:
        metrics["pair_accuracy_normalised"] = sum(c > r for c, r in norm) / n
        metrics["margin_normalised"] = sum(c - r for c, r in norm) / n
    examples = [{"id": s.id, "chosen": c, "rejected": r, "score": float(c > r)}
                for s, c, r in zip(pairs, chosen, rejected, strict=True)]
    return {"metrics": metrics, "examples": examples}
