"""Load a run (or any model) for inference, and generate from chat messages.

``load_for_inference`` accepts a run directory (uses its ``final/`` weights, or ``best/``),
a weights folder written by tunelab (it holds ``tunelab.json``), an alias, a Hugging Face
folder or a .gguf file. Adapters are attached to their base with PEFT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import UserError


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    description: str
    base_model: str | None = None  # the base this was tuned from (for --compare-base)


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


def load_for_inference(target: str | Path, *, checkpoint: str = "final", dtype: torch.dtype = torch.float32) -> Loaded:
    from tunelab.data.templates import set_chat_template
    from tunelab.models.load import load_model, load_tokenizer

    folder = weights_folder(target, checkpoint)
    if folder is None:
        tokenizer = load_tokenizer(str(target))
        set_chat_template(tokenizer, None)
        model = load_model(str(target), dtype=dtype)
        return Loaded(model.eval(), tokenizer, f"base model {target}", None)

    info = json.loads((folder / "tunelab.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    custom = _method_loader(info.get("method"))
    if custom is not None:  # the method rebuilds its own model (own modules, a quantised base)
        model = custom(folder, info, dtype)
    elif (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(info["base_model"], dtype=dtype)
        model = PeftModel.from_pretrained(base, folder)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return Loaded(model.eval(), tokenizer, f"{info['method']} on {info['base_model']} ({folder})", info["base_model"])


def _method_loader(name: str | None):
    """The ``load(folder, info, dtype)`` hook of a registered method, if it has one."""
    from tunelab import methods

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


@torch.no_grad()
def generate_batch(loaded: Loaded, conversations: list[list[dict]], *, max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[str]:
    """Greedy replies for many chats at once (left padding, KV cache)."""
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        encoded = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                   for c in chunk]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        out = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, temperature=None, top_p=None, top_k=None,
                                    pad_token_id=pad_id, eos_token_id=tok.eos_token_id)
        replies += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return replies
