"""Load a run (or any model) for inference; generate from chat messages; classify texts.

``load_for_inference`` accepts a run directory (uses its ``final/`` weights, or ``best/``),
a weights folder written by tunelab (it holds ``tunelab.json``), an alias, a Hugging Face
folder or a .gguf file. Adapters are attached to their base with PEFT. Classification runs
(``tunelab.json`` says ``"task": "classification"``, or the folder holds a
``...ForSequenceClassification`` model or a ``SEQ_CLS`` adapter) load as
``AutoModelForSequenceClassification`` with the run's labels; :func:`classify` scores texts.
Reward models (a classifier with one output, ``task: reward``) load with ``kind="score"``;
:func:`reply_tokens` and :func:`score_replies` give the scalar reward of a prompt + reply.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from tunelab import methods
from tunelab.data.preference import encode_pairs
from tunelab.data.records import Message, Record
from tunelab.data.templates import set_chat_template
from tunelab.errors import UserError
from tunelab.progress import progress_bar

SCORE = "score"  # Loaded.kind of a reward model: one scalar per prompt + reply, no labels


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    description: str
    base_model: str | None = None  # the base this was tuned from (for --compare-base)
    kind: str = "generation"  # what the model does: "generation" (a causal LM), "classification" (a class
    # head), "score" (a reward model's one scalar) or "multitask" (pick one with select_task); not the
    # training task (tunelab.tasks)
    method: str | None = None  # the tunelab method that produced the weights, if a run
    folder: Path | None = None  # the weights folder, if a run
    id2label: dict[int, str] | None = None  # classification labels
    tasks: list[str] | None = None  # a multi-task run (task: multitask): its tasks; pick one with select_task

    @property
    def is_adapter(self) -> bool:
        """Whether the model is a PEFT model (adapters on a frozen base)."""
        from peft import PeftModel

        return isinstance(self.model, PeftModel)


def weights_folder(target: str | Path, checkpoint: str = "final") -> Path | None:
    """The tunelab weights folder ``target`` designates, or None if it is not a run."""
    path = Path(target)
    if (path / "tunelab.json").is_file():
        return path
    if (path / "config.yaml").is_file():  # a run directory
        folder = path / checkpoint
        if not (folder / "tunelab.json").is_file():
            available = [p.name for p in (path / "final", path / "best") if (p / "tunelab.json").is_file()]
            raise UserError(
                f"{path}: this run has no '{checkpoint}' weights (available: {', '.join(available) or 'none, the run did not finish'}). "
                f"Use --checkpoint {available[0] if available else 'final'} or finish/resume the run"
            )
        return folder
    return None


def read_info(folder: Path) -> dict:
    """``tunelab.json`` of a weights folder, with ``task`` and ``id2label`` filled in.

    A tunelab classifier with a single output (``classifier.json`` names one label, as ``task:
    reward`` saves it) is a reward model: ``task`` becomes ``"score"`` (the trained task is kept in
    ``trained_task``).

    A folder is a classification run when ``tunelab.json`` says ``"task": "classification"``,
    or its ``config.json`` names a ``...ForSequenceClassification`` architecture, or its PEFT
    ``adapter_config.json`` has ``task_type: SEQ_CLS``. Labels come from ``tunelab.json``
    (``id2label`` or a ``labels`` list) or from ``config.json``'s ``id2label``.
    """
    info = json.loads((folder / "tunelab.json").read_text())
    config = _json_or_empty(folder / "config.json")
    adapter = _json_or_empty(folder / "adapter_config.json")
    spec = _json_or_empty(folder / "classifier.json")  # a tunelab SequenceClassifier (task: classification)
    if len(spec.get("labels") or ()) == 1:  # one output: a scalar score (a reward model), not a class
        info["trained_task"], info["task"] = info.get("task"), SCORE
        return info
    if "task" not in info:
        archs = config.get("architectures") or []
        is_cls = any(a.endswith("ForSequenceClassification") for a in archs) or adapter.get("task_type") == "SEQ_CLS"
        info["task"] = "classification" if is_cls or spec else "generation"
    if info["task"] != "classification":  # sft, pretrain, generative_classification: a causal LM that generates
        info["trained_task"], info["task"] = info["task"], "generation"
    if info["task"] == "classification":
        labels = info.get("id2label") or config.get("id2label")
        if labels is None and spec.get("labels"):
            labels = dict(enumerate(spec["labels"]))
        if labels is None and info.get("labels"):
            labels = dict(enumerate(info["labels"]))
        if not labels:
            raise UserError(
                f"{folder}: a classification run without labels (got no id2label in tunelab.json or config.json). "
                "Re-save the run with its label names"
            )
        info["id2label"] = {int(k): str(v) for k, v in labels.items()}
    return info


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def base_model_folder(name: str) -> str:
    """The local folder (or hub id) behind a base-model name: aliases are resolved and built."""
    from tunelab.models.registry import resolve_alias

    folder = resolve_alias(name)
    return str(folder) if folder is not None else name


def load_for_inference(target: str | Path, *, checkpoint: str = "final", dtype: torch.dtype = torch.float32,
                       adapter_name: str = "default") -> Loaded:
    """Load a run, weights folder or model; adapters are attached to their base with PEFT.

    ``adapter_name`` names the PEFT adapter (the server loads several into one base by name).
    """
    from tunelab.models.load import load_model, load_tokenizer

    folder = weights_folder(target, checkpoint)
    if folder is None:
        tokenizer = load_tokenizer(str(target))
        set_chat_template(tokenizer, None)
        model = load_model(str(target), dtype=dtype)
        return Loaded(model.eval(), tokenizer, f"base model {target}", None)

    info = read_info(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    id2label = info.get("id2label")
    custom = _method_loader(info.get("method"))
    if (folder / "multitask.json").is_file():  # task: multitask: the shared LM as its method saved it + the heads
        model = _load_multitask(folder, info, dtype, custom)
        return Loaded(model.eval(), tokenizer, f"{info['method']} multi-task on {info['base_model']} ({folder})",
                      info["base_model"], kind="multitask", method=info["method"], folder=folder, tasks=model.tasks)
    if (folder / "classifier.json").is_file():  # trained with task: classification (head, full, LoRA, ...)
        from tunelab.methods.reload import load_classifier  # lazy: imports torch, peft and every method

        model = _LogitsOutput(load_classifier(folder, dtype=dtype))
    elif custom is not None:  # the method rebuilds its own model (own modules, a quantised base)
        model = custom(folder, info, dtype)
    elif (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        if info["task"] == "classification":
            base = _load_classifier(base_model_folder(info["base_model"]), id2label, dtype, tokenizer)
        else:
            base = load_model(info["base_model"], dtype=dtype)
        model = PeftModel.from_pretrained(base, folder, adapter_name=adapter_name)
    elif info["task"] == "classification":
        model = _load_classifier(str(folder), id2label, dtype, tokenizer)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return Loaded(model.eval(), tokenizer, f"{info['method']} on {info['base_model']} ({folder})", info["base_model"],
                  kind=info["task"], method=info["method"], folder=folder, id2label=id2label)


def _load_multitask(folder: Path, info: dict, dtype: torch.dtype, custom):
    from tunelab.models.load import load_model
    from tunelab.models.multitask import attach_heads

    if custom is not None:  # own modules or a quantised base (adapter, qlora)
        lm = custom(folder, info, dtype)
    elif (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        lm = PeftModel.from_pretrained(load_model(info["base_model"], dtype=dtype), folder)
    elif any(folder.glob("model*.safetensors")):
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:  # method head with a frozen LM: the base model's weights
        lm = load_model(info["base_model"], dtype=dtype)
    return attach_heads(lm, folder)


class _TaskHead(torch.nn.Module):
    """One classification task of a :class:`~tunelab.models.multitask.MultiTaskModel` as a plain classifier."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids, attention_mask=None, **_):
        return self.model.classify(self.task, input_ids, attention_mask)


