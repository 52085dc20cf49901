"""Load a model and its tokenizer from whatever the user named.

``name_or_path`` may be:

* a built-in alias (see :mod:`tunelab.models.registry`), built into the cache on first use;
* a local Hugging Face model folder (with ``config.json``);
* a path to a ``.gguf`` file, dequantised to a plain float model (slow: the file is parsed
  and every tensor unpacked; the time is logged);
* a Hugging Face hub id (``org/name``). The local Hugging Face cache is tried first; the hub
  is contacted only if the model is not cached, the hub is reachable and ``HF_HUB_OFFLINE``
  is not set. Nothing here reaches the network when ``HF_HUB_OFFLINE=1``.

Everything the user can fix (a wrong path, an uncached model on an offline machine, a folder
that is not a model) raises a one-line :class:`~tunelab.errors.UserError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import UserError, first_line
from tunelab.models.gguf import check_gguf_magic, load_gguf_model
from tunelab.models.registry import ALIASES, resolve_alias

logger = logging.getLogger(__name__)

# ``org/name`` or ``name``: what the hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TRUTHY = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class Source:
    """Where a model comes from, once ``name_or_path`` has been interpreted."""

    kind: Literal["folder", "gguf", "hub"]
    location: str  # folder path, .gguf file path, or hub id
    label: str  # what the user wrote, for messages


# --------------------------------------------------------------------------- resolving


def _looks_local(text: str) -> bool:
    """Whether ``text`` is meant as a filesystem path rather than a hub id."""
    if text.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return True
    if "\\" in text or text.count("/") > 1 or text.lower().endswith(".gguf"):
        return True
    first = text.split("/", 1)[0]
    return "/" in text and Path(first).exists()  # a path whose first part exists here


def resolve_source(name_or_path: str) -> Source:
    """Interpret what the user wrote as an alias, a folder, a ``.gguf`` file or a hub id."""
    text = str(name_or_path).strip()
    if not text:
        raise UserError(
            "model: no model given (got an empty name). Set model.path to an alias, a local folder, "
            "a .gguf file or a Hugging Face hub id."
        )
    alias_folder = resolve_alias(text)
    if alias_folder is not None:
        return Source("folder", str(alias_folder), text)

    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            check_gguf_magic(path)
            return Source("gguf", str(path), text)
        raise UserError(
            f"model '{text}': the path is a file but not a .gguf file (got {path.resolve()}). "
            "Point model.path at a Hugging Face model folder (with config.json) or a .gguf file."
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            target = "that file" if len(ggufs) == 1 else "one of them"
            hint = f" It holds {', '.join(ggufs)}: point model.path at {target}." if ggufs else ""
            raise UserError(
                f"model '{text}': the folder has no config.json, so it is not a Hugging Face model folder "
                f"(got {path.resolve()}). Point model.path at the folder that holds config.json.{hint}"
            )
        _check_config_json(path / "config.json")
        return Source("folder", str(path), text)
    if "/" not in text:
        close = get_close_matches(text, list(ALIASES), n=1, cutoff=0.8)
        if close:
            raise UserError(
                f"model '{text}': not a built-in alias (got '{text}'). Did you mean '{close[0]}'? "
                f"Aliases: {', '.join(ALIASES)}."
            )
    if _looks_local(text) or not _HUB_ID.match(text):
        raise UserError(
            f"model '{text}': no such file or folder (got {path.resolve()}). Check the path, "
            "or use an alias, a Hugging Face hub id (org/name) or an existing local model folder."
        )
    return Source("hub", text, text)


def portable_name(name_or_path: str) -> tuple[str, str]:
    """(a name another machine resolves to the same base model, its location here) for ``name_or_path``.

    The portable name is the alias for a built-in alias, the hub id for a hub model (also when it was
    given as a folder of the Hugging Face cache, ``.../models--org--name/snapshots/<commit>``), and
    otherwise the absolute path (a user's own folder or ``.gguf`` has no better name). The location is
    the folder or file loaded here (the hub id for a hub model).
    """
    source = resolve_source(name_or_path)
    if source.kind == "hub":
        return source.location, source.location
    if source.label in ALIASES:
        return source.label, source.location
    path = Path(source.location).resolve()
    for i, part in enumerate(path.parts[:-2]):
        if part.startswith("models--") and path.parts[i + 1] == "snapshots" and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1), str(path)
    return str(path), str(path)


def _check_config_json(path: Path) -> None:
    """A model folder's ``config.json`` must be a JSON object; a syntax error is named with its line and
    column (transformers would report it as a missing tokenizer or an unloadable folder)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (got byte {err.object[err.start:err.start + 1]!r} at offset "
                        f"{err.start}). Restore the model's original config.json") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg} (got "
                        f"{err.doc[err.pos:err.pos + 20]!r}). Fix the file or restore the model's original config.json") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it (got {err.strerror or err}). Check its permissions") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a JSON object (got {type(data).__name__}). "
                        "Restore the model's original config.json")


