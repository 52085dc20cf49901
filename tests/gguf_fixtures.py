"""Tiny random causal LMs of each family the GGUF writer knows, with a small byte-level BPE tokenizer.

The round trips are about the writer and the checks, not the vocabulary: a 300-token tokenizer
keeps every file small and every read fast. The tokenizer carries a ChatML template, so the chat
probe (special tokens) runs too.
"""

from __future__ import annotations

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def small_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "Name a colour. Blue is a colour.", "1234 你好 world"]
    bpe.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>")


def _config(family: str, tok, **extra):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(**{**common, "tie_word_embeddings": False, **extra})
    if family == "qwen2":  # q/k/v biases, tied head, as Qwen2.5-0.5B
        return Qwen2Config(**{**common, "tie_word_embeddings": True, **extra})
    if family == "qwen3":  # q/k norms, a head_dim that is not hidden / heads
        return Qwen3Config(**{**common, "head_dim": 32, "tie_word_embeddings": True, **extra})
    raise ValueError(family)


def tiny_causal_lm(folder, family: str = "llama", *, chat_template: bool = False, **extra):
    """A random 2-layer ``family`` model (GQA) saved with the small tokenizer in ``folder``."""
    from transformers import AutoModelForCausalLM

    tok = small_tokenizer()
    if chat_template:
        tok.chat_template = CHATML
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family, tok, **extra))
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # transformers zeroes biases; non-zero ones show a dropped or misplaced bias
                torch.nn.init.normal_(p, std=0.5)
        model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def small_vocab_llama(folder):
    """A random 2-layer Llama (GQA, untied head) with the 300-token tokenizer (no chat template)."""
    return tiny_causal_lm(folder, "llama", hidden_size=32, intermediate_size=64)


def tiny_lora_run(folder, family: str = "llama"):
    """A LoRA weights folder (PEFT adapter + tokenizer + tunelab.json) on a tiny ``family`` model, with
    random B so the adapter changes the outputs; q/k included (their rows carry llama.cpp's rotary order)."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_causal_lm(folder / "base", family, chat_template=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
    final = folder / "run" / "final"
    peft.save_pretrained(final)
    AutoTokenizer.from_pretrained(base).save_pretrained(final)
    (final / "tunelab.json").write_text(json.dumps({"base_model": str(base), "method": "lora", "run": "tiny-lora",
                                                    "task": "sft"}))
    return final
