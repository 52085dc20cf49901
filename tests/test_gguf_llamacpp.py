"""GGUF export proven in llama.cpp: every family and quant type runs there, and a broken file is refused.

The llama.cpp tests need the ``[gguf]`` extra (``llama-cpp-python``, installed by ``make setup``);
they are skipped where it is absent, and the bad-input tests run everywhere.
"""

from __future__ import annotations

import sys

import pytest

from gguf_fixtures import tiny_causal_lm, tiny_lora_run
from tunelab.errors import UserError
from tunelab.ship.export import export


def _reader(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    return fields, {t.name: t.tensor_type.name for t in reader.tensors}


def _no_leftovers(parent, out) -> None:
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_tensor_types_follow_llama_cpps_rules():
    from tunelab.ship.to_gguf import tensor_type

    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0", False).name == "F32"  # 1-D, norm
    assert tensor_type("blk.0.attn_q_norm.weight", (32,), "q8_0", False).name == "F32"
    assert tensor_type("blk.0.attn_q.bias", (64,), "q4_0", False).name == "F32"  # biases
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q4_0", False).name == "Q4_0"
    assert tensor_type("blk.0.ffn_down.weight", (64, 48), "q4_0", False).name == "F16"  # 48 % 32: no block fits
    assert tensor_type("output.weight", (300, 64), "q4_0", False).name == "Q8_0"  # the head keeps more bits
    assert tensor_type("token_embd.weight", (300, 64), "q5_1", True).name == "Q8_0"  # ... and so does a tied embedding
    assert tensor_type("token_embd.weight", (300, 64), "q5_1", False).name == "Q5_1"
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "bf16", False).name == "BF16"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_each_family_runs_in_llama_cpp_with_the_hf_greedy_tokens(tmp_path, family):
    pytest.importorskip("llama_cpp")
    src = tiny_causal_lm(tmp_path / "model", family, chat_template=True)
    result = export(src, tmp_path / "out", quant=["f16", "q8_0"], dtype="fp32")
    f16, q8 = result.ggufs
    assert (f16.kind, q8.kind) == ("f16", "q8_0") and {f16.checked_by, q8.checked_by} == {"llama.cpp"}
    # 3 text prompts + the ChatML probe, 32 greedy tokens each, identical in llama.cpp
    assert f16.figures["greedy_tokens"] == 4 * 32 and f16.figures["top1_logit_error"] < 2e-2
    assert abs(q8.figures["perplexity_rise"]) < 0.01
    fields, types = _reader(f16.path)
    assert fields["general.architecture"] == family and fields["general.file_type"] == 1
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"
    _, q8_types = _reader(q8.path)
    assert q8_types["blk.0.ffn_up.weight"] == "Q8_0" and q8_types["output_norm.weight"] == "F32"
    if family == "qwen2":  # biases kept (F32); tied head: no output tensor
        assert q8_types["blk.0.attn_q.bias"] == "F32" and "output.weight" not in q8_types
    if family == "qwen3":  # q/k norms and a head_dim that is not hidden / heads
        assert q8_types["blk.1.attn_k_norm.weight"] == "F32" and fields["qwen3.attention.key_length"] == 32


def test_k_quants_come_from_llama_cpps_quantizer_and_pass_the_perplexity_bound(tmp_path):
    pytest.importorskip("llama_cpp")
    # rows of 256 so the K-quant blocks fit (narrower rows fall back to 32-blocks in llama.cpp)
    src = tiny_causal_lm(tmp_path / "model", "llama", hidden_size=256, intermediate_size=512)
    kinds = ["q4_k_m", "q6_k", "q4_0", "q5_1"]
    result = export(src, tmp_path / "out", quant=",".join(kinds), dtype="fp32")
    assert [f.kind for f in result.ggufs] == kinds and not (tmp_path / "out" / "model-f16.gguf").exists()
    types = {f.kind: _reader(f.path)[1] for f in result.ggufs}
    assert types["q4_k_m"]["blk.0.attn_q.weight"] == "Q4_K" and types["q4_k_m"]["output.weight"] == "Q6_K"
    assert types["q6_k"]["blk.0.ffn_gate.weight"] == "Q6_K"
    assert types["q4_0"]["blk.0.attn_q.weight"] == "Q4_0" and types["q4_0"]["output.weight"] == "Q8_0"
    for file in result.ggufs:
        assert file.checked_by == "llama.cpp" and file.figures["perplexity_rise"] <= file.figures["bound"] <= 0.2


def test_a_writer_bug_is_caught_in_llama_cpp_and_leaves_no_output(tmp_path, monkeypatch):
    """Forgetting llama.cpp's rotary row order (the classic converter bug) fails the greedy check."""
    pytest.importorskip("llama_cpp")
    from tunelab.ship import to_gguf

    src = tiny_causal_lm(tmp_path / "model", "llama")
    monkeypatch.setattr(to_gguf, "permute_rows", lambda w, n_head: w)
    with pytest.raises(UserError, match=r"--quant f16: (greedy|top-1 logit) check failed") as err:
        export(src, tmp_path / "out", quant="f16", dtype="fp32")
    assert "\n" not in str(err.value)
    _no_leftovers(tmp_path, tmp_path / "out")


