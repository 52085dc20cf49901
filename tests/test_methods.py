"""Every fine-tuning method on tiny-random-llama: it trains, exactly the intended parameters
change, the trainable-parameter count matches the formula from the model's shapes, and
save -> load_for_inference gives the same outputs. Plus the per-method specifics (freeze
variants, LoRA+, rsLoRA, DoRA, QLoRA, virtual-token loss alignment)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_config
from tunelab import methods
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.models.load import load_model, load_tokenizer
from tunelab.objectives.causal_lm import CausalLMLoss
from tunelab.ship.inference import load_for_inference
from tunelab.train.recipe import build_optimizer, weights_saver

# tiny-random-llama: hidden 64, 2 layers, 4 heads of 16, 2 kv heads, intermediate 128, vocab 49152
H, L, KV, INTER, VOCAB = 64, 2, 32, 128, 49152
LINEARS = {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
           "gate_proj": (H, INTER), "up_proj": (H, INTER), "down_proj": (INTER, H)}  # (in, out)
LAYER_PARAMS = sum(i * o for i, o in LINEARS.values()) + 2 * H  # + input/post-attention RMSNorm


def lora_count(r, dora=False, layers=L, targets=LINEARS):
    return layers * sum(r * (i + o) + (o if dora else 0) for i, o in targets.values())


# (method config, expected trainable parameters)
CASES = {
    "full": ({"name": "full"}, VOCAB * H + L * LAYER_PARAMS + H),  # tied head counted once
    "freeze_top": ({"name": "freeze", "layers": 1}, LAYER_PARAMS),
    "freeze_mlp_of_bottom": ({"name": "freeze", "layers": -1, "layer_modules": ["mlp"]}, 3 * H * INTER),
    "freeze_pattern": ({"name": "freeze", "patterns": [r"layers\.0\.self_attn\.(q|v)_proj"]}, H * H + H * KV),
    "bitfit": ({"name": "freeze", "bitfit": True}, (2 * L + 1) * H),  # Llama has no biases: the norms
    "lora": ({"name": "lora", "r": 4, "alpha": 8}, lora_count(4)),
    "lora_layers": ({"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"], "layers": [-1]},
                    lora_count(2, layers=1, targets={k: LINEARS[k] for k in ("q_proj", "v_proj")})),
    "dora_rslora_loraplus": ({"name": "lora", "r": 4, "dora": True, "rslora": True, "loraplus_lr_ratio": 8},
                             lora_count(4, dora=True)),
    "qlora": ({"name": "qlora", "r": 4}, lora_count(4)),
    "prefix": ({"name": "prefix", "virtual_tokens": 4, "projection_hidden": 16},
               4 * KV + (KV * 16 + 16) + (16 * 2 * L * KV + 2 * L * KV)),
    "prompt": ({"name": "prompt", "virtual_tokens": 5}, 5 * H),
    "ptuning": ({"name": "ptuning", "virtual_tokens": 4, "encoder_hidden": 16},
                4 * H + (H * 16 + 16) + (16 * 16 + 16) + (16 * H + H)),
    "ia3": ({"name": "ia3"}, L * (KV + KV + INTER)),
    "adapter_houlsby": ({"name": "adapter", "placement": "houlsby", "size": 8}, L * 2 * (2 * H * 8 + 8 + H)),
    "adapter_pfeiffer": ({"name": "adapter", "size": 8, "layers": [0]}, 1 * (2 * H * 8 + 8 + H)),
    "llama_adapter": ({"name": "llama_adapter", "prompt_length": 3, "layers": 1}, 1 * (3 * H + 1)),
}


@pytest.fixture(scope="module")
def base():
    return load_model("tiny-random-llama")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random-llama")


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 2000, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build(base, method: dict, tmp_path):
    cfg, _ = load_config(None, base=tiny_config(tmp_path, tmp_path / "unused.json", method=method))
    module = methods.get(cfg.method.name)
    options = methods.load_options(cfg.method, torch.float32)
    model = load_model("tiny-random-llama", **options) if options else copy.deepcopy(base)
    return cfg, module.apply(model, cfg.method)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# one case per method trains and reloads; the other variants check their selection and count
TRAINED = ["full", "freeze_top", "dora_rslora_loraplus", "qlora", "prefix", "prompt", "ptuning", "ia3",
           "adapter_houlsby", "llama_adapter"]
SELECTED = {  # variant -> a predicate every trainable name satisfies
    "freeze_mlp_of_bottom": lambda n: n.startswith("model.layers.0.mlp."),
    "freeze_pattern": lambda n: n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"),
    "bitfit": lambda n: "norm" in n,
    "lora": lambda n: "lora_" in n,
    "lora_layers": lambda n: ".layers.1.self_attn." in n and ("q_proj.lora_" in n or "v_proj.lora_" in n),
    "adapter_pfeiffer": lambda n: n.startswith("model.layers.0.adapter_ffn."),
}


def test_every_method_has_a_trained_case():
    assert {CASES[c][0]["name"] for c in TRAINED} == set(methods.METHODS) - {"head"}


@pytest.mark.parametrize("case", list(SELECTED))
def test_variant_selects_exactly_its_parameters(case, base, tmp_path):
    method, expected = CASES[case]
    _, model = build(base, method, tmp_path)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(SELECTED[case](n) for n in names), names
    assert trainable_count(model) == expected


@pytest.mark.parametrize("case", TRAINED)
def test_method_trains_only_its_parameters_and_reloads(case, base, tokenizer, tmp_path):
    method, expected = CASES[case]
    cfg, model = build(base, method, tmp_path)
    assert trainable_count(model) == expected

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    loss_model = CausalLMLoss(model).train()  # as the loop does (bitsandbytes repacks 4-bit weights in eval)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):  # 2 updates: zero-initialised B / up / gates let A / down / prompts move at the 2nd
        out = loss_model(**batch())
        loss_sum, n = out.total, out.count
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss_sum / n).item())
    with torch.no_grad():
        out = loss_model(**batch())
        losses.append((out.total / out.count).item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable  # every trained tensor moved; every other one is bit-identical

    folder = tmp_path / "final"
    weights_saver(model, tokenizer, cfg)(folder)
    info = json.loads((folder / "tunelab.json").read_text())
    assert info["method"] == cfg.method.name and info["method_config"]["name"] == cfg.method.name
    reloaded = load_for_inference(folder).model
    model.eval()
    b = batch()
    with torch.no_grad():
        want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = reloaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_every_method_declares_its_export_story():
    for name, module in methods.METHODS.items():
        assert isinstance(module.MERGEABLE, bool), name
        if not module.MERGEABLE:
            assert module.NOT_MERGEABLE.strip() and "\n" not in module.NOT_MERGEABLE, name
            assert "tunelab serve" in module.NOT_MERGEABLE, name
    assert {n for n, m in methods.METHODS.items() if not m.MERGEABLE} >= {"prefix", "prompt", "ptuning",
                                                                          "llama_adapter", "adapter"}


@pytest.mark.parametrize("name", ["prefix", "prompt", "ptuning"])
def test_virtual_token_loss_matches_peft_forward(name, base, tmp_path):
    """Our labels-only path gives PEFT's own loss: virtual tokens get none, positions line up."""
    _, model = build(base, {"name": name, "virtual_tokens": 3}, tmp_path)
    b = batch()
    out = CausalLMLoss(model)(**b)
    loss_sum, n = out.total, out.count
    theirs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    torch.testing.assert_close(loss_sum / n, theirs, rtol=1e-5, atol=1e-5)
    assert n == (b["labels"][:, 1:] != -100).sum()


