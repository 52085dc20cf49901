"""Batched generation (padding-invariant, stop strings, seeded sampling) and log-likelihood scoring."""

from __future__ import annotations

import pytest
import torch

from tunelab.eval.generate import GenerationSettings, generate, loglik_continuations


@pytest.fixture(scope="module")
def tiny():
    from tunelab.ship.inference import load_for_inference

    loaded = load_for_inference("tiny-random-llama")
    torch.manual_seed(0)  # the random model's greedy reply is all newlines: perturb it into saying words
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return loaded


PROMPTS = ["Hi", "Tell me a long story about a dragon and a knight who became friends", "What is 2+2?",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]


def test_batched_greedy_equals_one_at_a_time(tiny):
    batched = generate(tiny.model, tiny.tokenizer, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=4))
    single = generate(tiny.model, tiny.tokenizer, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=1))
    assert batched == single and all(batched)


def test_stop_strings_cut_the_reply(tiny):
    full = generate(tiny.model, tiny.tokenizer, PROMPTS[:1], GenerationSettings(max_new_tokens=16))[0]
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = generate(tiny.model, tiny.tokenizer, PROMPTS[:1], GenerationSettings(max_new_tokens=16, stop=(stop,)))[0]
    assert cut == full[: full.find(stop)].strip()
    assert stop not in cut


def test_sampling_is_seeded(tiny):
    def run(seed):
        return generate(tiny.model, tiny.tokenizer, PROMPTS[:2],
                        GenerationSettings(max_new_tokens=6, temperature=1.0, seed=seed, batch_size=2))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_loglik_matches_an_unpadded_forward(tiny):
    tok, model = tiny.tokenizer, tiny.model
    contexts = [tok("The capital of France is", add_special_tokens=False)["input_ids"],
                tok("One two", add_special_tokens=False)["input_ids"]]
    conts = [[[11], [12]], [[21, 22, 23], [24]]]  # single-token path, then the multi-token path
    scores = loglik_continuations(model, tok, contexts, conts, batch_size=3)
    with torch.no_grad():
        for ctx, cands, got in zip(contexts, conts, scores, strict=True):
            for cont, value in zip(cands, got, strict=True):
                logits = model(torch.tensor([ctx + cont])).logits[0]
                logp = torch.log_softmax(logits[len(ctx) - 1 : -1], -1)
                expected = sum(float(logp[i, t]) for i, t in enumerate(cont))
                assert value == pytest.approx(expected, abs=1e-4)