def test_a_perplexity_over_the_bound_fails_and_leaves_no_output(tmp_path, monkeypatch):
    from tunelab.ship import gguf_types

    src = tiny_causal_lm(tmp_path / "model", "llama")
    strict = gguf_types.QuantType("q4_0", "Q4_0", "MOSTLY_Q4_0", -0.5, "bound no file can meet")
    monkeypatch.setitem(gguf_types.QUANTS, "q4_0", strict)
    with pytest.raises(UserError, match=r"--quant q4_0: perplexity check failed: .* over F16's .* \(bound -50%\)"):
        export(src, tmp_path / "out", quant="f16,q4_0", dtype="fp32")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_k_quant_without_the_extra_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
    src = tiny_causal_lm(tmp_path / "model", "llama")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(UserError) as err:
        export(src, tmp_path / "out", quant="q8_0,q4_k_m")
    assert str(err.value) == "--quant q4_k_m needs llama-cpp-python: pip install 'tunelab[gguf]'"
    assert not (tmp_path / "out").exists()


def test_bad_gguf_requests_are_one_line_errors(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    src = tiny_causal_lm(tmp_path / "model", "llama")
    with pytest.raises(UserError, match=r"--quant: unknown GGUF type 'q3_k'\. Choose from f32, f16"):
        export(src, tmp_path / "out", quant="q3_k")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("the user's")
    with pytest.raises(UserError, match="the folder exists and is not empty"):
        export(src, tmp_path / "taken", quant="q8_0")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "the user's"

    scaled = tiny_causal_lm(tmp_path / "scaled", "llama",
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UserError, match=r"--gguf: rope scaling 'linear' is not written") as err:
        export(scaled, tmp_path / "out2", quant="f16")
    assert "\n" not in str(err.value) and not (tmp_path / "out2").exists()

    neox = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(neox)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (neox / name).write_bytes((src / name).read_bytes())
    with pytest.raises(UserError, match=r"writes GGUF for causal LMs of model_type llama, mistral, qwen2, qwen3 "
                                        r"\(got GPTNeoXForCausalLM, model_type 'gpt_neox'\)"):
        export(neox, tmp_path / "out3", quant="q8_0")
    assert not (tmp_path / "out3").exists()


def test_lora_run_as_a_llama_cpp_adapter_agrees_with_the_merged_model(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    import gguf

    from tunelab.ship import llamacpp, lora_gguf

    run = tiny_lora_run(tmp_path / "lora")
    result = export(run, tmp_path / "out", lora_gguf=True)
    base, adapter = result.ggufs
    assert result.kind == "adapter" and (result.out / "adapter_config.json").is_file()
    assert base.path.name == "tiny-lora-base-f16.gguf" and adapter.path.name == "tiny-lora-lora-f32.gguf"
    assert adapter.checked_by == "llama.cpp" and adapter.figures["greedy_tokens"] == 4 * 32
    fields = {k: f.contents() for k, f in gguf.GGUFReader(adapter.path).fields.items()}
    assert (fields["general.type"], fields["adapter.type"], fields["adapter.lora.alpha"]) == ("adapter", "lora", 8.0)
    # the adapter matters: llama.cpp's base alone answers differently from base + adapter
    probe = [1, 40, 80, 120, 200, 250, 33, 7, 2, 5]
    with llamacpp.Runner(base.path) as plain, llamacpp.Runner(base.path, lora=adapter.path) as tuned:
        assert abs(plain.logits(probe) - tuned.logits(probe)).max() > 0.05
    # B's q/k rows must follow the base's rotary order: without it llama.cpp disagrees with the merged model
    monkeypatch.setattr(lora_gguf, "permute_rows", lambda w, n_head: w)
    with pytest.raises(UserError, match=r"--lora-gguf: (greedy|top-1 logit) check failed"):
        export(run, tmp_path / "bad", lora_gguf=True)
    _no_leftovers(tmp_path, tmp_path / "bad")


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_f16_is_greedy_identical_and_fewer_bits_cost_more_perplexity(tmp_path):
    pytest.importorskip("llama_cpp")
    result = export("smollm2-135m-instruct", tmp_path / "smol", quant="f16,q8_0,q4_k_m", dtype="fp32")
    f16, q8, q4 = result.ggufs
    assert {f.checked_by for f in result.ggufs} == {"llama.cpp"}
    assert f16.figures["greedy_tokens"] == 4 * 32  # the real model: every greedy token identical in llama.cpp
    assert f16.size > q8.size > q4.size
    assert q8.figures["perplexity_rise"] < q4.figures["perplexity_rise"]
