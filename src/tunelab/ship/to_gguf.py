"""Write a transformers causal LM as a GGUF file (llama.cpp, Ollama, LM Studio).

Our own writer only because none is importable: llama.cpp's ``convert_hf_to_gguf.py`` is a script
in its repository, not in the ``gguf`` package. The ``gguf`` package (llama.cpp's Python writer,
``GGUFWriter``, and its NumPy quantisers) does the file format and the block quantisation; this
module follows ``convert_hf_to_gguf.py``'s conventions for the families in :data:`FAMILIES`
(Llama, Mistral, Qwen2/2.5, Qwen3):

* tensor names from ``gguf``'s own name map (``token_embd``, ``blk.N.attn_q`` ...), the output
  head left out when it is tied to the embeddings;
* for Llama-style graphs, the rotary permutation of ``q_proj`` / ``k_proj`` rows (Hugging Face
  stores the two rotary halves apart, GGML's Llama graph interleaves them), which transformers'
  GGUF loader undoes on reading; Qwen's NeoX-style graphs take the rows as they are;
* which tensors stay unquantised (:func:`tensor_type`: norms, 1-D tensors, biases, rows the block
  does not divide), matrices in the chosen type (F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0);
* the tokenizer as a GPT-2 style BPE vocabulary (tokens, token types, merges, special ids,
  chat template via ``gguf.SpecialVocab``) with the pre-tokenizer named by llama.cpp's hash of
  its reference string (the few hashes below are copied from ``convert_hf_to_gguf.py``).

SentencePiece tokenizers (Llama 2 style ``tokenizer.model``), rope scaling, sliding windows and
other architectures (Gemma, Phi-3: not written yet) are refused with a one-line error rather than
written half right.
"""

from __future__ import annotations

import json
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


#: The model types the writer knows (each was round-tripped through llama.cpp in tests/test_gguf_llamacpp.py).
FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", True),
    "mistral": Family("LLAMA", True),
    "qwen2": Family("QWEN2", False),
    "qwen3": Family("QWEN3", False),
}


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
    family = FAMILIES.get(cfg.model_type)
    if family is None or not type(model).__name__.endswith("ForCausalLM"):
        raise UserError(
            f"--gguf: tunelab writes GGUF for causal LMs of model_type {', '.join(FAMILIES)} (got "
            f"{type(model).__name__}, model_type {cfg.model_type!r}). {_CHECK_HINT}"
        )
    if getattr(cfg, "sliding_window", None):
        raise UserError(
            f"--gguf: sliding-window attention is not written by tunelab's GGUF writer (got sliding_window "
            f"{cfg.sliding_window}). {_CHECK_HINT}"
        )
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(
            f"--gguf: rope scaling {rope.get('rope_type')!r} is not written by tunelab's GGUF writer (got "
            f"{rope}). {_CHECK_HINT}"
        )
    return family


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: interleave the two rotary halves of each head's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their GGUF types, in id order (ids the tokenizer lacks become unused [PADi])."""
    import gguf

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError("--gguf: the tokenizer has no fast (tokenizers) backend. Export without --gguf")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if spec.get("model", {}).get("type") != "BPE" or not byte_level or spec["model"].get("byte_fallback"):
        raise UserError(
            "--gguf: only byte-level BPE (GPT-2 / Llama 3 style) tokenizers are written (got a "
            f"{spec.get('model', {}).get('type')} tokenizer{'' if byte_level else ' without byte-level pre-tokenizing'}). "
            "Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


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


def _add_hparams(writer, cfg, kind: str) -> None:
    """The model's hyper-parameters as ``convert_hf_to_gguf.py``'s ``TextModel`` writes them."""
    import gguf

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[QUANTS[kind].file_type])


def _add_tokenizer(writer, tokenizer, tokenizer_folder: Path, vocab_size: int) -> None:
    import gguf

    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)


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
    writer.add_name(name)
    _add_hparams(writer, cfg, kind)
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
        data, raw = _tensor_data(tensor, tensor_type(gguf_name, tuple(tensor.shape), kind, tied))
        writer.add_tensor(gguf_name, data, raw_dtype=raw)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def load_gguf_back(path: Path):
    """The GGUF file read back by transformers' own GGUF loader (dequantised, float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                local_files_only=True).eval()
