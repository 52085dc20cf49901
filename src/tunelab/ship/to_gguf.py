"""Write a Llama-family transformers model as a GGUF file (llama.cpp, Ollama, LM Studio).

The ``gguf`` package (llama.cpp's own Python writer, ``GGUFWriter``) does the file format; this
module follows llama.cpp's ``convert_hf_to_gguf.py`` conventions for ``LlamaForCausalLM``:

* tensor names from ``gguf``'s own name map (``token_embd``, ``blk.N.attn_q`` ...), the output
  head left out when it is tied to the embeddings;
* the rotary permutation of ``q_proj`` / ``k_proj`` rows (Hugging Face stores the two rotary
  halves apart, GGML interleaves them), which transformers' GGUF loader undoes on reading;
* 1-D tensors (norms) always F32, matrices in the chosen type (F32, F16 or BF16);
* the tokenizer as a GPT-2 style BPE vocabulary (tokens, token types, merges, special ids,
  chat template via ``gguf.SpecialVocab``) with the pre-tokenizer named by llama.cpp's hash of
  its reference string (the few hashes below are copied from ``convert_hf_to_gguf.py``).

SentencePiece tokenizers (Llama 2 style ``tokenizer.model``), rope scaling and other
architectures are refused with a one-line error rather than written half right.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import UserError

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

GGUF_TYPES = ("f32", "f16", "bf16")
_SUPPORTED = ("llama", "mistral")


def bpe_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer ("default" when the hash is unknown)."""
    digest = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    return _KNOWN_PRE.get(digest, "default")


def check_supported(model) -> None:
    """Raise a one-line UserError unless ``model`` is a causal Llama-family model we can write."""
    cfg = model.config
    if cfg.model_type not in _SUPPORTED or not type(model).__name__.endswith("ForCausalLM"):
        raise UserError(
            f"--gguf: only Llama-family causal LMs can be written as GGUF (got {type(model).__name__}, model_type "
            f"{cfg.model_type!r}). Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    if getattr(cfg, "sliding_window", None):
        raise UserError(
            f"--gguf: sliding-window attention is not written as a plain Llama GGUF (got sliding_window "
            f"{cfg.sliding_window}). Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(
            f"--gguf: rope scaling {rope.get('rope_type')!r} is not written by tunelab's GGUF writer (got "
            f"{rope}). Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py"
        )


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
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


def _tensor_data(t: torch.Tensor, kind: str) -> tuple[np.ndarray, object]:
    """(numpy data, raw GGML type or None) for one tensor in ``kind`` (1-D tensors stay F32)."""
    import gguf

    data = t.detach().to(torch.float32).cpu().numpy()
    if data.ndim <= 1 or kind == "f32":
        return data, None
    if kind == "f16":
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def write_gguf(model, tokenizer, tokenizer_folder: Path, path: Path, *, kind: str = "f16", name: str = "model") -> Path:
    """Write ``model`` (+ tokenizer, chat template) to ``path`` as GGUF with matrices in ``kind``.

    ``tokenizer_folder`` holds the saved tokenizer files (``gguf.SpecialVocab`` reads the merges,
    special-token ids and chat template from them).
    """
    import gguf

    check_supported(model)
    if kind not in GGUF_TYPES:
        raise UserError(f"--dtype: GGUF matrices can be {', '.join(GGUF_TYPES)} (got {kind!r}). Choose one")
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[kind]

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
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
    writer.add_file_type(file_type)

    tokens, types = _vocab(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for a tied head
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"--gguf: no GGUF name for tensor {hf_name!r}. Export without --gguf")
        if hf_name.endswith("q_proj.weight"):
            tensor = _permute(tensor, n_head)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _permute(tensor, n_kv)
        data, raw = _tensor_data(tensor, kind)
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