# --------------------------------------------------------------------------- the hub


def _hub_offline() -> bool:
    """Whether offline mode is on (read now: the hub library only reads it at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY or bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def offline_mode_from_env() -> Iterator[None]:
    """Honour ``HF_HUB_OFFLINE`` set after ``huggingface_hub`` was imported.

    The hub library reads the variable once, at import; even its cache-only lookups may
    otherwise make a request (e.g. to build its user agent). While loading, its flag follows
    the environment.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or not _hub_offline():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline machine fails fast (not after retries).

    Behind a proxy a direct connection may fail while the hub is usable; then we let the hub
    library try instead.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unreachable(hub_id: str) -> UserError:
    return UserError(
        f"model '{hub_id}': not a local folder, not in the Hugging Face cache, and the hub cannot be reached. "
        f"Download it on a connected machine (huggingface-cli download {hub_id}) and set model.path to "
        "the local folder."
    )


def _hub_error(hub_id: str, err: BaseException) -> UserError:
    """Turn a failed hub download into a one-line UserError."""
    from huggingface_hub import errors as hf_errors

    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, hf_errors.GatedRepoError) for c in chain):
        return UserError(
            f"model '{hub_id}': the hub repository is gated (got no access). Accept its license on "
            f"https://huggingface.co/{hub_id} and log in (huggingface-cli login), or use a local folder."
        )
    if any(isinstance(c, hf_errors.RepositoryNotFoundError) for c in chain):
        return UserError(
            f"model '{hub_id}': no such model on the Hugging Face hub (got a 'not found' answer). "
            "Check the spelling of the id, or set model.path to a local folder."
        )
    if any(
        isinstance(c, hf_errors.LocalEntryNotFoundError | hf_errors.OfflineModeIsEnabled | ConnectionError)
        or isinstance(c, socket.gaierror | TimeoutError)
        or type(c).__name__ in {"ConnectError", "ConnectTimeout", "ReadTimeout", "ProxyError"}
        for c in chain
    ):
        return _unreachable(hub_id)
    return UserError(
        f"model '{hub_id}': could not load it from the Hugging Face hub (got: {first_line(err)}). "
        "Check that the id names a transformers causal language model, or set model.path to a local folder."
    )


def _from_hub(hub_id: str, load: Any, what: str) -> Any:
    """Call ``load(local_files_only=...)``: the HF cache first, then the hub if allowed and reachable.

    ``load`` must honour ``local_files_only`` everywhere (transformers' adapter lookup needs
    it passed separately, as ``adapter_kwargs``), so the first attempt never goes online.
    """
    try:
        return load(local_files_only=True)
    except (OSError, ValueError) as err:
        logger.debug(
            "%s '%s' is not (completely) in the Hugging Face cache: %s", what, hub_id, first_line(err)
        )
    if _hub_offline() or not _hub_reachable():
        raise _unreachable(hub_id)
    logger.info("model '%s': downloading the %s from the Hugging Face hub", hub_id, what)
    try:
        return load(local_files_only=False)
    except (OSError, ValueError) as err:
        raise _hub_error(hub_id, err) from err


def _place(model: PreTrainedModel, device_map: Any, label: str) -> PreTrainedModel:
    """Move a model built in memory (from a GGUF) to the device ``device_map`` names."""
    if device_map is None:
        return model
    if device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise UserError(
                f"model '{label}': a GGUF model cannot be split over several devices (got device_map "
                f"{device_map}). Use a single device, or convert the GGUF to a Hugging Face folder first."
            )
        device_map = devices.pop()
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    return model.to(torch.device(device_map))


# --------------------------------------------------------------------------- public API


def _load_tokenizer_from(source: Source) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if source.kind == "hub":
        tokenizer = _from_hub(
            source.location,
            lambda **kw: AutoTokenizer.from_pretrained(source.location, **kw),
            "tokenizer",
        )
    else:
        if source.kind == "gguf":
            file = Path(source.location)
            args, kwargs = (str(file.parent),), {"gguf_file": file.name}
        else:
            args, kwargs = (source.location,), {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(*args, local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError, IndexError, struct.error) as err:  # struct.error: a cut-short GGUF
            if source.kind == "gguf":  # the magic was right, so the file is damaged or of an unknown layout
                raise UserError(
                    f"model '{source.label}': transformers cannot read the tokenizer of this GGUF file (got: "
                    f"{first_line(err)}). Use a complete GGUF of an architecture transformers supports, or the "
                    "original Hugging Face folder."
                ) from err
            raise UserError(
                f"model '{source.label}': no usable tokenizer found (got: {first_line(err)}). "
                "Make sure the model folder holds its tokenizer files (tokenizer.json or tokenizer.model "
                "and tokenizer_config.json)."
            ) from err
    _ensure_pad_token(tokenizer, source.label)
    return tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, label: str) -> None:
    """Give the tokenizer a pad token (its eos, else its unk) if it has none. Padding side is left alone."""
    if tokenizer.pad_token is not None:
        return
    for name in ("eos_token", "unk_token"):
        token = getattr(tokenizer, name)
        if token is not None:
            tokenizer.pad_token = token
            logger.debug("model '%s': the tokenizer has no pad token; using its %s %r", label, name, token)
            return
    raise UserError(
        f"model '{label}': the tokenizer has no pad, eos or unk token (got none of them). "
        "Use a tokenizer that defines an end-of-sequence token."
    )