def select_task(loaded: Loaded, task: str | None) -> Loaded:
    """The view of a multi-task run for one task: its classification head, or the shared LM for
    sft / generative tasks. A single-task model is returned as it is (``task`` must then be None)."""
    if not loaded.tasks:
        if task is not None:
            raise UserError(f"--task {task}: {loaded.description} is not a multi-task run. Remove --task")
        return loaded
    if task not in loaded.tasks:
        raise UserError(f"{loaded.description} is a multi-task run: pass --task NAME, one of {', '.join(loaded.tasks)} "
                        f"(got {task!r})")
    model = loaded.model
    common = dict(base_model=loaded.base_model, method=loaded.method, folder=loaded.folder)
    if task in model.specs:
        labels = model.specs[task].labels
        return Loaded(_LogitsOutput(_TaskHead(model, task)).eval(), loaded.tokenizer, f"{loaded.description} [{task}]",
                      kind="classification", id2label=dict(enumerate(labels)), **common)
    return Loaded(model.lm, loaded.tokenizer, f"{loaded.description} [{task}]", kind="generation", **common)


class _LogitsOutput(torch.nn.Module):
    """Gives a tunelab ``SequenceClassifier`` (which returns a tensor) the ``.logits`` of transformers' outputs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, **kwargs):

        return SimpleNamespace(logits=self.model(input_ids=input_ids, attention_mask=attention_mask))


def _load_classifier(location: str, id2label: dict[int, str], dtype: torch.dtype, tokenizer):
    """An ``AutoModelForSequenceClassification`` with the run's labels and a pad id (needed to pool)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        location, dtype=dtype, num_labels=len(id2label), id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def base_only(loaded: Loaded):
    """A context in which an adapter model answers as its base (PEFT ``disable_adapter``; no copy)."""

    if not loaded.is_adapter:
        raise UserError(
            f"{loaded.description}: --compare-base needs an adapter run (got a {loaded.method or 'plain'} model, "
            "which holds no separate base weights). Chat with the base model in a second terminal instead"
        )
    disable = getattr(loaded.model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


@torch.no_grad()
def classify(loaded: Loaded, texts: list[str], *, batch_size: int = 16, max_length: int | None = None) -> list[dict]:
    """Label probabilities for each text (softmax over the classification head), best label first."""
    if loaded.kind != "classification" or not loaded.id2label:
        raise UserError(f"{loaded.description}: not a classification model. Use generation (predict/chat) instead")
    tok = loaded.tokenizer
    results: list[dict] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length)
        logits = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        probs = torch.softmax(logits.float(), dim=-1)
        for row in probs.tolist():
            ranked = sorted(range(len(row)), key=lambda i: -row[i])
            results.append({"label": loaded.id2label[ranked[0]], "score": row[ranked[0]],
                            "probs": {loaded.id2label[i]: row[i] for i in ranked}})
    return results


