"""``tunelab export``: merged = adapter model, adapters-only = PEFT, GGUF read back = same logits, safe --out."""

from __future__ import annotations

import json
import types

import pytest
import torch

from gguf_fixtures import small_vocab_llama
from ship_fixtures import ship_runs  # noqa: F401 - the session fixture
from tunelab.cli import main
from tunelab.errors import UserError
from tunelab.ship.export import export, verify_manifest
from tunelab.ship.inference import load_for_inference

IDS = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 504, 3287, 28]])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_export_loads_in_plain_transformers_with_the_adapter_model_outputs(ship_runs, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run = ship_runs["lora"]
    result = export(run, tmp_path / "merged", merge=True, dtype="fp32")
    out = result.out
    assert result.kind == "merged" and result.gguf is None
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "chat_template.jinja", "tunelab.json", "SHA256SUMS"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    assert verify_manifest(out) == []

    adapter = load_for_inference(run).model
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no PEFT, no tunelab
    assert (logits(merged) - logits(adapter)).abs().max() < 1e-5
    assert merged.generation_config.eos_token_id == 2 and GenerationConfig.from_pretrained(out).pad_token_id == 2
    run_tok, out_tok = AutoTokenizer.from_pretrained(run / "final"), AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "hi"}]
    assert out_tok.apply_chat_template(chat, tokenize=False) == run_tok.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gguf_export_round_trips_through_transformers_gguf_loader(tmp_path, dtype):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.ship.to_gguf import load_gguf_back

    src = small_vocab_llama(tmp_path / "model")
    result = export(src, tmp_path / "out", gguf=True, dtype=dtype)
    kind = {"fp32": "f32", "fp16": "f16"}[dtype]
    assert result.gguf == tmp_path / "out" / f"model-{kind}.gguf" and verify_manifest(result.out) == []
    exported = AutoModelForCausalLM.from_pretrained(result.out).float().eval()
    back = load_gguf_back(result.gguf)  # transformers' own GGUF loader (it undoes the Q/K permutation)
    ids = torch.tensor([[1, 5, 17, 40, 80, 120, 200, 250, 33, 7]])
    assert (logits(back, ids) - logits(exported, ids)).abs().max() < 1e-5
    checked = result.ggufs[0]  # run in llama.cpp where the [gguf] extra is installed, else read back by transformers
    assert checked.checked_by in ("llama.cpp", "transformers") and checked.figures["greedy_tokens"] == 4 * 32
    assert checked.figures["top1_logit_error"] < (1e-5 if checked.checked_by == "transformers" else 2e-2)

    reader = gguf.GGUFReader(result.gguf)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert (fields["llama.block_count"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.rope.dimension_count"]) == (2, 4, 2, 8)
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and len(fields["tokenizer.ggml.merges"]) > 0
    assert "<|im_start|>assistant" in fields["tokenizer.chat_template"]  # chatml, given to a model without one
    tensors = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_k.weight",
            "blk.0.ffn_gate.weight", "blk.0.attn_norm.weight"} <= set(tensors)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    want = gguf.GGMLQuantizationType.F16 if dtype == "fp16" else gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == want
    # Q rows are stored in GGML's rotary order, not Hugging Face's
    q = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.astype("float32"))
    hf_q = exported.model.layers[0].self_attn.q_proj.weight
    assert q.shape == hf_q.shape and not torch.equal(q, hf_q)
    # transformers rebuilds the tokenizer from the GGUF metadata alone and it encodes the same
    text = "The lazy dog. 你好 1234"
    assert AutoTokenizer.from_pretrained(result.out, gguf_file=result.gguf.name)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(src)(text)["input_ids"]


def test_llama_cpp_pre_tokenizer_names_smollm2s_tokenizer():
    from tunelab.models.load import load_tokenizer
    from tunelab.ship.to_gguf import bpe_pre_tokenizer

    assert bpe_pre_tokenizer(load_tokenizer("tiny-random-llama")) == "smollm"  # the SmolLM2 tokenizer


# 61 s: make test runs SmolLM2's GGUF in llama.cpp itself (test_gguf_llamacpp.py), so this transformers read-back
# of the real model is left to `pytest -m extended`; the tiny model's read-back above stays in make test
@pytest.mark.real_model
@pytest.mark.extended
def test_smollm2_bf16_gguf_export_reads_back_with_the_same_logits(tmp_path):
    result = export("smollm2-135m-instruct", tmp_path / "smol", gguf=True, dtype="bf16")
    (file,) = result.ggufs
    assert file.kind == "bf16" and file.checked_by is not None and abs(file.figures["perplexity_rise"]) < 0.01


def test_bf16_merge_is_within_bf16_tolerance(ship_runs, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    result = export(ship_runs["lora"], tmp_path / "bf16", merge=True, dtype="bf16")
    merged = AutoModelForCausalLM.from_pretrained(result.out)
    assert merged.dtype == torch.bfloat16
    want = logits(load_for_inference(ship_runs["lora"]).model)
    assert (logits(merged) - want).abs().max() < 0.05 * want.abs().max()


def test_adapter_only_export_is_a_peft_folder_with_a_checked_manifest(ship_runs, tmp_path):  # noqa: F811
    from peft import PeftModel

    from tunelab.models.load import load_model

    result = export(ship_runs["lora"], tmp_path / "adapter")
    assert result.kind == "adapter" and "add --merge" in result.notes[0]
    out = result.out
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "generation_config.json",
            "SHA256SUMS"} <= {p.name for p in out.iterdir()}
    reloaded = PeftModel.from_pretrained(load_model("tiny-random-llama"), out).eval()
    assert torch.equal(logits(reloaded), logits(load_for_inference(ship_runs["lora"]).model))
    assert verify_manifest(out) == []
    (out / "tokenizer_config.json").write_text("{}")
    assert verify_manifest(out) == ["tokenizer_config.json"]


