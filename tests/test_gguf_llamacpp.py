"""GGUF export proven in llama.cpp: every family and quant type runs there, and a broken file is refused.

The llama.cpp tests need the ``[gguf]`` extra (``llama-cpp-python``, installed by ``make setup``);
they are skipped where it is absent, and the bad-input tests run everywhere.
"""

from __future__ import annotations

import math
import sys

import pytest

from gguf_fixtures import tiny_causal_lm, tiny_lora_run
from tunelab.errors import UserError
from tunelab.ship.export import export


def _reader(path):
    import gguf

    reader = gguf.GGUFReader(path)
    lists = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in lists}
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


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_gemma_and_phi3_run_in_llama_cpp_with_the_hf_greedy_tokens(tmp_path, family):
    """SentencePiece-style vocabularies, Gemma's (1 + w) norms, soft-caps and sliding windows, Gemma 3's q/k norms
    and scaled global RoPE, Phi-3's fused qkv / gate_up: the fixtures make each one change the logits."""
    pytest.importorskip("llama_cpp")
    src = tiny_causal_lm(tmp_path / "model", family)
    result = export(src, tmp_path / "out", quant=["f16", "q8_0"], dtype="fp32")
    f16, q8 = result.ggufs
    assert {f16.checked_by, q8.checked_by} == {"llama.cpp"}
    # 3 text prompts + the family's own chat probe, 32 greedy tokens each, identical in llama.cpp
    assert f16.figures["greedy_tokens"] == 4 * 32 and f16.figures["top1_logit_error"] < 2e-2
    assert abs(q8.figures["perplexity_rise"]) < 0.01
    fields, types = _reader(f16.path)
    arch = fields["general.architecture"]
    assert arch == {"gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}[family]
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.add_space_prefix"] is (family == "phi3")  # Gemma: no prefix; Phi-3: Llama 2's
    assert fields["tokenizer.ggml.add_bos_token"] is (family != "phi3")  # as the tokenizers add them
    _, q8_types = _reader(q8.path)
    assert q8_types["blk.0.attn_norm.weight"] == "F32" and q8_types["blk.0.ffn_down.weight"] == "Q8_0"
    if family == "gemma2":
        assert (fields["gemma2.attn_logit_softcapping"], fields["gemma2.final_logit_softcapping"]) == (0.5, 0.5)
        assert fields["gemma2.attention.sliding_window"] == 8 and fields["gemma2.attention.key_length"] == 32
        assert q8_types["blk.1.post_attention_norm.weight"] == q8_types["blk.1.post_ffw_norm.weight"] == "F32"
        assert "output.weight" not in q8_types  # tied to token_embd
    if family == "gemma3":
        assert fields["gemma3.attention.sliding_window"] == 8 and fields["gemma3.rope.freq_base"] == 1e6
        assert (fields["gemma3.rope.scaling.type"], fields["gemma3.rope.scaling.factor"]) == ("linear", 8.0)
        assert q8_types["blk.5.attn_q_norm.weight"] == q8_types["blk.5.attn_k_norm.weight"] == "F32"
    if family == "phi3":
        assert q8_types["blk.0.attn_qkv.weight"] == q8_types["blk.0.ffn_up.weight"] == "Q8_0"
        assert q8_types["output.weight"] == "Q8_0" and "blk.0.ffn_gate.weight" not in q8_types
        # llama.cpp right-strips Phi-3's special tokens (as its tokenizer.json does) only for a name with "phi3" in it
        assert fields["general.name"] == "model (phi3)" and fields["phi3.rope.scaling.original_context_length"] == 512


@pytest.mark.parametrize("original, context", [(512, 2048), (8, 512)], ids=["short-factors", "long-factors"])
def test_phi3_longrope_factors_run_in_llama_cpp(tmp_path, original, context):
    """Phi-3 128k's LongRoPE: both factor sets and the attention factor, as llama.cpp picks them. llama.cpp takes
    the long factors when its context (512 here) exceeds the original length, transformers when the sequence does:
    original 512 gives the short ones on both sides, original 8 the long ones (every probe is longer than 8)."""
    pytest.importorskip("llama_cpp")
    long, short = [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0], [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": long, "short_factor": short}
    src = tiny_causal_lm(tmp_path / "model", "phi3", rope_parameters=rope, max_position_embeddings=context,
                         original_max_position_embeddings=original, sliding_window=256)
    result = export(src, tmp_path / "out", quant="f16", dtype="fp32")
    assert result.ggufs[0].figures["greedy_tokens"] == 4 * 32
    fields, types = _reader(result.ggufs[0].path)
    assert types["rope_factors_long.weight"] == types["rope_factors_short.weight"] == "F32"
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + math.log(context / original)
                                                                      / math.log(original)) ** 0.5)
    # what llama.cpp runs differently, said once: the sliding window (off in llama.cpp), the factors' choice
    assert any("without its 256-token sliding window" in n for n in result.notes)
    assert any(f"context size (-c) exceeds {original}" in n for n in result.notes)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_sentencepiece_vocabularies_tokenize_in_llama_cpp_as_in_transformers(tmp_path, family):
    """ASCII, spaces, Chinese partly in the vocabulary, characters only byte fallback spells, and words whose merges
    do not go left to right (llama.cpp merges by score: the scores must carry the merge ranks)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.ship.to_gguf import write_gguf

    src = tiny_causal_lm(tmp_path / "model", family)
    tok = AutoTokenizer.from_pretrained(src)
    path = write_gguf(AutoModelForCausalLM.from_pretrained(src), tok, src, tmp_path / "m.gguf", name="tiny")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = ["The quick brown fox jumps over the lazy dog.", "  two leading spaces,  double  spaces ",
             "tabs\tand\nnewlines\n\n", "你好，世界 hello 你好", "emoji 🦙, accents é ü ß, \u00a0nbsp", "1234 5678",
             "hes lures mere",
             tok.apply_chat_template([{"role": "user", "content": "Hi 你好"}, {"role": "assistant", "content": "Hello"}],
                                     tokenize=False)]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    assert any(t.startswith("<0x") for t in tok.tokenize(texts[4]))  # byte fallback was exercised
    assert tok.tokenize("hes")[-2:] == ["h", "es"]  # "es" is merged before "he", though "he" comes first
    llm.close()


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
    with pytest.raises(UserError, match=r"writes GGUF for causal LMs of model_type llama, mistral, qwen2, qwen3, "
                                        r"gemma2, gemma3_text, phi3 \(got GPTNeoXForCausalLM, model_type 'gpt_neox'\)"):
        export(neox, tmp_path / "out3", quant="q8_0")
    assert not (tmp_path / "out3").exists()


def test_gemma_and_phi3_settings_llama_cpp_would_run_otherwise_are_one_line_refusals(tmp_path, monkeypatch):
    """llama.cpp fixes some of Gemma's settings in code (no GGUF key): a config that differs is refused, not written."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3Config

    from tunelab.ship.to_gguf import check_supported

    def refusal(family, **extra):
        model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm(tmp_path / f"{family}{len(extra)}", family, **extra))
        with pytest.raises(UserError) as err:
            check_supported(model)
        assert "\n" not in str(err.value) and str(err.value).endswith("convert_hf_to_gguf.py")
        return str(err.value)

    assert "query_pre_attn_scalar (got 64): llama.cpp scales a 2-layer Gemma's queries by 1/sqrt(32)" in refusal(
        "gemma2", query_pre_attn_scalar=64)
    assert "slides the window on 1 of every 2 layers, from the first" in refusal(
        "gemma2", layer_types=["full_attention", "sliding_attention"])
    local = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
             "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}
    assert "sliding layers' rope_theta (got 20000.0)" in refusal("gemma3", rope_parameters=local)
    assert "Phi-3's MLP activation (got 'gelu_new')" in refusal("phi3", hidden_act="gelu_new")
    with torch.device("meta"):  # Gemma 3 with its vision tower: text model + mmproj in llama.cpp
        vision = AutoModelForCausalLM.from_config(Gemma3Config(
            text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 300},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "image_size": 28,
                           "patch_size": 14, "num_attention_heads": 2}, mm_tokens_per_image=1))
    with pytest.raises(UserError, match=r"Gemma 3 with its vision tower \(Gemma3ForConditionalGeneration"):
        check_supported(vision)

    # without llama.cpp, transformers' GGUF reader would check the file, but it drops Gemma's soft-caps
    src = tiny_causal_lm(tmp_path / "gemma2", "gemma2")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(UserError, match=r"transformers' GGUF reader, which would lose query_pre_attn_scalar 32, "
                                        r"attn_logit_softcapping 0.5, final_logit_softcapping 0.5 of this gemma2"):
        export(src, tmp_path / "out", quant="f16", dtype="fp32")
    _no_leftovers(tmp_path, tmp_path / "out")


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


