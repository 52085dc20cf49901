"""Settings of the shipping verbs: ``generate``, ``chat``, ``predict``, ``export`` and ``serve``.

Kept free of torch so that building the command line stays fast; :mod:`tunelab.ship.serve`
re-exports :class:`ServeSettings` and :func:`is_loopback`.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.cli_args import POSITIONAL, field_of
from tunelab.errors import UserError
from tunelab.eval.settings import CHECKPOINT_HELP, GenerationSettings

__all__ = ["ChatOptions", "ExportOptions", "GenerateOptions", "InferenceOptions", "PredictOptions", "ServeOptions",
           "ServeSettings", "is_loopback"]

TARGET_HELP = "A run directory, a weights folder, an alias, a HF folder or a .gguf file."


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InferenceOptions(_Options):
    """A model to load and how to decode with it (``generate``, ``chat``, ``predict``)."""

    target: str = Field(description=TARGET_HELP, json_schema_extra=POSITIONAL)
    checkpoint: str = Field("final", description=CHECKPOINT_HELP)
    system: str | None = Field(None, description="System prompt.")
    max_new_tokens: int = field_of(GenerationSettings, "max_new_tokens", default=256)
    temperature: float = field_of(GenerationSettings, "temperature", description="0 = greedy; > 0 samples.")
    top_p: float = field_of(GenerationSettings, "top_p")
    seed: int | None = field_of(GenerationSettings, "seed", default=None)

    def sampling(self) -> dict:
        """Keyword arguments of :func:`tunelab.ship.inference.generate_reply`."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed}


class GenerateOptions(InferenceOptions):
    """``tunelab generate``."""

    prompt: list[str] = Field(description="User message; each gets its own reply.",
                              json_schema_extra={"cli": {"repeat": True}})


class ChatOptions(InferenceOptions):
    """``tunelab chat``."""

    compare_base: bool = Field(False, description="After each answer, show the base model's (an adapter run with "
                               "its adapters disabled).")


class PredictOptions(InferenceOptions):
    """``tunelab predict``."""

    system: str | None = Field(None, description="System prompt for rows that have none.")
    data: str = Field(description="Input rows (.jsonl/.json/.csv/.parquet): messages, alpaca, sharegpt, prompt or text.")
    out: str = Field(description="JSONL output; re-running continues after the rows already in it.")
    batch_size: int = field_of(GenerationSettings, "batch_size", description="Rows per forward pass.")
    task: str | None = Field(None, description="A multi-task run: the task whose head (or LM) predicts.")


class ExportOptions(_Options):
    """``tunelab export``."""

    target: str = Field(description="A run directory, a weights folder, or a model.", json_schema_extra=POSITIONAL)
    out: str = Field(description="The folder to write (must not exist or be empty, unless --force).")
    merge: bool = Field(False, description="Fold the adapters into the base weights (mergeable methods).")
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(
        None, description="Weights dtype (default: the base model's published dtype).")
    gguf: bool = Field(False, description="Also write GGUF files of the merged model (Llama, Mistral, Qwen2, "
                       "Qwen3), each run in llama.cpp and checked before success.")
    quant: tuple[str, ...] = Field((), description="GGUF types to write (implies --gguf): f32, f16, bf16, q8_0, "
                                   "q6_k, q5_k_m, q5_1, q5_0, q4_k_m, q4_1, q4_0; K-quants need "
                                   "pip install 'tunelab[gguf]' (default: the --dtype's float type).")
    ollama: bool = Field(False, description="Also write an Ollama Modelfile (chat template, stop tokens, sampling "
                         "defaults) for the first GGUF type (implies --gguf).")
    lora_gguf: bool = Field(False, description="A LoRA run: also its adapters as a llama.cpp GGUF adapter (--lora) "
                            "beside the base as F16 GGUF, checked against the merged model.")
    verify: bool = Field(True, description="Run each GGUF file (llama.cpp; transformers without it) and check "
                         "greedy tokens / perplexity.")
    force: bool = Field(False, description="Replace a non-empty --out.")
    checkpoint: str = Field("final", description=CHECKPOINT_HELP)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeSettings(_Options):
    """Limits and network settings of the server (each is a ``tunelab serve`` option)."""

    host: str = Field("127.0.0.1", description="Address to bind (other than loopback needs --api-key).")
    port: int = Field(8000, description="Port to bind.")
    api_keys: tuple[str, ...] = Field(
        (), description="Accepted bearer key (also TUNELAB_API_KEYS=k1,k2).",
        json_schema_extra={"cli": {"flag": "--api-key", "repeat": True, "metavar": "KEY"}})
    max_body_bytes: int = Field(1_000_000, description="Larger request bodies get 413.")
    max_prompt_tokens: int = Field(4096, description="Longer prompts get 400.")
    max_tokens_limit: int = Field(1024, description="Largest max_tokens accepted (else 400).")
    default_max_tokens: int = Field(256, description="max_tokens when a chat request gives none.")
    max_n: int = Field(4, description="Largest n accepted (else 400).")
    max_batch_inputs: int = Field(64, description="Texts per /v1/classify request, prompts per /v1/completions "
                                  "request (more get 400).")
    max_concurrency: int = Field(1, description="Requests generating at once.")
    max_queue: int = Field(16, description="Requests waiting for a slot; more get 429.")
    queue_timeout_s: float = Field(30.0, description="Seconds a request may wait (then 503).",
                                   json_schema_extra={"cli": {"flag": "--queue-timeout"}})
    request_timeout_s: float = Field(120.0, description="Seconds of generation per request (then it stops, "
                                     "finish_reason 'length').", json_schema_extra={"cli": {"flag": "--request-timeout"}})
    max_in_flight: int | None = Field(
        None, description="HTTP requests in progress at once, all routes; more get a JSON 503 (default: "
        "max-concurrency + max-queue + 32).")

    @property
    def in_flight_limit(self) -> int:
        """Requests the guard lets in at once; more get a JSON 503 (default: the slots, the queue and 32 more)."""
        return self.max_in_flight or self.max_concurrency + self.max_queue + 32

    def check(self) -> None:
        """Refuse an unsafe or impossible configuration with a one-line UserError."""
        if not is_loopback(self.host) and not self.api_keys:
            raise UserError(
                f"--host {self.host}: binding beyond this machine needs API keys (got none). Pass --api-key KEY "
                "(or set TUNELAB_API_KEYS), or keep the default --host 127.0.0.1"
            )
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens_limit", "max_n", "max_concurrency",
                     "max_batch_inputs", "max_in_flight"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be at least 1 (got {getattr(self, name)})")
        if any(len(k) < 8 for k in self.api_keys):
            raise UserError("--api-key: keys must be at least 8 characters (got a shorter one). Use a random key, "
                            "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")


class ServeOptions(ServeSettings):
    """``tunelab serve``: the server settings, plus what to serve."""

    targets: list[str] = Field(description="Run directories, weights folders or models.",
                               json_schema_extra={"cli": {"positional": True, "nargs": "+",
                                                          "metavar": "RUN_OR_MODEL"}})
    checkpoint: str = Field("final", description="Which weights of the runs: final or best.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("fp32", description="Weights dtype for serving.")

    def settings(self, env_keys: str = "") -> ServeSettings:
        """The server settings, with the keys of ``env_keys`` (``TUNELAB_API_KEYS``: ``k1,k2``) added."""
        keys = self.api_keys + tuple(k.strip() for k in env_keys.split(",") if k.strip())
        return ServeSettings(**{**self.model_dump(include=set(ServeSettings.model_fields)), "api_keys": keys})