def test_cli_merged_export_prints_its_one_line_and_no_library_warning(ship_runs, tmp_path):  # noqa: F811
    """From the command line, as a user runs it: where DeepSpeed is installed, accelerate imports it in
    save_pretrained, and on a machine without a GPU its import warned "Setting accelerator to CPU"."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "export", str(ship_runs["lora"]), "--merge",
                           "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exported merged"), lines


def test_out_is_never_written_over_without_force(ship_runs, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty.*--force"):
        export(ship_runs["lora"], out)
    assert (out / "mine.txt").read_text() == "precious"
    export(ship_runs["lora"], out, force=True)
    assert not (out / "mine.txt").exists() and (out / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind
    with pytest.raises(UserError, match="--dtype"):
        export(ship_runs["lora"], tmp_path / "x", dtype="int3")


def test_non_mergeable_methods_say_why_in_one_line(ship_runs, tmp_path, monkeypatch, capsys):  # noqa: F811
    import shutil

    from tunelab import methods

    reason = "prefix tuning adds virtual tokens, not weight deltas; serve it with `tunelab serve RUN`"
    monkeypatch.setitem(methods.METHODS, "prefix", types.SimpleNamespace(
        MERGEABLE=False, NOT_MERGEABLE=reason, Config=methods.METHODS["lora"].Config))
    weights = tmp_path / "prefix_run"
    shutil.copytree(ship_runs["lora"] / "final", weights)
    info = json.loads((weights / "tunelab.json").read_text())
    (weights / "tunelab.json").write_text(json.dumps({**info, "method": "prefix"}))

    assert main(["export", str(weights), "--out", str(tmp_path / "m"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert reason in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    assert main(["export", str(weights), "--out", str(tmp_path / "a")]) == 0
    assert reason in capsys.readouterr().out
    assert (tmp_path / "a" / "adapter_config.json").is_file()


def test_classification_adapter_merges_into_a_plain_sequence_classifier(ship_runs, tmp_path):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    result = export(ship_runs["cls_lora"], tmp_path / "cls", merge=True)
    plain = AutoModelForSequenceClassification.from_pretrained(result.out).eval()
    assert plain.config.id2label == {0: "billing", 1: "outage", 2: "other"}
    adapter = load_for_inference(ship_runs["cls_lora"]).model
    assert (logits(plain) - logits(adapter)).abs().max() < 1e-5
    with pytest.raises(UserError, match="writes GGUF for causal LMs of model_type llama, mistral, qwen2, qwen3, "
                                        "gemma2, gemma3_text, phi3"):
        export(ship_runs["cls_lora"], tmp_path / "cls_gguf", merge=True, gguf=True)


def test_gguf_refuses_tokenizers_llama_cpp_would_split_otherwise_in_one_line():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tunelab.ship.to_gguf import _space_prefix, _tokenizer_spec, _vocab_model

    def spec(model, normalizer=None, pre_tokenizer=None):
        tok = Tokenizer(model)
        tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
        return _tokenizer_spec(PreTrainedTokenizerFast(tokenizer_object=tok))

    def bpe():
        return models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")], byte_fallback=True)

    # SentencePiece-style BPE is written as llama.cpp's "llama" vocabulary when llama.cpp splits it the same way
    assert _vocab_model(spec(bpe())) == "llama"
    llama2 = spec(bpe(), normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]))
    assert _space_prefix(llama2) is True and _space_prefix(spec(bpe(), normalizers.Replace(" ", "\u2581"))) is False
    # transformers 5's rebuilt Llama tokenizer: a prefix on the first word only, which llama.cpp cannot follow
    with pytest.raises(UserError, match=r"Metaspace step adds \u2581 to a word only where there is none "
                                        r"\(prepend_scheme 'first'.*convert_hf_to_gguf"):
        _space_prefix(spec(bpe(), pre_tokenizer=pre_tokenizers.Metaspace(prepend_scheme="first")))
    with pytest.raises(UserError, match=r"only turns spaces into \u2581 \(got a NFKC step"):
        _space_prefix(spec(bpe(), normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "\u2581")])))
    with pytest.raises(UserError, match=r"byte-level BPE .* SentencePiece-style BPE .* \(got a Unigram tokenizer\)"):
        _vocab_model(spec(models.Unigram([("a", -1.0), ("b", -2.0)], 0, byte_fallback=False)))


def test_qlora_merge_folds_the_adapter_into_the_unquantised_base(tmp_path, alpaca_path):
    """A QLoRA run merges into the float base (not a 4-bit tensor written out as float)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from tunelab.config import load_config
    from tunelab.models.load import load_model
    from tunelab.train.recipe import fine_tune

    raw = tiny_config(tmp_path, alpaca_path, method={"name": "qlora", "r": 4, "alpha": 8}, train={"max_steps": 2})
    run = fine_tune(load_config(None, base=raw)[0]).run_dir
    export(run, tmp_path / "merged", merge=True, dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    reference = PeftModel.from_pretrained(load_model("tiny-random-llama", dtype=torch.float32), run / "final")
    torch.testing.assert_close(logits(merged), logits(reference), rtol=1e-4, atol=1e-5)