def test_phi3_lora_run_as_a_llama_cpp_adapter_agrees_with_the_merged_model(tmp_path):
    """Adapters on Phi-3's fused qkv_proj / gate_up_proj are llama.cpp's attn_qkv / ffn_up adapters, and run on their
    base in llama.cpp as the merged model does."""
    pytest.importorskip("llama_cpp")
    result = export(tiny_lora_run(tmp_path / "lora", "phi3"), tmp_path / "out", lora_gguf=True)
    adapter = result.ggufs[1]
    assert adapter.checked_by == "llama.cpp" and adapter.figures["greedy_tokens"] == 4 * 32
    assert {"blk.0.attn_qkv.weight.lora_a", "blk.1.ffn_up.weight.lora_b"} <= set(_reader(adapter.path)[1])


def test_gemma2_lora_run_as_a_llama_cpp_adapter_agrees_with_the_merged_model(tmp_path):
    """Gemma 2's adapter on its base in llama.cpp (the base written with Gemma's norms as 1 + w, soft-caps and
    sliding window) gives the merged model's greedy tokens and top-1 logits. The fixture's weights are drawn with
    std 0.2 and the final soft-cap is Gemma 2's own (30): with std 0.02 and a cap of 0.5 every logit sits near 0.36
    and the top three differ by 1e-4, a tie at F16 precision that no writer could pass."""
    pytest.importorskip("llama_cpp")
    from tunelab.ship import llamacpp

    run = tiny_lora_run(tmp_path / "lora", "gemma2", final_logit_softcapping=30.0, initializer_range=0.2)
    result = export(run, tmp_path / "out", lora_gguf=True)
    base, adapter = result.ggufs
    assert adapter.checked_by == "llama.cpp" and adapter.figures["greedy_tokens"] == 4 * 32
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_up.weight.lora_b"} <= set(_reader(adapter.path)[1])
    assert _reader(base.path)[0]["general.architecture"] == "gemma2"
    probe = [2, 40, 80, 120, 200, 250, 33, 7, 1, 5]  # the adapter matters: the base alone answers otherwise
    with llamacpp.Runner(base.path) as plain, llamacpp.Runner(base.path, lora=adapter.path) as tuned:
        assert abs(plain.logits(probe) - tuned.logits(probe)).max() > 0.05


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_f16_is_greedy_identical_and_fewer_bits_cost_more_perplexity(tmp_path):
    pytest.importorskip("llama_cpp")
    # q8_0 is checked in llama.cpp on the tiny models above; here the two ends, 16 and ~4.5 bits a weight
    result = export("smollm2-135m-instruct", tmp_path / "smol", quant="f16,q4_k_m", dtype="fp32")
    f16, q4 = result.ggufs
    assert {f.checked_by for f in result.ggufs} == {"llama.cpp"}
    assert f16.figures["greedy_tokens"] == 4 * 32  # the real model: every greedy token identical in llama.cpp
    assert f16.size > 2 * q4.size  # 271 MB and 105 MB (q4_k_m keeps some tensors at 6 bits and more)
    # f16 reports no rise (its check is the greedy tokens): its perplexity against the model's in transformers
    assert abs(f16.figures["perplexity"] / f16.figures["hf_perplexity"] - 1) < 0.01 < q4.figures["perplexity_rise"]


