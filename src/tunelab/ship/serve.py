"""``tunelab serve``: an OpenAI-compatible HTTP API over one or more runs (FastAPI + uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(streaming server-sent events or not), ``POST /v1/classify`` (classification runs),
``POST /v1/score`` (reward models: the scalar reward of OpenAI-style ``messages`` ending in the
reply), ``GET /health`` and ``GET /metrics`` (Prometheus, ``prometheus-client``).

Several adapter runs over the same base share one copy of the base weights: the first loads
the base and its adapter (PEFT), the others are added with ``load_adapter`` and picked per
request by the ``model`` field (``set_adapter``); the base itself is served under its own name
with the adapters disabled. Full runs and plain models are loaded on their own.

Hardening (every limit is a :class:`ServeSettings` field and a CLI option):

* binds 127.0.0.1 by default; binding elsewhere needs API keys (``Authorization: Bearer``,
  compared with ``hmac.compare_digest`` against every key);
* request bodies over ``max_body_bytes`` get 413 before they are parsed; prompts over
  ``max_prompt_tokens``, ``max_tokens`` over ``max_tokens_limit``, ``n`` over ``max_n`` get 400;
* ``max_concurrency`` requests generate at once, ``max_queue`` more wait (then 429); a request
  that waited ``queue_timeout_s`` gets 503; generation stops after ``request_timeout_s``
  (``finish_reason: "length"``) and when a streaming client disconnects;
* at most ``max_in_flight`` HTTP requests (any route) are in progress at once; more get 503
  ``server_overloaded`` from the ASGI guard (uvicorn's own ``limit_concurrency`` is not used: it
  answers in plain text);
* every error is an OpenAI-style JSON body ``{"error": {"message", "type", "param", "code"}}``
  with the right status; unexpected exceptions are logged and answered with a plain 500.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from tunelab.errors import require
from tunelab.fsutil import check_name

try:
    from fastapi import Request  # a module-level name: FastAPI resolves the handlers' annotations here
except ImportError:  # the [serve] extra is not installed: create_app says so in one line
    Request = None
import socket

from tunelab.ship.inference import (
    SCORE,
    Loaded,
    classify,
    left_pad,
    load_for_inference,
    read_info,
    reply_tokens,
    score_replies,
    weights_folder,
)
from tunelab.ship.settings import ServeSettings, is_loopback  # noqa: F401  (re-exported)

logger = logging.getLogger("tunelab.serve")


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` body with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- models


@dataclass
class Served:
    """One name the API answers to: a loaded model, and which adapter of it (None: the base/plain model)."""

    name: str
    loaded: Loaded
    adapter: str | None
    lock: threading.Lock
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def kind(self) -> str:
        return self.loaded.kind

    @contextlib.contextmanager
    def active(self):
        """Hold the model's lock with this adapter active (PEFT ``set_adapter`` / ``disable_adapter``)."""
        with self.lock:
            model = self.loaded.model
            if not self.loaded.is_adapter:
                yield
            elif self.adapter is None:
                with model.disable_adapter():
                    yield
            else:
                model.set_adapter(self.adapter)
                yield

    @property
    def context_length(self) -> int:
        model = self.loaded.model  # a tunelab classifier is wrapped (ship.inference): its config is inside
        cfg = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
        return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)


