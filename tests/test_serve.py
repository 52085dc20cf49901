"""``tunelab serve`` against a live uvicorn on 127.0.0.1 (a free port), with the official ``openai`` client.

Two LoRA adapters over one base, the base itself, and a classification adapter are served by one
process; replies must equal what the same weights give when loaded on their own. Hostile requests
get the right status and an OpenAI-style error body; a short bounded load test checks that every
request succeeds or gets 429 and that the server stays up. Traffic only ever goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import psutil
import pytest

from ship_fixtures import ship_runs  # noqa: F401 - the session fixture
from tunelab.errors import UserError
from tunelab.ship.inference import base_only, classify, generate_reply, load_for_inference
from tunelab.ship.serve import ServeSettings, ThreadedServer, create_app, load_models

CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def served(ship_runs):  # noqa: F811
    return load_models([str(ship_runs["lora"]), str(ship_runs["lora_b"]), str(ship_runs["cls_lora"]),
                        str(ship_runs["cls"])])


@pytest.fixture(scope="module")
def server(served):
    app = create_app(served, ServeSettings(max_tokens_limit=64, max_n=3, max_body_bytes=20_000, max_queue=4))
    with ThreadedServer(app) as srv:
        yield srv


def client(srv, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_adapters_share_one_base_and_the_model_field_picks_one(ship_runs, served, server):  # noqa: F811
    ids = [m.id for m in client(server).models.list().data]
    assert ids == ["lora", "tiny-random-llama", "lora_b", "cls_lora", "cls"]  # no random-headed base classifier
    assert served["lora"].loaded.model is served["lora_b"].loaded.model is served["tiny-random-llama"].loaded.model
    assert served["cls_lora"].kind == "classification"

    replies = {}
    for name in ("lora", "lora_b", "tiny-random-llama", "lora"):  # switching back and forth
        r = client(server).chat.completions.create(model=name, messages=CHAT, max_tokens=6, temperature=0)
        replies[name] = r.choices[0].message.content.strip()  # generate_reply strips; the API does not
    # the same weights loaded on their own give the same greedy replies
    alone = load_for_inference(ship_runs["lora"])
    assert replies["lora"] == generate_reply(alone, CHAT, max_new_tokens=6)
    with base_only(alone):
        assert replies["tiny-random-llama"] == generate_reply(alone, CHAT, max_new_tokens=6)
    assert replies["lora_b"] == generate_reply(load_for_inference(ship_runs["lora_b"]), CHAT, max_new_tokens=6)
    assert replies["lora"] != replies["lora_b"]


def test_chat_streaming_equals_non_streaming_with_usage(server):
    c = client(server)
    whole = c.chat.completions.create(model="lora", messages=CHAT, max_tokens=8, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 5 and whole.usage.total_tokens == whole.usage.prompt_tokens + \
        whole.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="lora", messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # n > 1 (sampled), seeded: reproducible
    a = c.chat.completions.create(model="lora", messages=CHAT, max_tokens=4, n=2, temperature=1.0, seed=7)
    b = c.chat.completions.create(model="lora", messages=CHAT, max_tokens=4, n=2, temperature=1.0, seed=7)
    assert len(a.choices) == 2 and [x.message.content for x in a.choices] == [x.message.content for x in b.choices]


def test_completions_with_stop_strings_and_streaming(server):
    c = client(server)
    full = c.completions.create(model="lora", prompt="Colours:", max_tokens=8, temperature=0)
    text = full.choices[0].text
    assert full.object == "text_completion" and len(text) > 4
    stop = text[3:5]
    cut = c.completions.create(model="lora", prompt="Colours:", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="lora", prompt="Colours:", max_tokens=8, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.choices[0].text
    echo = c.completions.create(model="lora", prompt="Colours:", max_tokens=8, temperature=0, echo=True)
    assert echo.choices[0].text == "Colours:" + text


@pytest.mark.parametrize("run", ["cls_lora", "cls"])
def test_classify_endpoint_gives_the_run_labels_and_probabilities(ship_runs, server, run):  # noqa: F811
    texts = ["the invoice is wrong", "site down"]
    r = httpx.post(server.url + "/v1/classify", json={"model": run, "input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    want = classify(load_for_inference(ship_runs[run]), texts)
    assert [d["label"] for d in body["data"]] == [w["label"] for w in want]
    for got, exp in zip(body["data"], want, strict=True):
        assert got["probs"] == pytest.approx(exp["probs"], abs=1e-5)
    assert body["usage"]["prompt_tokens"] > 0


def _post(srv, path: str, body, headers=None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=data, timeout=30,
                      headers={"content-type": "application/json", **(headers or {})})


def test_hostile_requests_get_the_right_status_and_an_openai_error(server):
    msg = {"model": "lora", "messages": CHAT}
    cases = [
        ("/v1/chat/completions", {**msg, "max_tokens": 10**9}, 400, "max_tokens_too_large"),
        ("/v1/chat/completions", {**msg, "n": 1000}, 400, None),
        ("/v1/chat/completions", b'{"model": "lora", "messages": [', 400, "invalid_json"),
        ("/v1/chat/completions", {**msg, "model": "gpt-4"}, 404, "model_not_found"),
        ("/v1/chat/completions", {**msg, "messages": [{"role": "user", "content": "x" * 30_000}]}, 413,
         "body_too_large"),
        ("/v1/chat/completions", {"model": "lora", "messages": [{"role": "user", "content": "word " * 3000}]},
         400, "context_length_exceeded"),
        ("/v1/chat/completions", {**msg, "messages": []}, 400, "invalid_value"),
        ("/v1/chat/completions", {**msg, "temperature": -1}, 400, "invalid_value"),
        ("/v1/chat/completions", {**msg, "model": "cls_lora"}, 400, "wrong_endpoint"),
        ("/v1/completions", {"model": "lora", "prompt": "hi " * 2500}, 400, "context_length_exceeded"),
        ("/v1/classify", {"model": "lora", "input": "x"}, 400, "wrong_endpoint"),
        ("/v1/classify", {"model": "cls_lora", "input": []}, 400, None),
        ("/v1/nothing", {}, 404, "not_found"),
    ]
    for path, body, status, code in cases:
        r = _post(server, path, body)
        assert r.status_code == status, (path, str(body)[:80], r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert "Traceback" not in r.text
        if code:
            assert error["code"] == code, (body, error)
    big = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 50_000, timeout=30)
    assert big.status_code == 413
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'tunelab_requests_total{route="/v1/chat/completions",status="413"}' in metrics
    assert 'route="other",status="404"' in metrics


# Inputs that used to crash generation (500) or be silently dropped (200): each is a 400 naming the field.
_CHAT = {"model": "lora", "messages": CHAT, "max_tokens": 2}
_BAD_INPUTS = [
    # (path, body, param, code or None, a word the message must hold or None)
    ("/v1/chat/completions", {**_CHAT, "seed": 2**64}, "seed", "invalid_value", None),
    ("/v1/chat/completions", {**_CHAT, "seed": -(2**63) - 1}, "seed", "invalid_value", None),
    ("/v1/chat/completions", {**_CHAT, "seed": 10**30}, "seed", "invalid_value", None),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages[0].content[1]", "unsupported_content_type", "'image_url'"),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "messages[0].content[0]", "unsupported_content_type", "'input_audio'"),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0]", "invalid_value", None),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [5]}]}, None, "invalid_value", None),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": "hi \ud800"}]}, None,
     "invalid_value", "surrogate"),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}]}, "messages[0].content[0]", "invalid_value", "surrogate"),
    ("/v1/chat/completions", {**_CHAT, "model": "\ud800"}, "model", "invalid_value", "surrogate"),
    ("/v1/chat/completions", {**_CHAT, "stop": "x" * 10_000}, "stop", None, None),
    ("/v1/chat/completions", {**_CHAT, "stop": ["\n", "y" * 65]}, "stop", None, None),
    ("/v1/chat/completions", {**_CHAT, "stop": [1]}, None, "invalid_value", None),
    ("/v1/chat/completions", {**_CHAT, "logit_bias": {"15": 1e300}}, "logit_bias", None, None),
    ("/v1/chat/completions", {**_CHAT, "logit_bias": {"15": "lots"}}, None, "invalid_value", None),
    ("/v1/chat/completions", {**_CHAT, "max_tokens": 2**64}, "max_tokens", "max_tokens_too_large", None),
    ("/v1/chat/completions", {**_CHAT, "max_tokens": "many"}, "max_tokens", "invalid_value", None),
    ("/v1/chat/completions", {**_CHAT, "n": -1}, "n", "invalid_value", None),
    ("/v1/chat/completions", {**_CHAT, "n": 2**70}, "n", None, None),
    ("/v1/chat/completions", {**_CHAT, "min_tokens": 2**64}, "min_tokens", None, None),
    ("/v1/chat/completions", {**_CHAT, "stream_options": "yes"}, "stream_options", "invalid_value", None),
    ("/v1/completions", {"model": "lora", "prompt": "", "max_tokens": 2}, "prompt", "empty_prompt", None),
    ("/v1/completions", {"model": "lora", "prompt": [""], "max_tokens": 2}, "prompt", "empty_prompt", None),
    ("/v1/completions", {"model": "lora", "prompt": "\ud800x", "max_tokens": 2}, None, "invalid_value",
     "surrogate"),
    ("/v1/completions", {"model": "lora", "prompt": [[1, 2]], "max_tokens": 2}, None, "invalid_value", None),
    ("/v1/classify", {"model": "cls", "input": ["fine", "\ud800"]}, None, "invalid_value", "surrogate"),
]


@pytest.mark.parametrize(("path", "body", "param", "code", "word"), _BAD_INPUTS,
                         ids=[f"{i}-{c[3] or c[2]}" for i, c in enumerate(_BAD_INPUTS)])
def test_hostile_inputs_that_crashed_or_were_dropped_get_a_400_naming_the_field(server, path, body, param, code,
                                                                                word):
    r = _post(server, path, body)
    assert r.status_code == 400, (path, str(body)[:100], r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and "Traceback" not in r.text
    if param:
        assert (error["param"] or "").startswith(param), error
    if code:
        assert error["code"] == code, error
    if word:
        assert word in error["message"], error


def test_every_seed_torch_accepts_is_served(server):
    """The seed range ends where torch.manual_seed's does: signed and unsigned 64-bit values."""
    for seed in (2**64 - 1, -(2**63), 0):
        r = _post(server, "/v1/chat/completions", {**_CHAT, "seed": seed, "temperature": 1.0})
        assert r.status_code == 200, (seed, r.text)


