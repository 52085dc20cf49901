"""Tiny random causal LMs of each family the GGUF writer knows, with a small tokenizer of the family's kind.

The round trips are about the writer and the checks, not the vocabulary: a few hundred tokens
keep every file small and every read fast. Llama/Qwen get a 300-token byte-level BPE (GPT-2
style) with a ChatML template; Gemma and Phi-3 get a SentencePiece-style BPE (``▁`` for spaces,
byte fallback to ``<0x..>`` tokens) laid out as their real tokenizers are and loaded through
their own transformers classes, with their own chat templates, so the chat probe (special tokens)
runs too.
"""

from __future__ import annotations

import json
from pathlib import Path

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


#: Gemma's turn format (as its real template, without the system-turn handling).
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
                  "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
#: Phi-3's (as Phi-3.5-mini's, without its system-turn handling).
PHI3_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")
_SP_CORPUS = ["The quick brown fox jumps over the lazy dog.", "Name a colour. Blue is a colour.", "1234 你好 world",
              "The three primary colours are red, yellow and blue.", "Question: What is 17 + 25?\nAnswer: 42",
              "Give me one tip for writing clear commit messages.", "  indented   code\n\tand tabs"]


def sentencepiece_tokenizer(style: str = "gemma"):
    """A SentencePiece-style BPE tokenizer (``▁`` word prefix, byte fallback) in the layout of a real one.

    Trained with ``tokenizers`` (no ``sentencepiece``), then given the real vocabulary layout: the
    control tokens first, the 256 byte tokens ``<0x00>``..``<0xFF>``, then the learned pieces.
    ``style="gemma"``: ``<pad> <eos> <bos> <unk> <mask> <start_of_turn> <end_of_turn>``, transformers'
    ``GemmaTokenizer`` (spaces become ``▁``, no prefix space, BOS added); ``"phi3"``: ``<unk> <s> </s>``
    and Phi-3's ``tokenizer.json`` pipeline, its chat tokens added at the end (special and
    right-stripping, as Phi-3's are), no BOS added (Phi-3.5's ``tokenizer_config.json``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.train_from_iterator(_SP_CORPUS * 20, trainers.BpeTrainer(vocab_size=160, special_tokens=[]))
    learned = json.loads(bpe.to_str())["model"]
    head = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"] if style == "gemma"
            else ["<unk>", "<s>", "</s>"])
    vocab = {t: i for i, t in enumerate(head + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    if style == "gemma":
        tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.chat_template = GEMMA_TEMPLATE
        return tok
    # Phi-3's tokenizer.json is Llama 2's: a Prepend + Replace normalizer (▁ before every text and after
    # every special token), which transformers 5 uses as it is for model_type phi3 (no LlamaTokenizer rebuild)
    spm = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    spm.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    spm.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>")])
    spm.add_tokens([AddedToken("</s>", rstrip=True, special=False, normalized=False)])
    spm.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)] + [
        AddedToken(t, rstrip=True, special=True, normalized=False)
        for t in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="<|endoftext|>",
                                  unk_token="<unk>", pad_token="<|endoftext|>", add_bos_token=False)
    tok.chat_template = PHI3_TEMPLATE
    return tok


def _config(family: str, tok, **extra):
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(**{**common, "tie_word_embeddings": False, **extra})
    if family == "qwen2":  # q/k/v biases, tied head, as Qwen2.5-0.5B
        return Qwen2Config(**{**common, "tie_word_embeddings": True, **extra})
    if family == "qwen3":  # q/k norms, a head_dim that is not hidden / heads
        return Qwen3Config(**{**common, "head_dim": 32, "tie_word_embeddings": True, **extra})
    if family == "gemma2":  # head_dim 32 (not hidden / heads), small window and soft-caps so each one matters
        return Gemma2Config(**{**common, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
                               "attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.5, **extra})
    if family == "gemma3":  # 6 layers: five sliding, one global (Gemma 3's pattern); q/k norms; linear RoPE scaling
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 6, "head_dim": 32, "query_pre_attn_scalar": 32,
                                   "sliding_window": 8, "rope_parameters": rope, **extra})
    if family == "phi3":  # fused qkv_proj and gate_up_proj, untied head
        return Phi3Config(**{**common, "original_max_position_embeddings": 512, **extra})
    raise ValueError(family)


SENTENCEPIECE_STYLE = {"gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3"}


def tiny_causal_lm(folder, family: str = "llama", *, chat_template: bool = False, **extra):
    """A random 2-layer ``family`` model (GQA; Gemma 3: 6 layers) saved with its small tokenizer in ``folder``.

    Gemma and Phi-3 get the SentencePiece-style tokenizer (always with their chat template) and
    noise on their norm weights (transformers starts Gemma's at 0, its ``1 + w`` form, where a norm
    written without llama.cpp's ``+ 1`` would zero the layer rather than show as a small error).
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if family in SENTENCEPIECE_STYLE:
        tok = sentencepiece_tokenizer(SENTENCEPIECE_STYLE[family])
    else:
        tok = small_tokenizer()
        if chat_template:
            tok.chat_template = CHATML
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family, tok, **extra))
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # transformers zeroes biases; non-zero ones show a dropped or misplaced bias
                torch.nn.init.normal_(p, std=0.5)
            elif family in SENTENCEPIECE_STYLE and "norm" in name:
                p.data.add_(torch.randn_like(p) * 0.3)
            elif family == "gemma2" and name.endswith(("q_proj.weight", "k_proj.weight")):
                torch.nn.init.normal_(p, std=0.3)  # attention scores of a few units, so the soft-cap bites
        model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if family == "phi3":  # as Phi-3's own file says (transformers 5 loads phi3's tokenizer.json as it is anyway)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    return folder


def small_vocab_llama(folder):
    """A random 2-layer Llama (GQA, untied head) with the 300-token tokenizer (no chat template)."""
    return tiny_causal_lm(folder, "llama", hidden_size=32, intermediate_size=64)


def tiny_lora_run(folder, family: str = "llama", **extra):
    """A LoRA weights folder (PEFT adapter + tokenizer + tunelab.json) on a tiny ``family`` model (``extra``: its
    config), with random B so the adapter changes the outputs; q/k included (their rows carry llama.cpp's rotary
    order)."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_causal_lm(folder / "base", family, chat_template=True, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        targets = (["qkv_proj", "o_proj", "gate_up_proj"] if family == "phi3"  # Phi-3's fused projections
                   else ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=4, lora_alpha=8, target_modules=targets))
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
    final = folder / "run" / "final"
    peft.save_pretrained(final)
    AutoTokenizer.from_pretrained(base).save_pretrained(final)
    (final / "tunelab.json").write_text(json.dumps({"base_model": str(base), "method": "lora", "run": "tiny-lora",
                                                    "task": "sft"}))
    return final
