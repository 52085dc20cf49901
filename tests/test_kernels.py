"""Segment-wise causal attention: equal to SDPA with a block-diagonal causal mask, values and gradients."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tunelab.kernels import attention as att


def _reference(q, k, v, bounds, scale):
    b_, h, length, _ = q.shape
    mask = torch.zeros(b_, 1, length, length, dtype=torch.bool)
    for b, spans in enumerate(bounds):
        for s, e in spans:
            mask[b, 0, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("segments", [[40], [1, 150, 19, 4], [200]])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_matches_masked_sdpa_in_values_and_gradients(segments, heads, monkeypatch):
    monkeypatch.setattr(att, "BLOCK", 64)  # several query blocks per long segment
    torch.manual_seed(0)
    h, kv = heads
    length = sum(segments)
    pos = torch.cat([torch.arange(n) for n in segments]).view(1, -1).expand(2, -1)
    bounds = att.segment_bounds(pos)
    q = torch.randn(2, h, length, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv, length, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv, length, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, length, h, 8, dtype=torch.float64)
    ours = att.SegmentCausalAttention.apply(q, k, v, bounds, 0.25)
    grads = torch.autograd.grad((ours * w).sum(), (q, k, v))
    ref = _reference(q, k, v, bounds, 0.25)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_segment_bounds_restart_at_zero():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert att.segment_bounds(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


def test_causal_bias_cache_is_bounded_and_keeps_what_is_in_use(monkeypatch):
    """Packed rows bring a new block shape per segment length; the shared causal biases must not
    pile up (an unbounded cache grew ~80 MB per step on SmolLM2)."""
    monkeypatch.setattr(att, "_BIASES", type(att._BIASES)())
    monkeypatch.setattr(att, "_BIAS_BYTES", 4 * 2**20)
    for kn in range(64, 600, 3):
        att._causal_bias(3, min(kn, att.BLOCK), kn, kn - min(kn, att.BLOCK), torch.bfloat16, torch.device("cpu"))
    held = sum(b.numel() * b.element_size() for b in att._BIASES.values())
    assert held <= 4 * 2**20 and len(att._BIASES) >= 2
    last = att._causal_bias(3, att.BLOCK, 598, 598 - att.BLOCK, torch.bfloat16, torch.device("cpu"))
    assert att._causal_bias(3, att.BLOCK, 598, 598 - att.BLOCK, torch.bfloat16, torch.device("cpu")) is last  # a hit
    i = torch.arange(att.BLOCK).view(-1, 1) + 598 - att.BLOCK
    expected = torch.where(torch.arange(598).view(1, -1) > i, float("-inf"), 0.0).repeat(3, 1)
    torch.testing.assert_close(last.float(), expected)


def test_bf16_close_to_fp32():
    torch.manual_seed(1)
    pos = torch.cat([torch.arange(n) for n in (90, 150)]).view(1, -1)
    bounds = att.segment_bounds(pos)
    q, k, v = (torch.randn(1, n, 240, 64) for n in (9, 3, 3))
    exact = att.SegmentCausalAttention.apply(q, k, v, bounds, 0.125)
    low = att.SegmentCausalAttention.apply(q.bfloat16(), k.bfloat16(), v.bfloat16(), bounds, 0.125)
    assert (low.float() - exact).abs().max() < 0.05


# --------------------------------------------------------------------------- fused LoRA


def _tiny_lora(seed: int = 0):
    from tunelab.methods import lora
    from tunelab.models.load import load_model

    torch.manual_seed(seed)
    model = lora.apply(load_model("tiny-random-llama", dtype=torch.float32), lora.Config(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so the adapter path matters
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_fused_lora_equals_peft_in_values_and_gradients():
    from tunelab.kernels.lora import restore, use_fused_lora

    model = _tiny_lora()
    ids = torch.randint(0, 100, (2, 24))

    def run():
        model.zero_grad()
        out = model(input_ids=ids).logits
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref, ref_grads = run()
    assert use_fused_lora(model) == 7 * model.config.num_hidden_layers
    ours, grads = run()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    restore(model)
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_fused_lora_falls_back_to_peft_when_it_does_not_apply():
    from tunelab.kernels.lora import use_fused_lora

    model = _tiny_lora()
    use_fused_lora(model)
    ids = torch.randint(0, 100, (1, 10))
    with model.disable_adapter():  # adapters off: the base model's output exactly
        off = model(input_ids=ids).logits
    base = model.get_base_model()
    for m in base.modules():
        if hasattr(m, "lora_A"):
            m.lora_B["default"].weight.data.zero_()
    torch.testing.assert_close(model(input_ids=ids).logits, off)


def test_fused_kernels_keep_the_training_curve(tmp_path, alpaca_path):
    from conftest import tiny_config
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    losses = {}
    for fused in (True, False):
        raw = tiny_config(tmp_path, alpaca_path, data={"train": [{"path": str(alpaca_path), "limit": 24}],
                                                        "max_length": 256, "packing": True},
                          train={"max_steps": 3, "lr": 1e-3, "fused_kernels": fused})
        raw["run"]["name"] = f"fused-{fused}"
        out = fine_tune(load_config(None, base=raw)[0])
        env = json.loads((out.run_dir / "env.json").read_text())
        assert bool(env["kernels"]) == fused
        assert any(k.startswith("fused decoder layer") for k in env["kernels"]) == fused
        losses[fused] = [json.loads(x)["loss"] for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()
                         if json.loads(x)["kind"] == "train"]
        # the model handed back runs the stock code again
        assert out.model.get_base_model().config._attn_implementation == "sdpa"
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def _train_losses(tmp_path, alpaca_path, name: str, console=None, **train):
    from conftest import tiny_config
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    raw = tiny_config(tmp_path, alpaca_path, data={"train": [{"path": str(alpaca_path), "limit": 24}],
                                                    "max_length": 256, "packing": True},
                      train={"max_steps": 3, "lr": 1e-3, **train})
    raw["run"]["name"] = name
    out = fine_tune(load_config(None, base=raw)[0], console=console)
    env = json.loads((out.run_dir / "env.json").read_text())
    losses = [json.loads(x)["loss"] for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    return out, env, losses


def test_untested_transformers_trains_the_stock_path_with_the_same_curve_and_one_notice(tmp_path, alpaca_path,
                                                                                          monkeypatch):
    """On a transformers version outside the tested table the kernels stay off, training says so in
    one line and runs the stock code: the same loss curve as with the kernels on."""
    from rich.console import Console

    import tunelab.kernels as kernels

    _, env_on, on = _train_losses(tmp_path, alpaca_path, "tested")
    assert any(k.startswith("fused decoder layer") for k in env_on["kernels"])

    monkeypatch.setitem(kernels.TESTED, "transformers", [("0.0.1", "0.0.2")])  # the installed one is now unknown
    console = Console(record=True, width=400)
    out, env_off, off = _train_losses(tmp_path, alpaca_path, "untested", console=console)
    assert env_off["kernels"] == []
    assert out.model.get_base_model().config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) for m in out.model.modules())
    notices = [line for line in console.export_text().splitlines() if "training kernels off" in line]
    assert notices == [kernels.version_notice()], console.export_text()
    assert "transformers" in notices[0] and "(tested: >=0.0.1,<0.0.2)" in notices[0] and "peft" not in notices[0]
    assert on == pytest.approx(off, rel=1e-5)


def test_training_kernels_context_switches_off_on_exit_and_on_errors_and_pauses_for_stock_code(monkeypatch):
    import tunelab.kernels as kernels

    model = _tiny_lora()
    lm = model.get_base_model()

    def ours_on() -> bool:
        return lm.config._attn_implementation == att.NAME or any("forward" in vars(m) for m in model.modules())

    with kernels.training_kernels(model) as k:
        assert k and k.notice is None and "segment-wise causal attention" in k.active and ours_on()
        with k.stock():  # saving / generation inside the loop
            assert not ours_on()
        assert ours_on()
    assert not ours_on()

    with pytest.raises(RuntimeError, match="boom"), kernels.training_kernels(model) as k:
        assert ours_on()
        raise RuntimeError("boom")
    assert not ours_on()

    with kernels.training_kernels(model, enabled=False) as k:  # switched off by config: no notice
        assert not k and k.notice is None and not ours_on()

    monkeypatch.setitem(kernels.TESTED, "peft", [("99.0", "100.0")])
    said = []
    with kernels.training_kernels(model, notify=said.append) as k:
        assert not k and not ours_on()
        assert said == [k.notice] and k.notice.startswith("training kernels off: untested peft ")
        with k.stock():
            assert not ours_on()
    assert not ours_on()


def test_the_pinned_transformers_and_peft_are_tested_versions():
    """`make setup` installs requirements/constraints.txt: those pins must be in the kernels' table,
    else `make test` would test the stock path only."""
    from packaging.version import Version

    from conftest import REPO
    from tunelab.kernels import TESTED

    pins = dict(line.split("==") for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for package, ranges in TESTED.items():
        assert any(Version(low) <= Version(pins[package].strip()) < Version(high) for low, high in ranges), package


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4, "alpha": 8}])
def test_kernels_under_bf16_autocast_with_mixed_input_dtypes(tmp_path, alpaca_path, method):
    """Full fine-tuning keeps fp32 weights: under bf16 autocast RoPE gives fp32 q/k and bf16 v."""
    from conftest import tiny_config
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    raw = tiny_config(tmp_path, alpaca_path, method=method,
                      data={"train": [{"path": str(alpaca_path), "limit": 16}], "max_length": 128, "packing": True},
                      train={"max_steps": 2, "precision": "bf16"})
    out = fine_tune(load_config(None, base=raw)[0])
    env = json.loads((out.run_dir / "env.json").read_text())
    assert "segment-wise causal attention" in env["kernels"]
    losses = [json.loads(x)["loss"] for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_block_shapes_are_rounded_to_a_few(monkeypatch):
    """Every query block and key span is computed padded to SHAPE_MULTIPLE, whatever the segment
    lengths (values are checked against SDPA above): new shapes grow oneDNN's caches."""
    seen = set()
    real = att._scores

    def spy(q_blk, k_seg, g, m, off, scale, dtype):
        seen.add((m, k_seg.shape[-2]))
        return real(q_blk, k_seg, g, m, off, scale, dtype)

    monkeypatch.setattr(att, "_scores", spy)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        lengths = torch.randint(1, 90, (4,), generator=g).tolist()
        pos = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
        q = torch.randn(1, 4, pos.shape[1], 8, requires_grad=True)
        k = torch.randn(1, 2, pos.shape[1], 8, requires_grad=True)
        v = torch.randn(1, 2, pos.shape[1], 8, requires_grad=True)
        att.SegmentCausalAttention.apply(q, k, v, att.segment_bounds(pos), 0.3).sum().backward()
    assert seen and all(m % att.SHAPE_MULTIPLE == 0 and kn % att.SHAPE_MULTIPLE == 0 for m, kn in seen)
    assert len(seen) <= 10  # 48 segments of 1-89 tokens: at most 3 x 3 rounded (m, kn) pairs + 1