def reply_tokens(tokenizer, conversations: list[list[dict]]) -> list[tuple[int, ...] | str]:
    """For each conversation (prompt turns, then the assistant's reply last): the token ids a reward
    model scores, exactly as training tokenised a pair's reply (:func:`tunelab.data.preference.encode_pairs`:
    the chat template, prompt + reply with its end of turn, nothing cut), or a one-line reason it cannot."""
    records = [Record(id=f"messages[{i}]", messages=tuple(Message(m["role"], m["content"]) for m in conv),
                      meta={"desirable": True}) for i, conv in enumerate(conversations)]
    try:
        samples, rejects = encode_pairs(records, tokenizer, max_length=1 << 30, truncation="truncate",
                                        max_prompt_length=None, use_cache=False)
    except UserError as err:  # every conversation refused by the chat template
        return [str(err)] * len(records)
    by_id = {s.id: s.prompt + s.chosen for s in samples}
    why = {r.detail.split(":", 1)[0]: r.detail for r in rejects}
    return [by_id.get(r.id) or why.get(r.id, f"{r.id}: the reply has no token to score") for r in records]


@torch.no_grad()
def score_replies(loaded: Loaded, sequences: list[tuple[int, ...]], *, batch_size: int = 16) -> list[float]:
    """A reward model's scalar for each token sequence from :func:`reply_tokens`, batched right-padded
    with an attention mask, as training scored chosen and rejected replies (the head pools the last
    real token)."""
    if loaded.kind != SCORE:
        raise UserError(f"{loaded.description}: not a reward model (task: reward). Use generation or classification")
    device = next(loaded.model.parameters()).device
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids = torch.zeros((len(chunk), max(len(x) for x in chunk)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(chunk):
            ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        logits = loaded.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out += logits.float()[:, 0].tolist()
    return out


def _method_loader(name: str | None):
    """The ``load(folder, info, dtype)`` hook of a registered method, if it has one."""

    module = methods.METHODS.get(name or "")
    return getattr(module, "load", None) if module is not None else None


def chat_inputs(tokenizer, messages: list[dict]) -> dict[str, torch.Tensor]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}


@torch.no_grad()
def generate_reply(
    loaded: Loaded,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    streamer=None,
) -> str:
    """Greedy (temperature 0) or sampled continuation of a chat, stopping at end of turn."""
    tok = loaded.tokenizer
    inputs = chat_inputs(tok, messages)
    if seed is not None:
        torch.manual_seed(seed)
    sample = temperature > 0
    out = loaded.model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        streamer=streamer,
    )
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def sampling_kwargs(tokenizer, *, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """``generate`` arguments for greedy (temperature 0) or nucleus sampling, with pad/eos ids."""
    sample = temperature > 0
    return {
        "do_sample": sample,
        "temperature": temperature if sample else None,
        "top_p": top_p if sample else None,
        "top_k": None,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token lists padded on the left (generation continues on the right)."""
    width = max(len(e) for e in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, e in enumerate(sequences):
        if e:
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(loaded: Loaded, conversations: list[list[dict]], *, max_new_tokens: int = 32,
                   batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Replies for many chats at once (left padding, KV cache); greedy unless ``temperature > 0``. More than
    one batch shows a progress bar (on stderr)."""
    tok = loaded.tokenizer
    kwargs = sampling_kwargs(tok, temperature=temperature, top_p=top_p)
    replies: list[str] = []
    with progress_bar("generate", len(conversations), enabled=len(conversations) > batch_size) as advance:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            encoded = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"] for c in chunk]
            ids, mask = left_pad(encoded, kwargs["pad_token_id"])
            out = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)
            replies += [tok.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]
            advance(len(chunk))
    return replies
