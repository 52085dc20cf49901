"""The fused decoder layer (tunelab.kernels.decoder): equal to the stock transformers + PEFT layer."""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels import attention as att
from tunelab.kernels import decoder


def _model(target_modules="all-linear", seed=0, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tunelab.methods import lora

    torch.manual_seed(seed)
    kw = dict(vocab_size=120, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    base = (Qwen2ForCausalLM(Qwen2Config(**kw)) if bias else LlamaForCausalLM(LlamaConfig(**kw))).float()
    for m in base.modules():  # non-trivial norms and biases
        if hasattr(m, "variance_epsilon"):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias, std=0.1)
    model = lora.apply(base, lora.Config(r=4, alpha=8, target_modules=target_modules))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so the adapter path matters
            torch.nn.init.normal_(p, std=0.05)
    return model


def _packed(lengths, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (batch, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).view(1, -1).expand(batch, -1).contiguous()
    return ids, pos


def _run(model, ids, pos, autocast=False):
    model.zero_grad()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(inputs_embeds=emb, position_ids=pos, use_cache=False).logits
    w = torch.linspace(-1, 1, out.shape[-1])
    (out.float() * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach().float(), emb.grad.clone(), grads


@pytest.mark.parametrize("target_modules,bias", [("all-linear", False), (["q_proj", "v_proj", "down_proj"], False),
                                                 ("all-linear", True)])
def test_fused_layer_equals_stock_in_values_and_gradients(target_modules, bias, monkeypatch):
    """fp32: logits, the input gradient and every LoRA gradient match the stock layers (transformers'
    Llama / Qwen2 with PEFT and our segment-wise attention) on packed rows of several samples."""
    monkeypatch.setattr(att, "BLOCK", 32)  # several query blocks per sample
    model = _model(target_modules, bias=bias)
    model.get_base_model().set_attn_implementation(att.NAME)
    ids, pos = _packed([37, 5, 70, 1, 15])
    ref = _run(model, ids, pos)
    assert decoder.use_fused_layers(model) == 2
    ours = _run(model, ids, pos)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-4, atol=1e-5)
    assert ours[2].keys() == ref[2].keys() and ref[2]
    for name, g in ours[2].items():  # fp32 rounding, relative to the gradient's scale
        scale = float(ref[2][name].abs().max())
        torch.testing.assert_close(g, ref[2][name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert decoder.restore(model)
    assert not any("forward" in vars(m) for m in model.modules())


def test_fused_layer_under_bf16_autocast_is_close_to_stock():
    model = _model()
    lm = model.get_base_model()
    lm.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters on a bf16 base, as training runs it
    lm.set_attn_implementation(att.NAME)
    ids, pos = _packed([60, 40, 28])
    ref = _run(model, ids, pos, autocast=True)
    decoder.use_fused_layers(model)
    ours = _run(model, ids, pos, autocast=True)
    assert (ours[0] - ref[0]).abs().max() < 0.05 * ref[0].abs().max()
    for name, g in ours[2].items():
        rel = (g - ref[2][name]).norm() / ref[2][name].norm()
        assert rel < 0.03, (name, float(rel))


def test_layers_that_do_not_fit_run_the_stock_forward():
    model = _model()
    lm = model.get_base_model()
    # a trained norm weight (e.g. modules_to_save) or LoRA dropout: not fused
    lm.model.layers[0].input_layernorm.weight.requires_grad_(True)
    assert decoder.use_fused_layers(model) == 1
    decoder.restore(model)
    # sdpa (not our attention name), or an attention mask, or a KV cache: the stock forward, same values
    ids, pos = _packed([20, 12])
    ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    decoder.use_fused_layers(model)
    called = []
    real = decoder.DecoderLayerFn.apply
    decoder.DecoderLayerFn.apply = lambda *a: called.append(1) or real(*a)
    try:
        torch.testing.assert_close(model(input_ids=ids, position_ids=pos, use_cache=False).logits, ref)
        mask = torch.ones_like(ids)
        model(input_ids=ids, attention_mask=mask)
        assert not called
        lm.set_attn_implementation(att.NAME)
        model(input_ids=ids, position_ids=pos, use_cache=False)
        assert called
    finally:
        decoder.DecoderLayerFn.apply = real


def test_adapters_hooked_into_the_layer_keep_the_stock_forward():
    """Bottleneck adapters run as forward hooks on the attention / MLP modules and LLaMA-Adapter wraps
    the attention: a fused layer would skip them, so those layers are never fused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.methods import adapter, llama_adapter

    kw = dict(vocab_size=120, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, attn_implementation="sdpa")
    hooked = adapter.apply(LlamaForCausalLM(LlamaConfig(**kw)), adapter.Config(placement="houlsby", size=8))
    assert decoder.use_fused_layers(hooked) == 0
    wrapped = llama_adapter.apply(LlamaForCausalLM(LlamaConfig(**kw)), llama_adapter.Config(prompt_length=4, layers=1))
    assert decoder.use_fused_layers(wrapped) == 1  # the bottom layer only; the top one is PEFT's AdaptedAttention
    plain = LlamaForCausalLM(LlamaConfig(**kw)).requires_grad_(False)
    assert decoder.use_fused_layers(plain) == 2
    decoder.restore(plain)
    plain.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert decoder.use_fused_layers(plain) == 1


def test_gradient_checkpointing_still_checkpoints_the_fused_layer(monkeypatch):
    """transformers checkpoints the layer class's forward; the fused instance forward must do it
    itself: the layer runs twice (forward, then the recompute) and the gradients are unchanged."""
    model = _model()
    lm = model.get_base_model()
    lm.set_attn_implementation(att.NAME)
    decoder.use_fused_layers(model)
    ids, pos = _packed([30, 20])
    ref = _run(model, ids, pos)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []
    real = decoder.DecoderLayerFn.forward
    monkeypatch.setattr(decoder.DecoderLayerFn, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    ours = _run(model, ids, pos)
    assert len(calls) == 2 * lm.config.num_hidden_layers
    for name, g in ours[2].items():
        torch.testing.assert_close(g, ref[2][name], rtol=1e-5, atol=1e-7, msg=name)