def test_a_near_tie_is_a_tie_and_a_clear_flip_fails_the_greedy_check():
    """check_greedy, with a stand-in for llama.cpp: a different top-1 where Hugging Face ranks the two tokens
    closer than the F16 logit tolerance is counted as a tie; a clear one is the one-line greedy error."""
    import numpy as np

    from tunelab.ship import llamacpp

    want = np.zeros((5, 8), dtype=np.float32)
    want[np.arange(4), [1, 2, 3, 4]] = 10.0  # HF's top-1 at each position (the prompt is 1 token)
    want[2, 6] = 9.995  # a near-tie at position 2 (within 1e-3 of the largest logit)
    ref = llamacpp.Reference(["p"], [[0]], [[0, 1, 2, 3, 4]], [want], [], 1.0)

    class Runner:
        def __init__(self, logits):
            self.got = logits

        def tokenize(self, text):
            return [0]

        def logits(self, seq):
            return self.got

    near = want.copy()
    near[2, 6] = 10.005  # llama.cpp prefers the other token of the tie
    figures = llamacpp.check_greedy(Runner(near), ref, "f16")
    assert figures["greedy_ties"] == 1
    clear = want.copy()
    clear[1, 7] = 15.0  # a token Hugging Face scores 0
    with pytest.raises(UserError, match=r"^--quant f16: greedy check failed: llama.cpp's token 2 of the continuation "
                                        r"of 'p' is 7, the Hugging Face model's 2\."):
        llamacpp.check_greedy(Runner(clear), ref, "f16")