def _unique(name: str, taken) -> str:
    base, k = name, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def load_models(targets: list[str], *, checkpoint: str = "final", dtype: torch.dtype = torch.float32
                ) -> dict[str, Served]:
    """Load every target; adapter runs on the same base (and task) share one base model.

    Every served name (the run's name, or the target's last path component) is checked with
    :func:`check_name` before anything is loaded: it is the ``model`` clients route by, so
    ``../../x``, an empty name or one with '/' is a one-line :class:`UserError` at start-up.
    """
    from transformers import AutoTokenizer

    plan, names = [], set()
    for target in targets:
        folder = weights_folder(target, checkpoint)
        info = read_info(folder) if folder is not None else {}
        name = _unique(str(info.get("run") or Path(str(target).rstrip("/")).name), names)
        names.add(check_name(name, f"serve {target}: the served name (the run's name)"))
        plan.append((target, folder, info, name))

    served: dict[str, Served] = {}
    groups: dict[tuple[str, str], Served] = {}  # (base model, task) -> the served base of that group
    for i, (target, folder, info, name) in enumerate(plan):
        # PEFT's adapter key: torch module names cannot hold '.', which a served name may
        peft_name = f"a{i}_{name.replace('.', '_')}"
        key = (info.get("base_model"), info.get("task"))
        if folder is not None and (folder / "adapter_config.json").is_file() and key in groups:
            base = groups[key]
            base.loaded.model.load_adapter(folder, adapter_name=peft_name)
            tok = AutoTokenizer.from_pretrained(folder)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            loaded = dataclasses.replace(base.loaded, tokenizer=tok, folder=folder, method=info["method"],
                                         description=f"{info['method']} on {info['base_model']} ({folder})",
                                         id2label=info.get("id2label"))
            served[name] = Served(name, loaded, peft_name, base.lock)
            continue
        loaded = load_for_inference(target, checkpoint=checkpoint, dtype=dtype, adapter_name=peft_name)
        lock = threading.Lock()
        served[name] = Served(name, loaded, peft_name if loaded.is_adapter else None, lock)
        if loaded.is_adapter:
            base_name = _unique(Path(str(info["base_model"]).rstrip("/")).name, names)
            names.add(base_name)
            groups[key] = Served(base_name, loaded, None, lock)
            if loaded.kind == "generation":  # a base classifier would answer with an untrained head
                served[base_name] = groups[key]
    return served


# ----------------------------------------------------------------------------- request bodies

# torch.manual_seed takes any value that fits a signed or an unsigned 64-bit integer (a negative
# seed wraps to the same unsigned one); anything larger raises OverflowError inside generation.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# transformers' stop_strings precompute a table per (stop string, vocabulary token): its time and
# memory grow with the string's length (thousands of characters reach gigabytes), so each stop
# string is capped; stop sequences in practice are a few characters.
MAX_STOP_CHARS = 64


def _unicode(text: str) -> str:
    """Refuse text the tokenizer cannot take: JSON escapes can smuggle in lone UTF-16 surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = Field(0, ge=0)  # vLLM's extension: no end-of-sequence before this many tokens


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: Text | list[Text]
    echo: bool = False


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Text
    input: Text | list[Text]


class ScoreRequest(BaseModel):
    """``messages``: one conversation whose last message is the assistant's reply to score; ``input``:
    several such conversations. Exactly one of the two."""

    model_config = ConfigDict(extra="forbid")
    model: Text
    messages: list[ChatMessage] | None = None
    input: list[list[ChatMessage]] | None = None


# ----------------------------------------------------------------------------- generation


class _Cancel:
    """A stopping criterion that ends generation when the client has gone away."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Generation:
    texts: list[str]
    finish: list[str]
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """The served models and the blocking generation / classification calls (run in threads)."""

    def __init__(self, models: dict[str, Served], settings: ServeSettings):
        self.models, self.settings = models, settings

    def get(self, name: str, kind: str) -> Served:
        served = self.models.get(name)
        if served is None:
            raise ApiError(404, f"The model '{name}' does not exist. Models: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        if served.kind != kind:
            use = ENDPOINTS.get(served.kind, "/v1/chat/completions or /v1/completions")
            raise ApiError(400, f"The model '{name}' is a {served.kind} model; use {use}", param="model",
                           code="wrong_endpoint")
        return served

    def check_prompt(self, served: Served, ids: list[int], max_new: int) -> None:
        s = self.settings
        if not ids:  # an empty prompt: the model has no position to predict from
            raise ApiError(400, "The prompt is empty (it has no tokens)", param="prompt", code="empty_prompt")
        if len(ids) > s.max_prompt_tokens:
            raise ApiError(400, f"The prompt has {len(ids)} tokens; this server accepts at most {s.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
        if len(ids) + max_new > served.context_length:
            raise ApiError(400, f"The prompt ({len(ids)} tokens) plus max_tokens ({max_new}) exceeds the model's "
                           f"context length ({served.context_length})", param="max_tokens",
                           code="context_length_exceeded")

    def generate(self, served: Served, ids: list[int], *, n: int, max_new: int, temperature: float, top_p: float,
                 seed: int | None, stop: list[str], min_new: int = 0, streamer=None,
                 cancel: _Cancel | None = None) -> Generation:
        from transformers import StoppingCriteriaList

        from tunelab.ship.inference import sampling_kwargs

        tok = served.loaded.tokenizer
        kwargs = sampling_kwargs(tok, temperature=temperature, top_p=top_p)
        input_ids, mask = left_pad([ids] * n, kwargs["pad_token_id"])
        extra: dict[str, Any] = {"stop_strings": stop, "tokenizer": tok} if stop else {}
        with served.active(), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = served.loaded.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=min_new or None,
                streamer=streamer,
                max_time=self.settings.request_timeout_s,
                stopping_criteria=StoppingCriteriaList([cancel]) if cancel else None, **kwargs, **extra)
        eos = {kwargs["eos_token_id"]} if isinstance(kwargs["eos_token_id"], int) else set(kwargs["eos_token_id"] or [])
        texts, finish, used = [], [], 0
        for row in out[:, input_ids.shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in eos), None)
            tokens = row if end is None else row[:end]
            used += len(tokens) + (end is not None)
            text = tok.decode(tokens, skip_special_tokens=True)
            cut = _first_stop(text, stop)
            if cut is not None:
                text = text[:cut]
            texts.append(text)
            finish.append("stop" if end is not None or cut is not None else "length")
        return Generation(texts, finish, len(ids), used)

    def classify(self, served: Served, texts: list[str]) -> list[dict]:
        with served.active(), torch.inference_mode():
            return classify(served.loaded, texts, batch_size=16, max_length=self.settings.max_prompt_tokens)

    def score(self, served: Served, sequences: list[tuple[int, ...]]) -> list[float]:
        with served.active(), torch.inference_mode():
            return score_replies(served.loaded, sequences, batch_size=16)


