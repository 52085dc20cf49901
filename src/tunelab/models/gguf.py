"""GGUF files: the magic check and loading one as a plain (dequantised) transformers model.

Below both :mod:`tunelab.models.load` (which loads whatever the user named, a ``.gguf`` among
them) and :mod:`tunelab.models.registry` (whose ``smollm2-135m-instruct`` alias is built from
a GGUF). Importing this module does not import torch or transformers.
"""

from __future__ import annotations

import copy
import logging
import os
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import UserError, first_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger("tunelab.models.load")

GGUF_MAGIC = b"GGUF"


def check_gguf_magic(path: Path) -> None:
    """A ``.gguf`` file must start with the GGUF magic; else say so (not "no usable tokenizer found",
    which is what transformers' failure to parse it would otherwise turn into)."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as err:
        raise UserError(f"{path}: cannot read the GGUF file (got {err.strerror or err}). Check its permissions") from None
    if magic != GGUF_MAGIC:
        what = "empty" if not magic else f"bad magic {magic!r}"
        raise UserError(
            f"{path}: not a GGUF file (got {what}; a GGUF file starts with {GGUF_MAGIC!r}). Point model.path at "
            "a complete .gguf file (a cut-short download or a renamed file is not one)"
        )


def load_gguf_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = "sdpa",
) -> PreTrainedModel:
    """Load a ``.gguf`` file as an ordinary (dequantised, trainable, saveable) transformers model.

    transformers reads the file with ``gguf_file=`` and unpacks every tensor; a model loaded that
    way carries a GGUF quantizer that refuses ``save_pretrained`` and training, so the weights are
    moved into a freshly constructed model of the same class (peak memory: about twice the
    model in ``dtype``, float32 by default).
    """
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.initialization import no_init_weights

    dtype = dtype or torch.float32
    file = Path(path).expanduser()
    started = time.perf_counter()
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(file.parent),
            gguf_file=file.name,
            dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
            **kwargs,
        )
    except (OSError, ValueError, KeyError, IndexError, struct.error) as err:  # struct.error: a cut-short file
        raise UserError(
            f"model '{path}': transformers cannot read this GGUF file (got: {first_line(err)}). "
            "Use a GGUF of an architecture transformers supports, or the original Hugging Face folder."
        ) from err
    dequantised = time.perf_counter()

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        model = type(loaded)._from_config(config, dtype=dtype, **kwargs)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if loaded.generation_config is not None:
        model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    model.eval()
    logger.info(
        "model '%s': read and dequantised the GGUF in %.1f s (rebuilt as a plain model in %.1f s)",
        path,
        dequantised - started,
        time.perf_counter() - dequantised,
    )
    return model
