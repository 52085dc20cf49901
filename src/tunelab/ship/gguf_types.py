"""The GGUF tensor types ``tunelab export --quant`` writes, and how each one is produced and checked.

A registry, light at import (no numpy, no gguf), so ``tunelab export --help`` and the option checks
never load the model stack:

* ``numpy``: the ``gguf.GGMLQuantizationType`` name that the ``gguf`` package quantises to in
  NumPy (F32/F16/BF16 and the 32-weight block types Q8_0, Q5_1, Q5_0, Q4_1, Q4_0), or None for the
  K-quant mixes, which only llama.cpp's own quantizer (``llama_model_quantize`` in
  ``llama-cpp-python``, the ``[gguf]`` extra) writes, starting from the F16 file;
* ``file_type``: the ``gguf.LlamaFileType`` / ``llama_ftype`` the file declares;
* ``ppl_bound``: for the lossy types, the largest relative perplexity increase over the F16 file
  (both run in llama.cpp on the same held-out text) that the export accepts. F32/F16 are checked
  token by token against the Hugging Face model instead (greedy tokens identical, top-1 logits
  within ``GREEDY_LOGIT_TOLERANCE``). The bounds are quality gates by bit width (8-bit 3%, 6-bit 6%,
  5-bit 10-12%, 4-bit K-quant 10%, 4-bit blocks 20%); ``docs/deploy.md`` has the measured figures of
  the SmolLM2 demo run, on which Q5_1, Q5_K_M and Q4_0 fail their gate.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.errors import UserError


@dataclass(frozen=True)
class QuantType:
    name: str
    numpy: str | None
    file_type: str
    ppl_bound: float | None
    about: str


QUANTS: dict[str, QuantType] = {q.name: q for q in (
    QuantType("f32", "F32", "ALL_F32", None, "float32, the exact weights"),
    QuantType("f16", "F16", "MOSTLY_F16", None, "float16; the reference the quantised files are measured against"),
    QuantType("bf16", "BF16", "MOSTLY_BF16", 0.01, "bfloat16"),
    QuantType("q8_0", "Q8_0", "MOSTLY_Q8_0", 0.03, "8-bit blocks of 32 (NumPy)"),
    QuantType("q6_k", None, "MOSTLY_Q6_K", 0.06, "6-bit K-quant (llama.cpp)"),
    QuantType("q5_k_m", None, "MOSTLY_Q5_K_M", 0.10, "5-bit K-quant mix (llama.cpp)"),
    QuantType("q5_1", "Q5_1", "MOSTLY_Q5_1", 0.10, "5-bit blocks with offset (NumPy)"),
    QuantType("q5_0", "Q5_0", "MOSTLY_Q5_0", 0.12, "5-bit blocks (NumPy)"),
    QuantType("q4_k_m", None, "MOSTLY_Q4_K_M", 0.10, "4-bit K-quant mix (llama.cpp)"),
    QuantType("q4_1", "Q4_1", "MOSTLY_Q4_1", 0.20, "4-bit blocks with offset (NumPy)"),
    QuantType("q4_0", "Q4_0", "MOSTLY_Q4_0", 0.20, "4-bit blocks (NumPy)"),
)}

#: F32/F16 files: the largest |llama.cpp top-1 logit - Hugging Face's| / max |Hugging Face logit|.
GREEDY_LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 2e-2}
#: What a model's own dtype is exported as when --gguf is given without --quant.
DEFAULT_FOR_DTYPE = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def parse_quants(values) -> list[str]:
    """``--quant`` values (names, or comma-separated names) -> known type names, in order, no repeats."""
    names: list[str] = []
    for value in [values] if isinstance(values, str) else values or ():
        for name in str(value).lower().split(","):
            name = name.strip()
            if not name:
                continue
            if name not in QUANTS:
                raise UserError(f"--quant: unknown GGUF type {name!r}. Choose from {', '.join(QUANTS)}")
            if name not in names:
                names.append(name)
    return names


def needs_llama_cpp(name: str) -> bool:
    """True for the types only llama.cpp's quantizer writes (the K-quant mixes)."""
    return QUANTS[name].numpy is None