def test_requests_beyond_max_in_flight_get_openais_json_503_not_plain_text(served):
    """The cap on requests in progress is the app's (JSON), not uvicorn's limit_concurrency (plain text)."""
    app = create_app(served, ServeSettings(max_concurrency=1, max_in_flight=1, request_timeout_s=20,
                                           max_tokens_limit=1024))
    with ThreadedServer(app) as srv, httpx.Client(timeout=30) as http:
        long = {"model": "lora", "messages": CHAT, "max_tokens": 1000, "min_tokens": 1000, "temperature": 0,
                "stream": True}
        with http.stream("POST", srv.url + "/v1/chat/completions", json=long) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # one request in progress: the cap is reached
            for r in (http.get(srv.url + "/v1/models"), http.get(srv.url + "/health"),
                      http.post(srv.url + "/v1/chat/completions", json=_CHAT)):
                assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["code"] == "server_overloaded" and error["type"] == "server_error"
        deadline = time.monotonic() + 10  # the dropped stream ends and its place is free again
        while app.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.post(srv.url + "/v1/chat/completions", json=_CHAT).status_code == 200
        metrics = http.get(srv.url + "/metrics").text
        assert 'tunelab_requests_rejected_total{reason="overloaded"} 3.0' in metrics


def test_unsafe_served_names_are_refused_at_start_up_before_loading(ship_runs, tmp_path, monkeypatch, capsys):  # noqa: F811
    import shutil

    from tunelab.cli import main
    from tunelab.ship import serve as serve_module

    def copy_named(run_name: str, folder: str):
        dest = tmp_path / folder
        shutil.copytree(ship_runs["lora_b"], dest)
        info = json.loads((dest / "tunelab.json").read_text())
        (dest / "tunelab.json").write_text(json.dumps({**info, "run": run_name}))
        return str(dest)

    def no_loading(*a, **kw):
        raise AssertionError("a model was loaded before the names were checked")

    with monkeypatch.context() as m:
        m.setattr(serve_module, "load_for_inference", no_loading)
        for bad in ("../../x", "a/b", ".hidden", "x" * 200):
            with pytest.raises(UserError, match="is not a usable name"):
                load_models([str(ship_runs["lora"]), copy_named(bad, "bad")])
            shutil.rmtree(tmp_path / "bad")
        assert main(["serve", copy_named("../../etc", "cli")]) == 2
    err = capsys.readouterr().err
    assert "not a usable name" in err and len(err.strip().splitlines()) == 1
    # a '.' is a usable served name; PEFT's own adapter key (no '.' allowed there) is derived from it
    models = load_models([str(ship_runs["lora"]), copy_named("v1.2", "dotted")])
    assert list(models) == ["lora", "tiny-random-llama", "v1.2"]
    assert models["v1.2"].adapter != models["lora"].adapter and "." not in models["v1.2"].adapter