@pytest.mark.parametrize("n", [1, 16, 37, 85])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_cross_entropy_equals_cross_entropy(n, train_head):
    """Labels-only CE in chunks of 16 rows, the last one padded: loss and gradients equal F.cross_entropy."""
    from tunelab.objectives.causal_lm import chunked_cross_entropy_sum

    torch.manual_seed(n)
    h = torch.randn(n, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=train_head)
    t = torch.randint(0, 50, (n,))
    ours = chunked_cross_entropy_sum(h, w, t, chunk=16)
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    inputs = (h, w) if train_head else (h,)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours * 1.5, inputs), torch.autograd.grad(ref * 1.5, inputs), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("total_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
def test_the_head_gradient_is_scaled_in_fp32_and_rounded_once(total_dtype, dtype):
    """scaled_head_grad's shortcuts give the bits of the fp32 product rounded once to the weight's dtype."""
    from tunelab.objectives.causal_lm import scaled_head_grad

    torch.manual_seed(0)
    total = torch.randn(300, 64).to(total_dtype)
    for scale in (1 / 511, 3.7e-4, 0.123456789, 1.0):
        grad_out = torch.tensor(scale, dtype=torch.float32)
        ours = scaled_head_grad(total, grad_out, dtype)
        assert ours.dtype == dtype and torch.equal(ours, (total.float() * grad_out).to(dtype))
        if total_dtype != torch.float32:  # the product of a 16-bit and an fp32 number is exact in fp64
            assert torch.equal(ours, (total.double() * grad_out.double()).float().to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_cross_entropy_in_bf16_keeps_confident_targets_exact(dtype):
    """bf16 (and fp16) logits: the loss and the gradient stay as close to fp64 as bf16 logits allow, also for
    targets predicted with p > 0.99, whose ``p - 1`` a bf16 softmax alone would round coarsely."""
    from tunelab.objectives.causal_lm import chunked_cross_entropy_sum

    torch.manual_seed(0)
    w = torch.randn(300, 16).to(dtype)
    h = (torch.randn(40, 16) * 3).to(dtype)
    logits = (h.float() @ w.float().T).double()
    t = logits.argmax(-1)
    t[::2] = torch.randint(0, 300, (20,))  # half confident, half not
    hg = h.clone().requires_grad_(True)
    ours = chunked_cross_entropy_sum(hg, w, t, chunk=16)
    (grad,) = torch.autograd.grad(ours, hg)
    ours = float(ours.detach())
    # reference: exact maths on the same bf16 logits (their own rounding is not what is tested)
    ref_logits = (hg.detach() @ w.T).double()
    logp = torch.log_softmax(ref_logits, -1)
    ref = -logp[torch.arange(40), t].sum()
    d = logp.exp()
    d[torch.arange(40), t] -= 1
    confident = logp[torch.arange(40), t].exp() > 0.99
    assert confident.sum() >= 5
    assert logp[torch.arange(40), t].exp().min() < 1e-30  # also targets a bf16 softmax flushes to zero
    assert abs(ours - float(ref)) <= 1e-4 * float(ref), (ours, float(ref))
    ref_grad = d @ w.double()
    assert (grad.double() - ref_grad).norm() / ref_grad.norm() < 0.01
    # a confident row's gradient is small: ``bf16(p_t) - 1`` alone would be off by 100% there
    row_err = (grad.double() - ref_grad).norm(dim=1) / ref_grad.norm(dim=1)
    assert row_err[confident].max() < 0.1, row_err[confident]