def test_prompt_tuning_starts_from_the_init_text(base, tokenizer, tmp_path):
    from tunelab.methods.prompt import text_init_ids

    _, model = build(base, {"name": "prompt", "virtual_tokens": 7, "init_text": "Classify the news"}, tmp_path)
    ids = text_init_ids(tokenizer, "Classify the news", 7)
    text_ids = tokenizer("Classify the news", add_special_tokens=False)["input_ids"]
    assert ids == (text_ids * 2)[:7]  # repeated to length
    weight = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(weight, base.get_input_embeddings().weight[ids])


def test_lora_variants_rslora_scaling_dora_and_loraplus_groups(base, tmp_path):
    _, model = build(base, {"name": "lora", "r": 16, "alpha": 8, "rslora": True, "dora": True,
                            "loraplus_lr_ratio": 16}, tmp_path)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 16 ** 0.5)  # alpha / sqrt(r), not alpha / r
    assert q.lora_magnitude_vector["default"].weight.shape == (H,)  # DoRA: one magnitude per output
    cfg, _ = load_config(None, base=tiny_config(tmp_path, tmp_path / "x.json", method={"name": "lora", "loraplus_lr_ratio": 16}))
    optimizer = build_optimizer(model, cfg.train, methods.lr_multiplier(cfg.method))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            fast = "lora_B" in name or "lora_magnitude_vector" in name
            assert lr_of[id(p)] == pytest.approx(cfg.train.lr * (16 if fast else 1)), name


def test_qlora_base_is_4bit_on_cpu(tmp_path):
    import bitsandbytes as bnb

    _, model = build(None, {"name": "qlora", "r": 4, "quant_type": "nf4", "double_quant": True}, tmp_path)
    q = model.get_base_model().model.layers[1].mlp.down_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert q.base_layer.weight.dtype == torch.uint8 and q.base_layer.weight.device.type == "cpu"
    state = q.base_layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantisation of the block scales
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == L * len(LINEARS)


def test_freeze_and_method_errors_are_one_line(base, tmp_path):
    from tunelab.errors import UserError

    with pytest.raises(UserError, match="method.layers: 5"):
        build(base, {"name": "freeze", "layers": 5}, tmp_path)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        load_config(None, base=tiny_config(tmp_path, tmp_path / "x.json", method={"name": "freeze", "patterns": ["(("]}))
    with pytest.raises(UserError, match="layer 7 does not exist"):
        build(base, {"name": "lora", "layers": [7]}, tmp_path)
    with pytest.raises(ConfigError, match="data.packing is not supported with method prefix"):
        load_config(None, base=tiny_config(tmp_path, tmp_path / "x.json", method={"name": "prefix"},
                                           data={"train": [{"path": "x.json"}], "packing": True}))
    with pytest.raises(ConfigError, match="gradient_checkpointing is not supported with method prefix"):
        load_config(None, base=tiny_config(tmp_path, tmp_path / "x.json", method={"name": "prefix"},
                                           train={"gradient_checkpointing": True}))
