"""``tunelab export``: merged = adapter model, adapters-only = PEFT, GGUF read back = same logits, safe --out."""

from __future__ import annotations

import json
import types

import pytest
import torch

from ship_fixtures import ship_runs  # noqa: F401 - the session fixture
from tunelab.cli import main
from tunelab.errors import UserError
from tunelab.ship.export import export, verify_manifest
from tunelab.ship.inference import load_for_inference

IDS = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 504, 3287, 28]])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_export_loads_in_plain_transformers_with_the_adapter_model_outputs_and_gguf_round_trips(
        ship_runs, tmp_path):  # noqa: F811
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


    run = ship_runs["lora"]
    result = export(run, tmp_path / "merged", merge=True, dtype="fp32", gguf=True)
    out = result.out
    assert result.kind == "merged" and result.gguf == out / "lora-f32.gguf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "chat_template.jinja", "tunelab.json", "SHA256SUMS", "lora-f32.gguf"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    assert verify_manifest(out) == []

    adapter = load_for_inference(run).model
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no PEFT, no tunelab
    want = logits(adapter)
    assert (logits(merged) - want).abs().max() < 1e-5
    assert merged.generation_config.eos_token_id == 2 and GenerationConfig.from_pretrained(out).pad_token_id == 2
    run_tok, out_tok = AutoTokenizer.from_pretrained(run / "final"), AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "hi"}]
    assert out_tok.apply_chat_template(chat, tokenize=False) == run_tok.apply_chat_template(chat, tokenize=False)

    # export read the GGUF back with transformers' own GGUF loader and compared its logits with
    # the merged model's (which equal the adapter model's, above)
    assert result.gguf_error is not None and result.gguf_error < 1e-4
    reader = gguf.GGUFReader(result.gguf)
    fields = {k: f.contents() for k, f in reader.fields.items() if k in (
        "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "llama.block_count")}
    assert fields == {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
                      "tokenizer.ggml.pre": "smollm", "llama.block_count": 2}
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.0.ffn_down.weight", "output_norm.weight"} <= names
    assert "output.weight" not in names  # tied head: llama.cpp reuses token_embd
    # the rotary permutation was applied to Q (GGML row order differs from HF's)
    q = torch.from_numpy(next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data.copy())
    hf_q = merged.model.layers[0].self_attn.q_proj.weight
    assert q.shape == hf_q.shape and not torch.equal(q, hf_q)


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
    with pytest.raises(UserError, match="only Llama-family causal LMs"):
        export(ship_runs["cls_lora"], tmp_path / "cls_gguf", merge=True, gguf=True)
