"""QLoRA: LoRA adapters on a base model loaded in 4 bits (Dettmers et al. 2023).

The base's linear layers are stored as bitsandbytes ``Linear4bit`` (NF4 or FP4 blocks, with
double quantisation of the block scales) and dequantised on the fly in ``compute_dtype``; the
LoRA adapters (every LoRA option works: DoRA, rsLoRA, LoRA+, layers) train in full precision.
transformers + bitsandbytes quantise at load time (this method's ``load_options`` hook hands
the ``BitsAndBytesConfig`` to ``load_model``); PEFT's ``prepare_model_for_kbit_training``
keeps the remaining float weights (norms, embeddings) in fp32. bitsandbytes >= 0.48 runs NF4
on CPU as well as on CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tunelab.errors import UserError
from tunelab.methods import lora

MERGEABLE = True  # the adapter merges into the *unquantised* base weights (load the base in 16/32 bit)


class Config(lora.Config):
    """LoRA on a 4-bit (NF4) quantised base through bitsandbytes: ~4x less memory for the frozen weights."""

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4.")
    double_quant: bool = Field(True, description="Also quantise the per-block scales (saves ~0.4 bits per weight).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the 4-bit weights are dequantised to for matmuls; auto: the model's dtype."
    )


def _dtype(name: str, default=None):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name, default)


def quantization_config(cfg: Config, dtype):
    import torch
    from transformers import BitsAndBytesConfig

    compute = _dtype(cfg.compute_dtype) if cfg.compute_dtype != "auto" else dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_options(cfg: Config, dtype) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:

        raise UserError("method qlora needs bitsandbytes: pip install 'bitsandbytes>=0.48'") from None
    return {"quantization_config": quantization_config(cfg, dtype)}


def same_kernel_in_eval(model):
    """Keep bitsandbytes' 4-bit layers on one CPU kernel in train and eval mode.

    In eval mode without gradients, bitsandbytes (0.50) repacks a CPU ``Linear4bit`` for its
    AVX512-BF16 kernel and keeps it packed afterwards, so after the first evaluation the base computes
    slightly different numbers (logits off by about 1e-3, in training as well), and a reloaded adapter no longer reproduces the trained model. Off, the layers always
    dequantise as in training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def apply(model, cfg: Config):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(same_kernel_in_eval(model), cfg)


lr_multiplier = lora.lr_multiplier
memory_linear_from = lora.memory_linear_from


def save(model, folder: Path) -> None:
    """A PEFT adapter folder (the 4-bit base is not saved: it is re-quantised from the base on load)."""
    model.save_pretrained(folder, safe_serialization=True)


def load(folder: Path, info: dict, dtype):
    """The base re-quantised exactly as in training, with the adapter on top (same outputs)."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from tunelab.models.load import load_model  # lazy: torch; the config imports this module

    cfg = Config.model_validate(info["method_config"])
    trained_dtype = _dtype(info.get("dtype", ""), dtype)
    base = load_model(info["base_model"], dtype=trained_dtype, **load_options(cfg, trained_dtype))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return PeftModel.from_pretrained(same_kernel_in_eval(base), folder)
