"""GGUF files run in llama.cpp itself (``llama-cpp-python``, the ``[gguf]`` extra; no server).

llama.cpp does the work: ``llama_model_quantize`` writes the K-quant mixes from the F16 file, and
``Llama.eval`` with ``logits_all`` gives the logits of every position. Our code only compares:

* :func:`check_greedy` (F32/F16 files): llama.cpp's tokenizer encodes the probe texts as the Hugging
  Face tokenizer does; fed the Hugging Face model's greedy continuation (``GREEDY_TOKENS`` tokens of
  each probe prompt), llama.cpp's top-1 token is Hugging Face's at every position of it (the greedy
  tokens are identical), and its top-1 logit is within ``GREEDY_LOGIT_TOLERANCE`` (relative to the
  largest Hugging Face logit) of Hugging Face's;
* :func:`perplexity` (the lossy types): on :data:`HELD_OUT`, compared with the F16 file's by the
  caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.errors import UserError, require
from tunelab.ship.gguf_types import GREEDY_LOGIT_TOLERANCE, QUANTS

GREEDY_TOKENS = 32
GREEDY_TIE = 1e-3  # of the largest Hugging Face logit: closer top-2 logits are a tie F16 may break either way
HELD_OUT_TOKENS = 512  # at most (a small vocabulary spells HELD_OUT in many more tokens than a real one)
#: Fixed probe prompts: plain text, digits and Chinese (byte-level merges), and a chat turn (special tokens).
PROMPTS = (
    "The three primary colours are",
    "Question: What is 17 + 25?\nAnswer:",
    "写一首关于秋天的短诗。",
)
CHAT_PROBE = [{"role": "user", "content": "Give me one tip for writing clear commit messages."}]
#: A held-out text (written for this check, in no training set) for the perplexity comparisons.
HELD_OUT = (
    "A lighthouse keeper on a small northern island kept a logbook for thirty years. Each morning he "
    "wrote down the direction of the wind, the height of the waves and the colour of the sky at dawn. "
    "Ships rarely passed in winter, so most entries are short: a line about the weather, a note that "
    "the lamp had been cleaned, sometimes a sentence about a seal asleep on the rocks below the tower. "
    "When the light was automated, the logbooks were sent to a museum on the mainland, where a "
    "volunteer spent two years typing them into a database. The records turned out to be useful to "
    "scientists who study how storms have changed. Because the keeper measured the same things at the "
    "same hour with the same instruments, his notes form one of the longest unbroken series of weather "
    "observations in the region. The volunteer later said that the most surprising thing was not the "
    "storms but the quiet days, hundreds of them, each recorded with the same care as the worst gale. "
    "To make bread at home, mix flour, water, salt and a little yeast, knead the dough for ten minutes, "
    "and let it rise in a warm place until it has doubled in size. Shape it, let it rise again, then "
    "bake it in a hot oven for about forty minutes, until the crust is brown and the loaf sounds hollow "
    "when tapped underneath."
)


def llama_cpp(need: str = "--quant"):
    """The ``llama_cpp`` module, or the one-line error naming the extra; its logging kept off the terminal."""
    module = require("llama_cpp", extra="gguf", verb=need, package="llama-cpp-python")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return module


def available() -> bool:
    try:
        llama_cpp()
    except UserError:
        return False
    return True


def quantize(f16: Path, out: Path, kind: str) -> Path:
    """llama.cpp's ``llama_model_quantize`` from the F16 file to ``kind`` (its own per-tensor rules)."""
    import gguf

    lc = llama_cpp(f"--quant {kind}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[QUANTS[kind].file_type])
    params.nthread = _threads()
    with _native_stderr_off():
        failed = lc.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0
    if failed:
        out.unlink(missing_ok=True)
        raise UserError(f"--quant {kind}: llama.cpp's quantizer failed on {f16.name}. Export f16 and run "
                        "llama-quantize by hand to see its message")
    return out


@contextlib.contextmanager
def _native_stderr_off():
    """File descriptor 2 sent to /dev/null: llama.cpp's quantizer writes one line per tensor there past the
    log callback that ``llama_cpp()`` quiets (Python's ``sys.stderr`` is left alone)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _threads() -> int:
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return int(cap) if cap.isdigit() and int(cap) > 0 else (os.cpu_count() or 1)


class Runner:
    """One GGUF file loaded in llama.cpp, evaluating whole token sequences with every position's logits."""

    def __init__(self, path: Path, n_ctx: int = HELD_OUT_TOKENS, lora: Path | None = None):
        lc = llama_cpp()
        self.path = path
        try:
            with _native_stderr_off():  # llama.cpp's context notes (e.g. n_ctx above the trained length)
                self.llm = lc.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                    n_threads=_threads(), verbose=False, lora_path=str(lora) if lora else None)
        except (ValueError, RuntimeError) as err:
            raise UserError(f"--gguf: llama.cpp could not load {path.name} ({err}). Report this model's config") from None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """[len(tokens), vocab] float32 logits, one eval from an empty context."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    """exp(mean negative log-likelihood of tokens[1:] given what precedes them)."""
    x = logits[:-1].astype(np.float64)
    log_z = np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)) + x.max(axis=1)
    nll = log_z - x[np.arange(len(tokens) - 1), tokens[1:]]
    return float(np.exp(nll.mean()))


@dataclass
class Reference:
    """The Hugging Face model's side of the checks, computed once per export."""

    texts: list[str]  # the probe texts (the chat probe rendered by the chat template)
    prompts: list[list[int]]  # their token ids (Hugging Face's tokenizer, no added specials)
    sequences: list[list[int]]  # prompt + the greedy continuation
    logits: list[np.ndarray]  # Hugging Face logits over each sequence, float32
    held_out: list[int]  # HELD_OUT's token ids
    held_out_ppl: float


