"""Write a transformers causal LM as a GGUF file (llama.cpp, Ollama, LM Studio).

Our own writer only because none is importable: llama.cpp's ``convert_hf_to_gguf.py`` is a script
in its repository, not in the ``gguf`` package. The ``gguf`` package (llama.cpp's Python writer,
``GGUFWriter``, and its NumPy quantisers) does the file format and the block quantisation; this
module follows ``convert_hf_to_gguf.py``'s conventions for the families in :data:`FAMILIES`
(Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text, Phi-3):

* tensor names from ``gguf``'s own name map (``token_embd``, ``blk.N.attn_q`` ...), the output
  head left out when it is tied to the embeddings;
* for Llama-style graphs, the rotary permutation of ``q_proj`` / ``k_proj`` rows (Hugging Face
  stores the two rotary halves apart, GGML's Llama graph interleaves them), which transformers'
  GGUF loader undoes on reading; Qwen's, Gemma's and Phi-3's NeoX-style graphs take the rows as
  they are (Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` too: llama.cpp splits them itself);
* Gemma's norms as ``1 + w`` (its RMSNorm scales by ``1 + w``, llama.cpp's by the weight), its
  soft-caps and sliding window; Gemma 3's global RoPE base and linear scaling; Phi-3's LongRoPE
  factors as the ``rope_factors_long`` / ``_short`` tensors and transformers' attention factor;
  what llama.cpp's Gemma graphs fix in code (query scale, which layers slide, the sliding
  layers' RoPE base) is checked against the config instead of written;
* which tensors stay unquantised (:func:`tensor_type`: norms, 1-D tensors, biases, rows the block
  does not divide), matrices in the chosen type (F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0);
* the tokenizer, from the ``tokenizers`` backend (no ``sentencepiece``): a byte-level BPE as
  llama.cpp's ``gpt2`` vocabulary (tokens, token types, merges) with the pre-tokenizer named by
  llama.cpp's hash of its reference string (the few hashes below are copied from
  ``convert_hf_to_gguf.py``); a SentencePiece-style BPE with byte fallback (Llama 2, Gemma, Phi-3
  ``tokenizer.json``) as its ``llama`` vocabulary, with scores that make llama.cpp's merge order
  the merge ranks' and its space prefix as the tokenizer's normalizer has it; special ids, BOS/EOS
  as the tokenizer adds them and the chat template via ``gguf.SpecialVocab``.

Anything else (other architectures, other rope scalings, sliding windows outside Gemma/Phi-3,
tokenizers llama.cpp would split otherwise) is refused with a one-line error rather than written
half right; where llama.cpp runs an accepted file differently from transformers whatever the file
says (Phi-3's sliding window, its LongRoPE factor choice), :func:`caveats` says so in the export's
notes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import UserError
from tunelab.ship.gguf_types import QUANTS

#: llama.cpp's reference string for recognising a BPE pre-tokenizer (``get_vocab_base_pre``).
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
#: sha256 of ``str(tokenizer.encode(_CHKTXT))`` -> llama.cpp pre-tokenizer name.
_KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}

_CHECK_HINT = "Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py"


@dataclass(frozen=True)
class Family:
    """How one transformers ``model_type`` is written: llama.cpp's architecture and its conventions.

    ``permute_qk``: llama.cpp's Llama graph applies RoPE to interleaved pairs, so ``convert_hf_to_gguf``
    reorders the q/k rows of Llama-style models (``LlamaModel.permute``); Qwen's graphs use the
    NeoX layout that Hugging Face stores, so their rows are written as they are.
    """

    arch: str  # the gguf.MODEL_ARCH member name
    permute_qk: bool
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w: w + 1 is written


#: The model types the writer knows (each was round-tripped through llama.cpp in tests/test_gguf_llamacpp.py).
FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", True),
    "mistral": Family("LLAMA", True),
    "qwen2": Family("QWEN2", False),
    "qwen3": Family("QWEN3", False),
    "gemma2": Family("GEMMA2", False, norm_plus_one=True),
    "gemma3_text": Family("GEMMA3", False, norm_plus_one=True),
    "phi3": Family("PHI3", False),
}
#: Which layers use the sliding window: llama.cpp sets the pattern per architecture (``set_swa_pattern``:
#: Gemma 2 every other layer from the first, Gemma 3 five of every six) and ``convert_hf_to_gguf.py``
#: writes none, where transformers reads ``layer_types``.
_SWA_EVERY = {"GEMMA2": 2, "GEMMA3": 6}
#: The RoPE base of Gemma 3's sliding layers in llama.cpp (``convert_hf_to_gguf.py`` writes none).
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0
#: The layer counts llama.cpp takes for the 27B Gemmas, whose attention scale is 1/sqrt(hidden / heads)
#: rather than 1/sqrt(head_dim) (``llama-model.cpp``, ``f_attention_scale``); it reads no scale from the file.
_GEMMA_27B_LAYERS = {"GEMMA2": 46, "GEMMA3": 62}


def bpe_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer.

    Known tokenizers by llama.cpp's hash of its reference string; otherwise a plain GPT-2 byte-level
    pre-tokenizer (one ``ByteLevel`` step with its regex) is llama.cpp's ``gpt-2``; anything else
    ``default``.
    """
    digest = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if digest in _KNOWN_PRE:
        return _KNOWN_PRE[digest]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()).get("pre_tokenizer") or {} if backend is not None else {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    return "default"


def check_supported(model) -> Family:
    """The model's :class:`Family`, or a one-line UserError for what the writer cannot express."""
    cfg = model.config
    if cfg.model_type == "gemma3":
        raise UserError(
            f"--gguf: Gemma 3 with its vision tower ({type(model).__name__}, model_type 'gemma3') is not written "
            "by tunelab's GGUF writer (llama.cpp takes it as a text model plus a separate mmproj file). "
            "Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py (and --mmproj)"
        )
    family = FAMILIES.get(cfg.model_type)
    if family is None or not type(model).__name__.endswith("ForCausalLM"):
        raise UserError(
            f"--gguf: tunelab writes GGUF for causal LMs of model_type {', '.join(FAMILIES)} (got "
            f"{type(model).__name__}, model_type {cfg.model_type!r}). {_CHECK_HINT}"
        )
    if family.arch in _SWA_EVERY:
        _check_gemma(cfg, family)
    elif family.arch == "PHI3":
        _check_phi3(cfg)
    else:
        if getattr(cfg, "sliding_window", None):
            raise UserError(
                f"--gguf: sliding-window attention is not written by tunelab's GGUF writer for {cfg.model_type} "
                f"(got sliding_window {cfg.sliding_window}). {_CHECK_HINT}"
            )
        _check_rope(_rope(cfg), ("default",))
    return family


def _rope(cfg) -> dict:
    return getattr(cfg, "rope_parameters", None) or {}


def _check_rope(rope: dict, written: tuple[str, ...], what: str = "rope scaling") -> None:
    if rope.get("rope_type", "default") not in written:
        raise UserError(
            f"--gguf: {what} {rope.get('rope_type')!r} is not written by tunelab's GGUF writer (got {rope}). "
            f"{_CHECK_HINT}"
        )


def _refuse(what: str, got, why: str) -> None:
    raise UserError(f"--gguf: {what} (got {got}): {why}. {_CHECK_HINT}")


def _check_gemma(cfg, family: Family) -> None:
    """What llama.cpp's Gemma 2/3 graphs fix in code rather than read from the file must match the config."""
    n_layer, head_dim = cfg.num_hidden_layers, cfg.head_dim
    if cfg.hidden_activation != "gelu_pytorch_tanh":
        _refuse("Gemma's MLP activation", repr(cfg.hidden_activation), "llama.cpp's Gemma graph runs tanh-GELU")
    scale_dim = cfg.hidden_size // cfg.num_attention_heads if n_layer == _GEMMA_27B_LAYERS[family.arch] else head_dim
    if cfg.query_pre_attn_scalar != scale_dim:
        _refuse("query_pre_attn_scalar", cfg.query_pre_attn_scalar,
                f"llama.cpp scales a {n_layer}-layer Gemma's queries by 1/sqrt({scale_dim}) and reads no scale")
    every = _SWA_EVERY[family.arch]
    sliding = [t == "sliding_attention" and bool(cfg.sliding_window) for t in cfg.layer_types]
    # Gemma 3 without sliding layers is written without a window; llama.cpp's Gemma 2 always slides
    if (any(sliding) or family.arch == "GEMMA2") and sliding != [i % every < every - 1 for i in range(n_layer)]:
        _refuse("layer_types / sliding_window", f"{cfg.layer_types}, {cfg.sliding_window}",
                f"llama.cpp's {family.arch.title()} slides the window on {every - 1} of every {every} layers, "
                "from the first")
    if getattr(cfg, "use_bidirectional_attention", False):
        _refuse("use_bidirectional_attention", True, "llama.cpp's Gemma text graph is causal")
    if family.arch == "GEMMA2":
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(cfg, cap) is None:
                _refuse(cap, None, "llama.cpp's Gemma 2 graph always soft-caps (default 50 / 30)")
        _check_rope(_rope(cfg), ("default",))
        return
    if cfg.attn_logit_softcapping is not None:
        _refuse("attn_logit_softcapping", cfg.attn_logit_softcapping, "llama.cpp's Gemma 3 graph has none")
    rope = _rope(cfg)
    _check_rope(rope.get("full_attention", {}), ("default", "linear"), "rope scaling (full attention)")
    local = rope.get("sliding_attention", {})
    _check_rope(local, ("default",), "rope scaling (sliding attention)")
    if any(sliding) and local.get("rope_theta") != _GEMMA3_LOCAL_ROPE_BASE:
        _refuse("the sliding layers' rope_theta", local.get("rope_theta"),
                f"llama.cpp's Gemma 3 gives its sliding layers RoPE base {_GEMMA3_LOCAL_ROPE_BASE:g}")


def _check_phi3(cfg) -> None:
    rope = _rope(cfg)
    _check_rope(rope, ("default", "longrope"))
    if getattr(cfg, "hidden_act", "silu") != "silu":
        _refuse("Phi-3's MLP activation", repr(cfg.hidden_act), "llama.cpp's Phi-3 graph runs SwiGLU")


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: interleave the two rotary halves of each head's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_spec(tokenizer) -> dict:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError("--gguf: the tokenizer has no fast (tokenizers) backend. Export without --gguf")
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _vocab_model(spec: dict) -> str:
    """llama.cpp's tokenizer model for the tokenizer: ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece-style
    BPE with byte fallback, as Llama 2, Gemma and Phi-3 ship it in ``tokenizer.json``); a one-line error otherwise."""
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if model.get("type") == "BPE" and byte_level and not model.get("byte_fallback"):
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback") and not byte_level:
        return "llama"
    raise UserError(
        "--gguf: tunelab writes byte-level BPE (GPT-2 / Llama 3 / Qwen style) and SentencePiece-style BPE with "
        f"byte fallback (Llama 2 / Gemma / Phi-3 style) tokenizers (got a {model.get('type')} tokenizer"
        f"{', byte-level' if byte_level else ''}{', byte fallback' if model.get('byte_fallback') else ''}). "
        "Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py"
    )


def _vocab(tokenizer, vocab_size: int, sentencepiece: bool) -> tuple[list[str], list[int]]:
    """Tokens and their GGUF types, in id order (ids the tokenizer lacks become unused [PADi]); a SentencePiece-style
    vocabulary also marks its unknown token and its ``<0x..>`` byte tokens, as llama.cpp's tokenizer needs them."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    unk = tokenizer.unk_token_id if sentencepiece else None
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        if i == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and _BYTE_TOKEN.fullmatch(reverse[i]):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _merge_scores(spec: dict, tokens: list[str]) -> list[float]:
    """SentencePiece-style scores that make llama.cpp's merge order the tokenizer's.

    llama.cpp's ``llama`` tokenizer merges the adjacent pair whose joined text is the vocabulary
    entry with the highest score; Hugging Face's BPE merges the pair of lowest rank in its merge
    list. So the score of a piece is minus the rank of the first merge that makes it; pieces no
    merge makes (characters, bytes, added tokens) get the lowest score, below every merge.
    """
    rank: dict[str, int] = {}
    for i, merge in enumerate(spec["model"].get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    lowest = -float(len(rank) + 1)
    return [-float(rank[t]) if t in rank else lowest for t in tokens]


def _space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts ``▁`` before every text (llama.cpp's ``add_space_prefix``); a one-line error for
    steps llama.cpp's SentencePiece tokenizer cannot follow.

    llama.cpp turns spaces into ``▁`` and, with ``add_space_prefix``, puts one ``▁`` before the text and
    after every special token, as Llama 2's ``tokenizer.json`` normalizer does (``Prepend`` + ``Replace``,
    per text between special tokens); Gemma's replaces spaces only. transformers 5's rebuilt
    ``LlamaTokenizer`` instead uses a ``Metaspace`` step that adds ``▁`` to the first word only, or
    only where none is, which no llama.cpp setting reproduces.
    """
    def steps(part: dict | None) -> list[dict]:
        if not part:
            return []
        if part.get("type") == "Sequence":
            return [step for sub in part.get("normalizers") or part.get("pretokenizers") or [] for step in steps(sub)]
        return [part]

    prefix, spaced = False, False
    for step in steps(spec.get("normalizer")) + steps(spec.get("pre_tokenizer")):
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == "\u2581":
            prefix = True
        elif kind == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == "\u2581":
            spaced = True
        elif kind == "Metaspace" and step.get("replacement") == "\u2581" and step.get("prepend_scheme") == "never":
            spaced = True
        elif kind == "Metaspace":
            raise UserError(
                f"--gguf: the tokenizer's Metaspace step adds \u2581 to a word only where there is none "
                f"(prepend_scheme {step.get('prepend_scheme')!r}, as transformers 5 rebuilds Llama 2 style "
                "tokenizers); llama.cpp adds one before every text and after every special token, so chat text "
                "would tokenize differently. Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py"
            )
        elif not (kind == "Split" and step.get("pattern") == {"String": " "}):  # Gemma's (no spaces left by then)
            raise UserError(
                f"--gguf: llama.cpp's SentencePiece tokenizer only turns spaces into \u2581 (got a {kind} step in "
                "the tokenizer's normalizer / pre-tokenizer). Export without --gguf and convert with llama.cpp's "
                "convert_hf_to_gguf.py"
            )
    if not spaced:
        raise UserError("--gguf: the SentencePiece-style tokenizer does not turn spaces into \u2581 (no Replace "
                        "step). Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py")
    return prefix


def tensor_type(gguf_name: str, shape: tuple[int, ...], kind: str, tied: bool):
    """The GGML type one tensor gets in a ``kind`` file, by llama.cpp's rules.

    From ``convert_hf_to_gguf.py`` (``ModelBase.prepare_tensors``): 1-D tensors, norms and
    anything not named ``.weight`` (biases) stay F32; a row length the block size does not divide
    falls back to F16. From ``llama-quantize`` (``llama_tensor_get_type``): the output head (the
    token embeddings when they are tied to it) gets more bits than a 4/5-bit type, Q6_K there;
    the ``gguf`` package cannot quantise Q6_K, so our NumPy path gives it Q8_0, llama.cpp's own
    fallback for Q6_K (a few per cent larger, never less precise).
    """
    import gguf

    qtype = gguf.GGMLQuantizationType[QUANTS[kind].numpy]
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        return qtype
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        qtype = gguf.GGMLQuantizationType.Q8_0 if qtype != gguf.GGMLQuantizationType.Q8_0 else qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _tensor_data(t: torch.Tensor, qtype) -> tuple[np.ndarray, object]:
    """(numpy data, raw GGML type or None for plain float arrays) for one tensor as ``qtype``."""
    import gguf

    data = t.detach().to(torch.float32).cpu().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data, None
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype


def _add_hparams(writer, cfg, kind: str, family: Family) -> None:
    """The model's hyper-parameters as ``convert_hf_to_gguf.py``'s ``TextModel`` and the family's class write them."""
    import gguf

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = _rope(cfg)
    if family.arch == "GEMMA3":
        rope = rope.get("full_attention", rope)  # the global layers' (llama.cpp fixes the sliding layers' base)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if head_dim != cfg.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[QUANTS[kind].file_type])
    if family.arch == "GEMMA2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if family.arch == "GEMMA3" and cfg.final_logit_softcapping:
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if family.arch in _SWA_EVERY and cfg.sliding_window and "sliding_attention" in cfg.layer_types:
        writer.add_sliding_window(cfg.sliding_window)
    if rope.get("rope_type") == "linear":  # Gemma 3 4B-27B: llama.cpp scales the global layers' positions only
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if family.arch == "PHI3":
        writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        writer.add_sliding_window(cfg.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            writer.add_rope_scaling_attn_factors(_longrope(cfg)[2])


def _longrope(cfg) -> tuple[list[float], list[float], float]:
    """Phi-3's LongRoPE: (long factors, short factors, attention factor), the last as transformers computes it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = _rope(cfg)
    _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, None)
    return list(rope["long_factor"]), list(rope["short_factor"]), float(attention_factor)


def _add_tokenizer(writer, tokenizer, tokenizer_folder: Path, vocab_size: int) -> None:
    import gguf

    spec = _tokenizer_spec(tokenizer)
    model = _vocab_model(spec)
    tokens, types = _vocab(tokenizer, vocab_size, sentencepiece=model == "llama")
    writer.add_tokenizer_model(model)
    if model == "gpt2":
        writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer))
    else:
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_space_prefix(spec))
        writer.add_token_scores(_merge_scores(spec, tokens))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with _quiet("gguf.vocab"):  # its notes on templates it half-parses; what it reads is below
        special = gguf.SpecialVocab(tokenizer_folder, load_merges=model == "gpt2", n_vocab=len(tokens))
    # whether BOS / EOS are added as the tokenizer does it (its post-processor), which the files and the
    # class attributes do not always say (transformers 5's Gemma tokenizer adds BOS with add_bos_token False)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    special.add_special_token["bos"] = len(framed) > len(plain) and framed[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = len(framed) > len(plain) and framed[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)


@contextlib.contextmanager
def _quiet(logger_name: str):
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


#: llama.cpp drops the whitespace after special tokens (Phi-3's tokenizer.json marks them ``rstrip``) only
#: when the model's ``general.name`` contains one of these (``llama-vocab.cpp``); no GGUF key says it.
_RSTRIP_NAMES = ("phi-3", "phi3")


def _general_name(name: str, tokenizer) -> str:
    """``name``, with ``phi3`` added or taken out so that llama.cpp right-strips special tokens as the tokenizer does."""
    keep = ("<unk>", "<s>", "<|endoftext|>")  # llama.cpp leaves these alone even for Phi-3
    rstrip = any(t.special and t.rstrip for t in tokenizer.added_tokens_decoder.values() if t.content not in keep)
    named = any(marker in name.lower() for marker in _RSTRIP_NAMES)
    if rstrip and not named:
        return f"{name} (phi3)"
    if named and not rstrip:
        return re.sub(r"(?i)phi-?3", "Phi 3", name)
    return name


def write_gguf(model, tokenizer, tokenizer_folder: Path, path: Path, *, kind: str = "f16", name: str = "model") -> Path:
    """Write ``model`` (+ tokenizer, chat template) to ``path`` as a GGUF file of type ``kind``.

    ``kind`` is a :data:`QUANTS` type the ``gguf`` package writes in NumPy (the K-quants are made
    from the F16 file by llama.cpp, :mod:`tunelab.ship.llamacpp`). ``tokenizer_folder`` holds the
    saved tokenizer files (``gguf.SpecialVocab`` reads the merges, special-token ids and chat
    template from them).
    """
    import gguf

    family = check_supported(model)
    if kind not in QUANTS or QUANTS[kind].numpy is None:
        raise UserError(f"--quant: the NumPy GGUF writer writes {', '.join(k for k, q in QUANTS.items() if q.numpy)} "
                        f"(got {kind!r}). Install llama.cpp for the K-quants: pip install 'tunelab[gguf]'")
    cfg = model.config
    arch = gguf.MODEL_ARCH[family.arch]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_general_name(name, tokenizer))
    _add_hparams(writer, cfg, kind, family)
    _add_tokenizer(writer, tokenizer, tokenizer_folder, cfg.vocab_size)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue  # llama.cpp reuses token_embd for a tied head
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"--gguf: no GGUF name for tensor {hf_name!r}. {_CHECK_HINT}")
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_rows(tensor, n_head)
        elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_rows(tensor, n_kv)
        elif family.norm_plus_one and hf_name.endswith("norm.weight"):
            tensor = tensor.float() + 1
        data, raw = _tensor_data(tensor, tensor_type(gguf_name, tuple(tensor.shape), kind, tied))
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    if family.arch == "PHI3" and _rope(cfg).get("rope_type") == "longrope":
        long, short, _ = _longrope(cfg)  # per-frequency divisors; llama.cpp takes the long ones when -c exceeds
        for tensor_id, factors in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long),  # the original context length
                                   (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short)):
            writer.add_tensor(gguf.TENSOR_NAMES[tensor_id] + ".weight", np.array(factors, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def caveats(model) -> list[str]:
    """Where llama.cpp runs a file this writer accepts differently from transformers, one line each (export notes).

    Both are llama.cpp's handling of every Phi-3 GGUF, not something the file could say otherwise:
    its Phi-3 graph turns the sliding window off, and it picks LongRoPE's long factors by the
    context size it is given rather than by the sequence's length.
    """
    cfg = model.config
    notes = []
    if cfg.model_type == "phi3" and cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
        notes.append(f"GGUF: llama.cpp runs Phi-3 without its {cfg.sliding_window}-token sliding window (it turns it "
                     f"off for every Phi-3): the same outputs as transformers up to {cfg.sliding_window} tokens of "
                     "context, full attention beyond")
    if cfg.model_type == "phi3" and _rope(cfg).get("rope_type") == "longrope":
        notes.append(f"GGUF: llama.cpp uses Phi-3's long RoPE factors whenever its context size (-c) exceeds "
                     f"{cfg.original_max_position_embeddings}, transformers only for sequences that long")
    return notes


def transformers_misreads(model) -> list[str]:
    """What transformers' GGUF reader (the check without llama.cpp) would lose from this model's file.

    It reads Gemma's soft-caps and query scale as the 2B/9B defaults and neither Gemma 3's RoPE
    scaling nor Phi-3's LongRoPE factors, so those files could only fail its check.
    """
    cfg = model.config
    lost = []
    if cfg.model_type in ("gemma2", "gemma3_text") and cfg.query_pre_attn_scalar != 256:
        lost.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar}")
    if cfg.model_type == "gemma2":
        lost += [f"{cap} {getattr(cfg, cap)}" for cap, default in (("attn_logit_softcapping", 50.0),
                                                                    ("final_logit_softcapping", 30.0))
                 if getattr(cfg, cap) != default]
    if cfg.model_type == "gemma3_text" and cfg.final_logit_softcapping:
        lost.append(f"final_logit_softcapping {cfg.final_logit_softcapping}")
    if cfg.model_type == "gemma3_text" and _rope(cfg).get("full_attention", {}).get("rope_type", "default") != "default":
        lost.append("the RoPE scaling")
    if cfg.model_type == "phi3" and _rope(cfg).get("rope_type") == "longrope":
        lost.append("the LongRoPE factors")
    return lost


def load_gguf_back(path: Path):
    """The GGUF file read back by transformers' own GGUF loader (dequantised, float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                local_files_only=True).eval()
