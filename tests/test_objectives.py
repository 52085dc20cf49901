"""The causal-LM loss equals cross-entropy over the model's own full logits, for every head kind."""

from __future__ import annotations

import pytest
import torch

from tunelab.models.load import load_model
from tunelab.objectives.causal_lm import CausalLMLoss


@pytest.mark.parametrize("head", ["tied", "bias", "softcap"])
def test_loss_equals_full_logits_cross_entropy(head):
    model = load_model("tiny-random-llama")
    softcap = None
    if head == "bias":  # an untied output layer with a bias
        torch.manual_seed(1)
        old = model.lm_head
        model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        model.config.tie_word_embeddings = False
    if head == "softcap":
        softcap = model.config.final_logit_softcapping = 5.0
    loss_model = CausalLMLoss(model, chunk=5)
    assert loss_model.fused == (head == "tied")
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 16))
    labels = ids.clone()
    labels[:, :6] = -100
    out = loss_model(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))
    loss_sum, n = out.total, out.count
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="sum")
    assert n == 2 * 10
    torch.testing.assert_close(loss_sum, reference, atol=1e-4, rtol=1e-5)
    loss_sum.backward()  # gradients reach the head on the plain path, the body on both
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
