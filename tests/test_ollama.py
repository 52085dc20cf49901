"""``--ollama``: the Modelfile's Go template renders every chat exactly as the tokenizer's Jinja template does."""

from __future__ import annotations

import pytest

from gguf_fixtures import tiny_causal_lm
from gotemplate import render
from tunelab.errors import UserError
from tunelab.ship.ollama import chat_shape, go_template, modelfile

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Llama 2: the system message goes inside the first user turn, so no fixed text wraps each role
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
          "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}{% for m in messages %}"
          "{% if m['role'] == 'user' %}{{ bos_token }}[INST] {% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }} [/INST]"
          "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and {{x}}?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}],
]


def _ollama_render(template: str, chat: list[dict]) -> str:
    return render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in chat]})


def _tokenizer(template: str | None):
    from gguf_fixtures import small_tokenizer

    tok = small_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("which", ["smollm2", "llama3"])
def test_translated_template_renders_every_chat_as_the_tokenizer_does(which):
    from tunelab.models.load import load_tokenizer

    tok = load_tokenizer("tiny-random-llama") if which == "smollm2" else _tokenizer(LLAMA3)
    template = go_template(chat_shape(tok))
    for chat in CHATS:
        want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=chat[-1]["role"] != "assistant")
        if which == "llama3":  # the BOS text leads every chat; llama.cpp adds the BOS token itself
            assert want.startswith(tok.bos_token)
            want = want[len(tok.bos_token):]
        assert _ollama_render(template, chat) == want
    if which == "smollm2":  # SmolLM2's template adds its default system prompt to a chat without one
        assert "You are a helpful AI assistant named SmolLM" in _ollama_render(template, CHATS[0])
        assert "SmolLM" not in _ollama_render(template, CHATS[1])


def test_templates_that_are_not_fixed_text_around_messages_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"--ollama: the chat template is not a fixed text around each message") as err:
        chat_shape(_tokenizer(LLAMA2))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--ollama: the tokenizer has no chat template"):
        chat_shape(_tokenizer(None))


def test_modelfile_has_the_stop_tokens_and_generation_defaults():
    from transformers import GenerationConfig

    tok = _tokenizer(LLAMA3)
    gen = GenerationConfig(eos_token_id=[2, 0], do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.1)
    text = modelfile("m-q4_k_m.gguf", tok, gen)
    lines = text.splitlines()
    assert lines[0] == "FROM ./m-q4_k_m.gguf" and lines[1].startswith('TEMPLATE """{{ range $i')
    stops = [line for line in lines if line.startswith("PARAMETER stop")]
    assert stops == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']
    assert {"PARAMETER temperature 0.6", "PARAMETER top_p 0.9", "PARAMETER repeat_penalty 1.1"} <= set(lines)
    greedy = modelfile("m.gguf", tok, GenerationConfig(do_sample=False, temperature=0.7))
    assert "PARAMETER temperature 0" in greedy.splitlines()


def test_export_ollama_writes_the_modelfile_beside_the_gguf(tmp_path):
    src = tiny_causal_lm(tmp_path / "model", "qwen2", chat_template=True)
    result = export_quiet(src, tmp_path / "out")
    text = (result.out / "Modelfile").read_text()
    assert text.startswith("# also here: model-q8_0.gguf") and "FROM ./model-f16.gguf" in text
    assert (result.out / "model-f16.gguf").is_file() and 'PARAMETER stop "<|im_end|>"' in text
    assert any("ollama create model -f Modelfile" in note for note in result.notes)


def export_quiet(src, out):
    from tunelab.ship.export import export

    return export(src, out, quant="f16,q8_0", ollama=True, dtype="fp32")
