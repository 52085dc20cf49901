"""Keep library chatter off the user's terminal: tunelab prints its own progress.

transformers' per-load tqdm bars ("Loading weights", "Converting GGUF tensors") and its
deprecation warnings would otherwise drown the lines that matter. ``TUNELAB_VERBOSE=1``
turns them back on for debugging.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    if os.environ.get("TUNELAB_VERBOSE"):
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. the GGUF dequantisation bar; ours are rich bars
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"peft\..*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    # accelerate, in each CPU rank: it sets the threads to the cores / ranks, as tunelab then does (train.threads)
    warnings.filterwarnings("ignore", message=r"OMP_NUM_THREADS/MKL_NUM_THREADS unset", module=r"accelerate\.state")
    # bitsandbytes warns at import that it cannot fetch an optional CPU kernel from the hub (it has its own);
    # where the `kernels` package is installed, it says offline that it skips a hub trust check
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # where DeepSpeed is installed, accelerate imports it in every save_pretrained (to unwrap a DeepSpeedEngine);
    # on a machine without a GPU its import then warns "Setting accelerator to CPU"; tunelab says its device itself
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _CpuFallbackWarning) for f in ds_logger.filters):
        ds_logger.addFilter(_CpuFallbackWarning())
    # transformers reads its level when it first logs, and its bars follow HF_HUB_DISABLE_PROGRESS_BARS (above):
    # importing it here would cost about 1 s in every process, the launcher of `tunelab train` among them
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # already imported (the Python API, tests): it has read its settings
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


class _CpuFallbackWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")