def _load_model_from(
    source: Source,
    *,
    dtype: torch.dtype,
    attn_implementation: str | None,
    quantization_config: Any,
    device_map: Any,
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        if quantization_config is not None:
            raise UserError(
                f"model '{source.label}': a .gguf file cannot be re-quantised on load (got a "
                f"quantization_config of type {type(quantization_config).__name__}). Drop the quantization "
                "option, or start from the original Hugging Face folder."
            )
        model = load_gguf_model(source.location, dtype=dtype, attn_implementation=attn_implementation)
        return _place(model, device_map, source.label)

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map

    def from_pretrained(**kw):
        try:
            return AutoModelForCausalLM.from_pretrained(source.location, **kwargs, **kw)
        except ValueError as err:
            # a model without SDPA in transformers (Gemma 2: its attention soft-cap) runs eager, as it would
            # with attn_implementation=None, rather than not loading at all
            if kwargs.get("attn_implementation") != "sdpa" or "scaled_dot_product_attention" not in str(err):
                raise
            logger.debug("model '%s': no SDPA in transformers for it, loading with eager attention", source.label)
            return AutoModelForCausalLM.from_pretrained(source.location, **{**kwargs, "attn_implementation": "eager"},
                                                        **kw)

    started = time.perf_counter()
    if source.kind == "hub":
        model = _from_hub(
            source.location,
            lambda **kw: from_pretrained(adapter_kwargs={"local_files_only": kw["local_files_only"]}, **kw),
            "model",
        )
    else:
        try:
            model = from_pretrained(local_files_only=True, adapter_kwargs={"local_files_only": True})
        except (OSError, ValueError, KeyError) as err:
            raise UserError(
                f"model '{source.label}': transformers cannot load this folder (got: {first_line(err)}). "
                "Check that it is a complete causal language model folder (config.json plus *.safetensors)."
            ) from err
    logger.debug("model '%s': loaded in %.1f s", source.label, time.perf_counter() - started)
    return model


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of an alias, local folder, ``.gguf`` file or hub id.

    The tokenizer always has a pad token (its eos token if it defines none); its padding side
    is left as the model ships it.
    """
    with offline_mode_from_env():
        return _load_tokenizer_from(resolve_source(name_or_path))


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
    quantization_config: Any = None,
    device_map: Any = None,
) -> PreTrainedModel:
    """Load a causal language model from an alias, local folder, ``.gguf`` file or hub id.

    ``attn_implementation=None`` lets transformers choose. ``quantization_config`` and
    ``device_map`` are passed to ``from_pretrained`` (a ``.gguf`` accepts only a single device).
    """
    with offline_mode_from_env():
        return _load_model_from(
            resolve_source(name_or_path),
            dtype=dtype,
            attn_implementation=attn_implementation,
            quantization_config=quantization_config,
            device_map=device_map,
        )


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
    quantization_config: Any = None,
    device_map: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model` and :func:`load_tokenizer` together; the model's pad id follows the tokenizer's."""
    with offline_mode_from_env():
        source = resolve_source(name_or_path)
        tokenizer = _load_tokenizer_from(source)
        model = _load_model_from(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            quantization_config=quantization_config,
            device_map=device_map,
        )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """A JSON-friendly summary of a model for the run's environment record.

    Parameters shared between modules (tied embeddings) are counted once. For quantised
    weights the counts are of stored elements, which may be fewer than logical parameters.
    """
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    try:
        first = next(model.parameters())
        dtype, device = str(first.dtype).removeprefix("torch."), str(first.device)
    except StopIteration:
        dtype, device = None, None
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return {
        "architecture": architectures[0],
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None),
        "parameters": total,
        "trainable_parameters": trainable,
        "trainable_percent": round(100.0 * trainable / total, 4) if total else 0.0,
        "dtype": dtype,
        "device": device,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "quantization": (quantization or {}).get("quant_method") if quantization else None,
    }
