"""task: classification with QLoRA, IA3 and bottleneck adapters (the head always trains; save -> reload).

tiny-random-llama, fp32 on CPU; QLoRA quantises the backbone to NF4 with bitsandbytes (CPU kernels).
"""

from __future__ import annotations

import pytest
import torch

from test_classification import batch_logits, cls_config, run
from tunelab.config import load_config
from tunelab.errors import ConfigError

TEXTS = ["the old red", "we saw a dog", "one very green", "then a horse"]

# method -> (config, substring of the parameter names the method trains in the backbone)
CASES = {
    "qlora": ({"name": "qlora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "lora_"),
    "ia3": ({"name": "ia3"}, "ia3_l"),
    "adapter": ({"name": "adapter", "size": 8, "placement": "houlsby"}, ".adapter_"),
}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", sorted(CASES))
def test_classification_method_trains_its_parameters_and_the_head_and_reloads(tmp_path, method, monkeypatch):
    from tunelab.ship.inference import load_for_inference

    conf, marker = CASES[method]
    cfg = cls_config(tmp_path, f"cls-{method}", conf, n_train=32,
                     train={"epochs": None, "max_steps": 2, "eval_every": 0, "lr": 5e-2})
    import tunelab.train.build as build

    before: dict[str, torch.Tensor] = {}
    real = build.build_optimizer

    def spy(model, *args, **kwargs):  # the model as the method left it, before the first step
        before.update(_snapshot(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(build, "build_optimizer", spy)
    out = run(tmp_path, cfg)
    after = _snapshot(out.model)
    trained = {n for n, p in out.model.named_parameters() if p.requires_grad}
    changed = {n for n in trained if not torch.equal(before[n], after[n])}
    assert any(marker in n for n in changed), sorted(trained)[:8]
    assert any("score" in n for n in changed)  # the new head trains
    assert all(marker in n or "score" in n for n in trained)  # nothing else is trained
    frozen = [n for n in after if n not in trained and n in before]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    if method == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in out.model.modules())  # the backbone is 4-bit
    reference = batch_logits(out.model.eval(), out.tokenizer, TEXTS)
    loaded = load_for_inference(out.run_dir)
    enc = out.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        again = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-5)
    assert loaded.id2label == {0: "animal", 1: "colour"}


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning", "llama_adapter"])
def test_virtual_token_methods_with_classification_are_a_one_line_error(tmp_path, method):
    import yaml

    cfg = cls_config(tmp_path, f"cls-{method}", {"name": method})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=f"method {method} with task: classification.*Use lora, qlora"):
        load_config(path)