ENDPOINTS = {"classification": "/v1/classify", SCORE: "/v1/score"}  # the route of each non-generating kind


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: give at most 4 non-empty strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: each stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    return stops


# ----------------------------------------------------------------------------- admission


class Admission:
    """``max_concurrency`` requests run; up to ``max_queue`` wait in FIFO order (else 429); waiting too long is 503.

    A freed slot is handed straight to the oldest waiter, so a newcomer never overtakes the queue.
    """

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.free = settings.max_concurrency
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.running = 0

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in self.waiters)

    def full(self) -> bool:
        """No free slot and a full queue: a new request would get 429."""
        return self.free == 0 and self.waiting >= self.settings.max_queue

    def busy_error(self) -> ApiError:
        self.metrics.rejected.labels("queue_full").inc()
        return ApiError(429, f"The server is busy ({self.waiting} requests queued). Retry after a short wait",
                        type="rate_limit_error", code="server_busy")

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
        else:
            if self.full():
                raise self.busy_error()
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            self.metrics.queued.inc()
            try:
                await asyncio.wait_for(fut, self.settings.queue_timeout_s)
            except TimeoutError:
                if fut.done() and not fut.cancelled():
                    self._hand_over()  # the slot arrived just as the time ran out: pass it on
                self.metrics.rejected.labels("queue_timeout").inc()
                raise ApiError(503, f"Waited {self.settings.queue_timeout_s:g} s for a free slot. Retry later",
                               type="server_error", code="queue_timeout") from None
            finally:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
                self.metrics.queued.dec()
        self.running += 1
        self.metrics.running.inc()

    def release(self) -> None:
        self.running -= 1
        self.metrics.running.dec()
        self._hand_over()

    def _hand_over(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps may live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tunelab_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("tunelab_request_seconds", "Time to the end of the response", ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.prompt_tokens = Counter("tunelab_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("tunelab_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.running = Gauge("tunelab_requests_running", "Requests generating now", registry=r)
        self.queued = Gauge("tunelab_requests_queued", "Requests waiting for a slot", registry=r)
        self.rejected = Counter("tunelab_requests_rejected", "Requests turned away by admission control", ["reason"],
                                registry=r)


# ----------------------------------------------------------------------------- the ASGI guard


_QUEUED = {"/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/score"}
_ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/score", "/health",
           "/metrics"}


class Guard:
    """Pure ASGI middleware: cap the requests in progress (503), refuse oversize bodies (413) before
    parsing, and count every response.

    The body (at most ``limit`` bytes) is read here and replayed to the app; later ``receive``
    calls go to the server, so streaming responses still see a client's disconnect.
    """

    def __init__(self, app, limit: int, metrics: Metrics, admission: Admission, max_in_flight: int):
        self.app, self.limit, self.metrics, self.admission = app, limit, metrics, admission
        self.max_in_flight, self.in_flight = max_in_flight, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        started, status = time.perf_counter(), {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if self.in_flight >= self.max_in_flight:  # before anything else: this is the overload backstop
            try:
                self.metrics.rejected.labels("overloaded").inc()
                await _send_json(counting_send, 503, ApiError(
                    503, f"The server is overloaded ({self.in_flight} requests in progress). Retry after a short "
                    "wait", type="server_error", code="server_overloaded").body())
            finally:
                self.metrics.requests.labels(route, str(status["code"])).inc()
            return
        self.in_flight += 1
        try:
            if route in _QUEUED and self.admission.full():  # cheap 429 before reading or parsing anything
                err = self.admission.busy_error()
                await _send_json(counting_send, 429, err.body())
                return
            body = await self._read_body(scope, receive)
            if body is None:
                await _send_json(counting_send, 413, ApiError(
                    413, f"The request body is larger than {self.limit} bytes", code="body_too_large").body())
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counting_send)
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _read_body(self, scope, receive) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.limit:
                        return None
                except ValueError:
                    return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ----------------------------------------------------------------------------- the app


def require_serve_extra() -> None:
    """A one-line error naming the ``[serve]`` extra when one of its packages is missing."""
    for module, package in (("fastapi", None), ("uvicorn", None), ("prometheus_client", "prometheus-client")):
        require(module, extra="serve", package=package)


def create_app(models: dict[str, Served], settings: ServeSettings):
    """The FastAPI app serving ``models`` under ``settings`` (see the module docstring).

    Over 100 lines on purpose: FastAPI routes are declared as closures over the one engine, its
    admission queue and metrics, so every route lives here; each is a few lines calling ``Engine``.
    """
    require_serve_extra()
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings.check()
    engine = Engine(models, settings)
    metrics = Metrics()
    admission = Admission(settings, metrics)
    keys = [k.encode() for k in settings.api_keys]
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        # a union (``str | list[str]``) reports one error per member: our own checks' (value_error) say most
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]
        if first.get("type") == "json_invalid":
            return JSONResponse(ApiError(400, "The request body is not valid JSON", code="invalid_json").body(), 400)
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(ApiError(400, message, param=".".join(loc) or None, code="invalid_value").body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        kind = "not_found" if err.status_code == 404 else "http_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), code=kind).body(), err.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):
        logger.exception("request to %s failed", request.url.path)
        return JSONResponse(ApiError(500, "Internal server error", type="server_error").body(), 500)

    def authorize(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip().encode() if header.lower().startswith("bearer ") else b""
        ok = False
        for key in keys:  # compare with every key, in constant time each
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise ApiError(401, "Missing or invalid API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), "running": admission.running,
                "queued": admission.waiting}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": s.created, "owned_by": "tunelab", "task": s.kind,
             "root": s.loaded.base_model or s.name, "max_model_len": s.context_length} for s in models.values()]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatRequest):
        served = engine.get(req.model, "generation")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i)}
                    for i, m in enumerate(req.messages)]
        try:
            ids = served.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True)["input_ids"]
        except Exception as err:  # the template refuses the message order (jinja raise_exception)
            raise ApiError(400, f"messages: the chat template refused them ({str(err).splitlines()[0][:200]})",
                           param="messages", code="invalid_messages") from None
        return await _complete(served, req, list(ids), req.max_completion_tokens or req.max_tokens, chat=True)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest):
        served = engine.get(req.model, "generation")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or len(prompts) > settings.max_batch_inputs:
            raise ApiError(400, f"prompt: give 1 to {settings.max_batch_inputs} prompts", param="prompt")
        if req.stream and len(prompts) > 1:
            raise ApiError(400, "stream: streaming takes a single prompt", param="stream")
        tok = served.loaded.tokenizer
        if len(prompts) == 1:
            ids = tok(prompts[0], add_special_tokens=True)["input_ids"]
            return await _complete(served, req, ids, req.max_tokens or 16, chat=False, echo=prompts[0])
        results = []
        for p in prompts:  # several prompts: answered one after the other, one choice list
            ids = tok(p, add_special_tokens=True)["input_ids"]
            results.append(await _complete(served, req, ids, req.max_tokens or 16, chat=False, echo=p))
        choices = [dict(c, index=i) for i, c in enumerate(c for r in results for c in r["choices"])]
        usage = {k: sum(r["usage"][k] for r in results) for k in ("prompt_tokens", "completion_tokens",
                                                                   "total_tokens")}
        return {**results[0], "choices": choices, "usage": usage}

    @app.post("/v1/classify", dependencies=auth)
    async def classify_texts(req: ClassifyRequest):
        served = engine.get(req.model, "classification")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or len(texts) > settings.max_batch_inputs or any(not t.strip() for t in texts):
            raise ApiError(400, f"input: give 1 to {settings.max_batch_inputs} non-empty texts", param="input")
        await admission.acquire()
        try:
            scored = await asyncio.wait_for(asyncio.to_thread(engine.classify, served, texts),
                                            settings.request_timeout_s)
        except TimeoutError:
            raise ApiError(503, "Classification took too long", type="server_error", code="timeout") from None
        finally:
            admission.release()
        tokens = sum(len(served.loaded.tokenizer(t)["input_ids"]) for t in texts)
        metrics.prompt_tokens.labels(served.name).inc(tokens)
        return {"object": "list", "model": served.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "classification", "index": i, **s} for i, s in enumerate(scored)]}

    @app.post("/v1/score", dependencies=auth)
    async def score_replies_route(req: ScoreRequest):
        served = engine.get(req.model, SCORE)
        if (req.messages is None) == (req.input is None):
            raise ApiError(400, "give either messages (one conversation ending in the reply to score) or input "
                           "(a list of such conversations)", param="messages", code="invalid_value")
        convs, param = ([req.messages], "messages") if req.messages is not None else (req.input, "input")
        if not convs or len(convs) > settings.max_batch_inputs:
            raise ApiError(400, f"input: give 1 to {settings.max_batch_inputs} conversations", param="input")
        sequences = []
        for i, tokens in enumerate(reply_tokens(served.loaded.tokenizer, _score_conversations(convs, param))):
            where = param if req.messages is not None else f"input[{i}]"
            if isinstance(tokens, str):
                raise ApiError(400, f"{where}: {tokens.split(': ', 1)[-1]}", param=where, code="invalid_messages")
            limit = min(settings.max_prompt_tokens, served.context_length)
            if len(tokens) > limit:
                raise ApiError(400, f"{where}: the conversation has {len(tokens)} tokens; this server scores at most "
                               f"{limit}", param=where, code="context_length_exceeded")
            sequences.append(tokens)
        await admission.acquire()
        try:
            scores = await asyncio.wait_for(asyncio.to_thread(engine.score, served, sequences),
                                            settings.request_timeout_s)
        except TimeoutError:
            raise ApiError(503, "Scoring took too long", type="server_error", code="timeout") from None
        finally:
            admission.release()
        tokens = sum(len(x) for x in sequences)
        metrics.prompt_tokens.labels(served.name).inc(tokens)
        return {"object": "list", "model": served.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "score", "index": i, "score": v} for i, v in enumerate(scores)]}

    async def _complete(served: Served, req: _Request, ids: list[int], max_tokens: int | None, *, chat: bool,
                        echo: str | None = None):
        if req.n > settings.max_n:
            raise ApiError(400, f"n is {req.n}; this server allows at most {settings.max_n}", param="n")
        max_new = max_tokens or min(settings.default_max_tokens, settings.max_tokens_limit)
        if max_new > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_new}; this server allows at most {settings.max_tokens_limit}",
                           param="max_tokens", code="max_tokens_too_large")
        if req.stream and req.n > 1:
            raise ApiError(400, "n > 1 cannot be streamed; set n to 1 or stream to false", param="n")
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        if req.logit_bias:  # refused rather than silently ignored: the reply would not be what was asked
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")
        if req.presence_penalty or req.frequency_penalty:
            raise ApiError(400, "presence_penalty and frequency_penalty are not supported (use 0)",
                           param="frequency_penalty")
        if req.min_tokens > max_new:
            raise ApiError(400, f"min_tokens ({req.min_tokens}) is larger than max_tokens ({max_new})",
                           param="min_tokens")
        stop = _stops(req.stop)
        engine.check_prompt(served, ids, max_new)
        gen = {"n": req.n, "max_new": max_new, "temperature": req.temperature, "top_p": req.top_p,
               "seed": req.seed, "stop": stop, "min_new": req.min_tokens}
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        await admission.acquire()
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            events = _stream(served, ids, gen, rid, chat, include_usage)
            await events.__anext__()  # started: from here its `finally` frees the slot whatever happens
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            out = await asyncio.to_thread(engine.generate, served, ids, **gen)
        finally:
            admission.release()
        metrics.prompt_tokens.labels(served.name).inc(out.prompt_tokens)
        metrics.completion_tokens.labels(served.name).inc(out.completion_tokens)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f,
                        "logprobs": None} for i, (t, f) in enumerate(zip(out.texts, out.finish, strict=True))]
        else:
            prefix = echo if getattr(req, "echo", False) else ""
            choices = [{"index": i, "text": prefix + t, "finish_reason": f, "logprobs": None}
                       for i, (t, f) in enumerate(zip(out.texts, out.finish, strict=True))]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": served.name, "choices": choices,
                "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                          "total_tokens": out.prompt_tokens + out.completion_tokens}}

    async def _stream(served: Served, ids: list[int], gen: dict, rid: str, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks while a thread generates; holds the admission slot until generation has ended."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = _Cancel()
        streamer = _queue_streamer(served.loaded.tokenizer, loop, queue)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return _sse({"id": rid, "object": obj, "created": created, "model": served.name, "choices": [choice]})

        task = asyncio.ensure_future(asyncio.to_thread(engine.generate, served, ids, streamer=streamer,
                                                       cancel=cancel, **gen))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        stop, hold = gen["stop"], max((len(s) for s in gen["stop"]), default=1) - 1
        text, sent, stopped = "", 0, False
        try:
            yield ""  # the priming step (see _complete)
            if chat:
                yield chunk(None, role=True)
            while True:
                piece = await queue.get()
                if piece is None:
                    break
                if stopped:
                    continue
                text += piece
                cut = _first_stop(text, stop)
                upto = cut if cut is not None else max(sent, len(text) - hold)
                if upto > sent:
                    yield chunk(text[sent:upto])
                    sent = upto
                if cut is not None:
                    stopped = True
                    cancel.event.set()
            try:
                out = task.result()
            except Exception:
                logger.exception("streaming generation failed")
                yield _sse(ApiError(500, "Internal server error", type="server_error").body())
                yield "data: [DONE]\n\n"
                return
            if not stopped and len(text) > sent:
                yield chunk(text[sent:])
            finish = "stop" if stopped else out.finish[0]
            yield chunk(None, finish)
            metrics.prompt_tokens.labels(served.name).inc(out.prompt_tokens)
            metrics.completion_tokens.labels(served.name).inc(out.completion_tokens)
            if include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": served.name, "choices": [],
                            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                                      "total_tokens": out.prompt_tokens + out.completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away stops the generation at its next token; the slot is freed when the
            # generating thread has really finished (no await here: a cancelled scope would cut it short).
            cancel.event.set()
            if task.done():
                admission.release()
            else:
                task.add_done_callback(lambda _: admission.release())

    app.state.metrics, app.state.admission, app.state.models = metrics, admission, models
    return Guard(app, settings.max_body_bytes, metrics, admission, settings.in_flight_limit)


def _text(content, index: int) -> str:
    """A message's text: a string, or its text parts joined. Any other part (``image_url``,
    ``input_audio``, ``file``, ...) is a 400, as in training data: dropping it would answer a
    question the client did not ask."""
    if not isinstance(content, list):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type", "text")
        if kind != "text":
            raise ApiError(400, f"{where}: unsupported content type {str(kind)[:40]!r}; this server takes text "
                           "parts only", param=where, code="unsupported_content_type")
        text = part.get("text")
        if not isinstance(text, str):
            raise ApiError(400, f"{where}: a text part needs a string 'text'", param=where, code="invalid_value")
        try:
            _unicode(text)
        except ValueError as err:
            raise ApiError(400, f"{where}.text: {err}", param=where, code="invalid_value") from None
        texts.append(text)
    return "".join(texts)


def _score_conversations(convs: list[list[ChatMessage]], param: str) -> list[list[dict]]:
    """Each conversation as plain messages (``developer`` as ``system``), checked to be prompt turns
    followed by one non-empty assistant reply: what a reward model was trained to score."""
    out = []
    for i, conv in enumerate(convs):
        where = param if param == "messages" else f"input[{i}]"
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": _text(m.content, j)} for j, m in enumerate(conv)]
        if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise ApiError(400, f"{where}: give the prompt's messages, then the assistant's reply to score as the "
                           "last message (non-empty)", param=where, code="invalid_messages")
        if not any(m["content"].strip() for m in messages[:-1] if m["role"] != "assistant"):
            raise ApiError(400, f"{where}: the prompt is empty (no system, user or tool text before the reply)",
                           param=where, code="invalid_messages")
        out.append(messages)
    return out


# pydantic's names for the member of a union an error came from (``str``, ``list[...]``,
# ``function-after[_unicode(), str]``): not part of the field's path, so left out of ``param``
_UNION_TAG = re.compile(r"(str|int|float|bool|dict|list|none)$|.*\[")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _queue_streamer(tokenizer, loop, queue):
    """A transformers ``TextStreamer`` (it does the incremental decoding) handing text to the event loop."""
    from transformers import TextStreamer

    class QueueStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                loop.call_soon_threadsafe(queue.put_nowait, text)

    return QueueStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# ----------------------------------------------------------------------------- running it


def run_server(app, host: str, port: int, *, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn until interrupted (Ctrl-C).

    ``log_config=None``: uvicorn's default runs ``logging.config.dictConfig``, which closes every logging
    handler in the process, and a handler may close the stream it holds (absl's, imported with
    ``rouge_score``, closes any stream that is not the current ``sys.stderr``). Its loggers keep their
    level and reach the root logger's handlers instead.

    No ``limit_concurrency``: uvicorn answers beyond it with a plain-text 503; the app's guard
    caps the requests in progress instead (``max_in_flight``) and answers in OpenAI's JSON shape.
    """
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=None, timeout_keep_alive=5,
                timeout_graceful_shutdown=5)


class ThreadedServer:
    """uvicorn on a background thread (tests, benchmarks); ``with ThreadedServer(app) as srv: srv.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error", log_config=None,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(targets: list[str], settings: ServeSettings, *, checkpoint: str = "final", dtype: str = "fp32",
          console=None) -> None:
    """``tunelab serve``: load the targets, print what is served, and run until Ctrl-C."""
    from tunelab.ship.export import DTYPES

    require_serve_extra()  # before loading any model
    settings.check()
    models = load_models(targets, checkpoint=checkpoint, dtype=DTYPES[dtype])
    app = create_app(models, settings)
    if console is not None:
        console.print(f"serving on http://{settings.host}:{settings.port}/v1  models: "
                      + ", ".join(f"{n} ({s.kind})" for n, s in models.items())
                      + ("  [API key required]" if settings.api_keys else ""))
    run_server(app, settings.host, settings.port)