def test_api_keys_are_required_when_set_and_for_public_binding(served):
    with pytest.raises(UserError, match="needs API keys"):
        create_app(served, ServeSettings(host="0.0.0.0"))
    create_app(served, ServeSettings(host="0.0.0.0", api_keys=("k" * 12,)))  # allowed with a key
    app = create_app(served, ServeSettings(api_keys=("secret-key-1", "secret-key-2")))
    with ThreadedServer(app) as srv:
        body = {"model": "lora", "messages": CHAT, "max_tokens": 2}
        assert _post(srv, "/v1/chat/completions", body).status_code == 401
        wrong = _post(srv, "/v1/chat/completions", body, {"authorization": "Bearer secret-key-3"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert client(srv, "secret-key-2").chat.completions.create(**body).choices[0].message is not None
        assert httpx.get(srv.url + "/health").status_code == 200


def test_bounded_load_every_request_succeeds_or_gets_429_and_the_server_stays_up(served):
    """8 clients for 3 s against 1 slot + a queue of 2; each client stops after 3 s or 40 requests."""
    app = create_app(served, ServeSettings(max_concurrency=1, max_queue=2, max_tokens_limit=16))
    statuses: list[int] = []
    lock = threading.Lock()
    proc = psutil.Process()
    with ThreadedServer(app) as srv:
        rss_before = proc.memory_info().rss

        def worker():
            deadline, sent = time.monotonic() + 3.0, 0
            with httpx.Client(timeout=30) as http:
                while time.monotonic() < deadline and sent < 40:
                    r = http.post(srv.url + "/v1/chat/completions",
                                  json={"model": "lora", "messages": CHAT, "max_tokens": 8, "temperature": 0})
                    sent += 1
                    with lock:
                        statuses.append(r.status_code)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=40)
        assert not any(t.is_alive() for t in threads)
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        assert statuses.count(200) >= 3 and statuses.count(429) >= 1
        health = httpx.get(srv.url + "/health").json()
        assert health == {**health, "status": "ok", "running": 0, "queued": 0}
        assert proc.memory_info().rss - rss_before < 300 * 2**20


def test_queue_timeout_is_503_and_a_dropped_stream_frees_its_slot(served):
    app = create_app(served, ServeSettings(max_concurrency=1, queue_timeout_s=0.3, max_tokens_limit=1024,
                                           request_timeout_s=20))
    with ThreadedServer(app) as srv, httpx.Client(timeout=30) as http:
        long = {"model": "lora", "messages": CHAT, "max_tokens": 1000, "min_tokens": 1000, "temperature": 0,
                "stream": True}
        with http.stream("POST", srv.url + "/v1/chat/completions", json=long) as stream:
            lines = stream.iter_lines()  # (kept: a dropped iterator closes the connection)
            assert next(lines).startswith("data: ")  # the slot is taken and generation runs
            r = http.post(srv.url + "/v1/chat/completions", json={"model": "lora", "messages": CHAT, "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
        # the client went away: generation stops at the next token and the slot is free again
        started = time.monotonic()
        r = http.post(srv.url + "/v1/chat/completions", json={"model": "lora", "messages": CHAT, "max_tokens": 2})
        assert r.status_code == 200 and time.monotonic() - started < 10


def test_cli_serve_builds_the_server_from_its_options(ship_runs, monkeypatch, capsys):  # noqa: F811
    from tunelab.cli import main
    from tunelab.ship import serve as serve_module

    assert main(["serve", str(ship_runs["lora"]), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "needs API keys" in err and len(err.strip().splitlines()) == 1

    seen = {}

    def fake_run(app, host, port, **kw):  # run it for one request instead of forever
        seen.update(host=host, port=port, **kw)
        with ThreadedServer(app) as srv:
            r = httpx.post(srv.url + "/v1/chat/completions", headers={"authorization": "Bearer key-from-env-1"},
                           json={"model": "lora", "messages": CHAT, "max_tokens": 99})
            seen["status"], seen["error"] = r.status_code, r.json()["error"]["param"]

    monkeypatch.setattr(serve_module, "run_server", fake_run)
    monkeypatch.setenv("TUNELAB_API_KEYS", "key-from-env-1")
    assert main(["serve", str(ship_runs["lora"]), "--port", "8123", "--max-tokens-limit", "50",
                 "--max-queue", "3"]) == 0
    assert seen == {"host": "127.0.0.1", "port": 8123, "status": 400, "error": "max_tokens"}
    assert "serving on http://127.0.0.1:8123/v1" in capsys.readouterr().out


def test_admission_is_fifo_with_429_when_full_and_503_after_the_queue_timeout():
    import asyncio

    from tunelab.ship.serve import Admission, ApiError, Metrics

    async def scenario():
        adm = Admission(ServeSettings(max_concurrency=1, max_queue=2, queue_timeout_s=0.5), Metrics())
        order: list[str] = []
        await adm.acquire()  # A runs

        async def waiter(name):
            try:
                await adm.acquire()
                order.append(name)
            except ApiError as err:
                order.append(f"{name}:{err.status}")

        b = asyncio.create_task(waiter("B"))
        await asyncio.sleep(0.01)
        c = asyncio.create_task(waiter("C"))
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as busy:
            await adm.acquire()  # D: one running, two queued
        assert busy.value.status == 429 and adm.full()
        adm.release()  # A done: the slot goes to B, the oldest waiter, not to a newcomer
        await asyncio.sleep(0.01)
        assert order == ["B"] and adm.free == 0
        await asyncio.gather(b, c)  # C waits past the timeout while B holds the slot
        assert order == ["B", "C:503"] and adm.waiting == 0
        adm.release()
        assert adm.free == 1 and adm.running == 0

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- reward models: /v1/score


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A 3-step LoRA reward model (task: reward) on tiny-random-llama, trained on the DPO demo pairs."""
    import yaml

    from conftest import shared, tiny_config
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    pairs = shared("preference", "llamafactory_demo", "dpo_en_demo.json")
    root = tmp_path_factory.mktemp("reward")
    cfg = tiny_config(root, pairs, task="reward", train={"max_steps": 3, "lr": 5e-3, "batch_size": 2, "grad_accum": 1},
                      data={"train": [{"path": str(pairs), "limit": 12}], "max_length": 256})
    cfg["run"]["name"] = "rm"
    (root / "rm.yaml").write_text(yaml.safe_dump(cfg))
    return fine_tune(*load_config(root / "rm.yaml")).run_dir, pairs


@pytest.fixture(scope="module")
def reward_server(ship_runs, reward_run):  # noqa: F811
    models = load_models([str(ship_runs["lora"]), str(reward_run[0])])
    app = create_app(models, ServeSettings(max_body_bytes=100_000, max_prompt_tokens=2048, max_batch_inputs=4))
    with ThreadedServer(app) as srv:
        yield srv


def _conversation(record, reply: str) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in record.messages[:-1]] + [
        {"role": "assistant", "content": reply}]


def test_score_endpoint_gives_the_reward_that_tunelab_eval_computes_for_chosen_and_rejected(reward_run,
                                                                                           reward_server):
    """The served score of prompt + reply is the reward model's scalar on the tokens training scored:
    the same numbers `tunelab eval` (eval_pairs) gives each pair's chosen and rejected reply."""
    from tunelab.data.formats import read_records
    from tunelab.eval.tasks import eval_pairs

    run, pairs = reward_run
    models = httpx.get(reward_server.url + "/v1/models").json()["data"]
    assert {m["id"]: m["task"] for m in models}["rm"] == "score"
    records = read_records(pairs, limit=3).records
    loaded = load_for_inference(run)
    assert loaded.kind == "score"
    expected = eval_pairs(loaded.model, loaded.tokenizer, records, max_length=4096)["examples"]
    for record, want in zip(records, expected, strict=True):
        one = _post(reward_server, "/v1/score", {"model": "rm", "messages": _conversation(
            record, record.messages[-1].content)})
        assert one.status_code == 200, one.text
        body = one.json()
        assert body["data"][0]["object"] == "score" and body["usage"]["prompt_tokens"] > 0
        assert body["data"][0]["score"] == pytest.approx(want["chosen"], abs=1e-5)
        both = _post(reward_server, "/v1/score", {"model": "rm", "input": [
            _conversation(record, record.messages[-1].content), _conversation(record, record.meta["rejected"])]})
        assert both.status_code == 200, both.text
        got = [d["score"] for d in both.json()["data"]]
        assert got == pytest.approx([want["chosen"], want["rejected"]], abs=1e-5)
    metrics = httpx.get(reward_server.url + "/metrics").text
    assert 'tunelab_requests_total{route="/v1/score",status="200"}' in metrics


_REPLY = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
_SCORE_BAD = [
    # (body, status, code, param)
    ({"model": "rm"}, 400, "invalid_value", "messages"),
    ({"model": "rm", "messages": _REPLY, "input": [_REPLY]}, 400, "invalid_value", "messages"),
    ({"model": "rm", "messages": _REPLY[:1]}, 400, "invalid_messages", "messages"),
    ({"model": "rm", "messages": _REPLY[1:]}, 400, "invalid_messages", "messages"),
    ({"model": "rm", "messages": [_REPLY[0], {"role": "assistant", "content": "  "}]}, 400, "invalid_messages",
     "messages"),
    ({"model": "rm", "messages": [{"role": "user", "content": " "}, _REPLY[1]]}, 400, "invalid_messages", "messages"),
    ({"model": "rm", "input": [_REPLY, _REPLY[:1]]}, 400, "invalid_messages", "input[1]"),
    ({"model": "rm", "input": []}, 400, None, "input"),
    ({"model": "rm", "input": [_REPLY] * 5}, 400, None, "input"),
    ({"model": "rm", "messages": [{"role": "user", "content": "word " * 3000}, _REPLY[1]]}, 400,
     "context_length_exceeded", "messages"),
    ({"model": "rm", "messages": [{"role": "user", "content": "hi \ud800"}, _REPLY[1]]}, 400, "invalid_value", None),
    ({"model": "rm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}, _REPLY[1]]}, 400,
     "unsupported_content_type", "messages[0].content[0]"),
    ({"model": "rm", "messages": "Blue."}, 400, "invalid_value", "messages"),
    ({"model": "rm", "messages": _REPLY, "temperature": 0}, 400, "invalid_value", "temperature"),
    ({"model": "lora", "messages": _REPLY}, 400, "wrong_endpoint", "model"),
    ({"model": "gpt-4", "messages": _REPLY}, 404, "model_not_found", "model"),
    (b'{"model": "rm", "messages": [', 400, "invalid_json", None),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), _SCORE_BAD,
                         ids=[f"{i}-{c[2] or c[3]}" for i, c in enumerate(_SCORE_BAD)])
def test_bad_score_requests_get_the_right_status_and_an_openai_error(reward_server, body, status, code, param):
    r = _post(reward_server, "/v1/score", body)
    assert r.status_code == status, (str(body)[:100], r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "Traceback" not in r.text
    if code:
        assert error["code"] == code, error
    if param:
        assert (error["param"] or "").startswith(param), error


def test_a_reward_model_refuses_chat_and_classify_naming_the_score_route(reward_server):
    for path, body in (("/v1/chat/completions", {"model": "rm", "messages": _REPLY[:1], "max_tokens": 2}),
                       ("/v1/completions", {"model": "rm", "prompt": "hi", "max_tokens": 2}),
                       ("/v1/classify", {"model": "rm", "input": "hi"})):
        r = _post(reward_server, path, body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint", (path, r.text)
        assert "/v1/score" in r.json()["error"]["message"]


def test_starting_a_server_leaves_the_process_logging_handlers_and_their_streams_open():
    """uvicorn's default log set-up (``dictConfig``) closes every handler in the process. absl's handler,
    imported with rouge_score, then closes the stream it holds: in pytest that was the worker's captured
    stderr, and every later test on the worker errored with "I/O operation on closed file"."""
    import io
    import logging

    from fastapi import FastAPI

    class ClosesItsStream(logging.StreamHandler):  # what absl's PythonHandler.close does
        def close(self):
            self.stream.close()
            super().close()

    stream = io.StringIO()
    handler = ClosesItsStream(stream)  # logging keeps every handler in logging._handlerList (weakly)
    with ThreadedServer(FastAPI()) as srv:
        assert httpx.get(srv.url + "/docs").status_code == 200
    assert not stream.closed
    handler.stream.write("still open")