def hf_reference(model, tokenizer) -> Reference:
    """Greedy continuations and logits of the Hugging Face model (float32), and its held-out perplexity."""
    import torch

    texts = list(PROMPTS)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(CHAT_PROBE, tokenize=False, add_generation_prompt=True))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    model = model.float().eval()
    sequences, logits = [], []
    with torch.no_grad():
        for ids in prompts:
            # greedy with the KV cache, past any end-of-text token: SmolLM2's whole reference took 11.6 s here, 27 s
            # with a full forward per token
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            seq = [*ids, int(out.logits[0, -1].argmax())]
            for _ in range(GREEDY_TOKENS - 1):
                out = model(input_ids=torch.tensor([seq[-1:]]), past_key_values=out.past_key_values, use_cache=True)
                seq.append(int(out.logits[0, -1].argmax()))
            sequences.append(seq)
            # the whole sequence in one forward, as llama.cpp gets it: check_greedy compares top-1 tokens here
            logits.append(model(input_ids=torch.tensor([seq])).logits[0].numpy())
        held = tokenizer(HELD_OUT, add_special_tokens=False)["input_ids"][:HELD_OUT_TOKENS]
        held_ppl = perplexity(model(input_ids=torch.tensor([held])).logits[0].numpy(), held)
    return Reference(texts, prompts, sequences, logits, held, held_ppl)


def check_greedy(runner: Runner, ref: Reference, kind: str, what: str | None = None) -> dict:
    """Tokenizer, greedy tokens and top-1 logits of llama.cpp vs Hugging Face; a one-line error on the first failure.

    ``what`` names the option in the errors (default ``--quant KIND``).
    """
    what = what or f"--quant {kind}"
    worst, ties = 0.0, 0
    for text, prompt, seq, want in zip(ref.texts, ref.prompts, ref.sequences, ref.logits, strict=True):
        got_ids = runner.tokenize(text)
        if got_ids != prompt:
            raise UserError(f"{what}: tokenizer check failed: llama.cpp encodes {text[:40]!r} as "
                            f"{got_ids[:12]} but the model's tokenizer as {prompt[:12]}. Report this tokenizer")
        got = runner.logits(seq)
        start = len(prompt) - 1
        top = got[start:-1].argmax(axis=1)
        # Hugging Face's top-1 over the same sequence in one forward: its greedy continuation (chosen with the cache,
        # which moves logits by float rounding only), so a near-tie is compared like for like
        expected = want[start:-1].argmax(axis=1)
        rows = np.arange(start, len(seq) - 1)
        scale = max(np.abs(want).max(), 1e-6)
        # a different top-1 is a tie, not an error, where Hugging Face itself ranks the two tokens within GREEDY_TIE
        # of each other (a real SmolLM2 fine-tune: 20.865 against 20.859, largest logit 38.8), which F16 rounds away
        tie = (top != expected) & (want[rows, expected] - want[rows, top] <= GREEDY_TIE * scale)
        ties += int(tie.sum())
        if not np.array_equal(top[~tie], expected[~tie]):
            i = int(np.flatnonzero((top != expected) & ~tie)[0])
            raise UserError(f"{what}: greedy check failed: llama.cpp's token {i + 1} of the continuation of "
                            f"{text[:40]!r} is {int(top[i])}, the Hugging Face model's {int(expected[i])}. "
                            "Report this model's config")
        diff = np.abs(got[rows, expected] - want[rows, expected]).max() / scale
        worst = max(worst, float(diff))
    if worst > GREEDY_LOGIT_TOLERANCE[kind]:
        raise UserError(f"{what}: top-1 logit check failed: llama.cpp's differ from the Hugging Face model's "
                        f"by {worst:.2e} (relative) > {GREEDY_LOGIT_TOLERANCE[kind]:.0e}. Report this model's config")
    return {"greedy_tokens": GREEDY_TOKENS * len(ref.sequences), "greedy_ties": ties, "top1_logit_error": worst}


def held_out_perplexity(runner: Runner, ref: Reference) -> float:
    return perplexity(runner.logits(ref.held_out), ref.held_out)
