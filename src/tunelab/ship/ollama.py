"""``tunelab export --ollama``: a ``Modelfile`` beside the GGUF, for ``ollama create NAME -f Modelfile``.

Ollama runs the GGUF with its own prompt template in Go's ``text/template`` syntax, not the
tokenizer's Jinja one. No library translates Jinja to Go templates (a general translation is not
possible), so this module derives the template from what the tokenizer's chat template renders:

* each message's text is the difference between rendering the conversation up to it and up to the
  one before (``apply_chat_template``, the tokenizer's own Jinja); split around the message's
  content, that gives each role's prefix and suffix;
* the generation prompt is what ``add_generation_prompt=True`` appends; a default system block
  (a template that adds one when the chat has no system message, as SmolLM2's does) is what a
  chat without one renders before its first user message;
* the BOS token the template writes first is left out (llama.cpp adds it from the GGUF's
  ``add_bos_token``, as it does for every prompt).

Templates this cannot describe (a role whose text depends on its position or on other messages,
as Llama 2's system-inside-the-first-user-turn) are refused in one line. The stop tokens are the
end-of-sequence tokens of ``generation_config`` plus the role suffix's special token; the sampling
defaults come from ``generation_config``. ``tests/test_ollama.py`` renders the emitted template with
a Go-template interpreter for its subset and compares it with the tokenizer's rendering.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunelab.errors import UserError

_MARK = "\u2063{role}-content-{i}\u2063"  # content no template alters (invisible separator, ascii role)
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatShape:
    """The tokenizer's chat template as per-role prefix/suffix text."""

    wrap: dict[str, tuple[str, str]]  # role -> (prefix, suffix)
    generation: str  # appended for the model's turn
    default_system: str  # rendered before the first message when there is no system message
    writes_bos: bool  # the template writes the BOS text first (left out here: llama.cpp adds the token)


def _render(tokenizer, messages, generation: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as err:  # noqa: BLE001 - a template's own raise_exception (e.g. roles must alternate)
        raise UserError(f"--ollama: the chat template cannot render a {'/'.join(m['role'] for m in messages)} chat "
                        f"({str(err).splitlines()[0][:80]}). Export without --ollama and write the TEMPLATE by hand") from None


def _refuse(why: str) -> UserError:
    return UserError(f"--ollama: the chat template is not a fixed text around each message ({why}). Export "
                     "without --ollama and write the Modelfile's TEMPLATE by hand")


def chat_shape(tokenizer) -> ChatShape:
    """Per-role prefixes/suffixes of ``tokenizer``'s chat template, checked on a 5-message chat."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--ollama: the tokenizer has no chat template (got none). Train or export with a "
                        "chat template, or export without --ollama")
    chat = [{"role": r, "content": _MARK.format(role=r, i=i)}
            for i, r in enumerate(("system", "user", "assistant", "user", "assistant"))]
    wrap: dict[str, tuple[str, str]] = {}
    before = ""
    for i, message in enumerate(chat):
        text = _render(tokenizer, chat[: i + 1])
        if not text.startswith(before) or text[len(before):].count(message["content"]) != 1:
            raise _refuse(f"rendering message {i + 1} changes the text before it")
        prefix, suffix = text[len(before):].split(message["content"])
        if wrap.setdefault(message["role"], (prefix, suffix)) != (prefix, suffix):
            raise _refuse(f"the {message['role']} messages are wrapped differently at positions")
        before = text
    generation = _render(tokenizer, chat[:4], generation=True)[len(_render(tokenizer, chat[:4])):]
    bos = tokenizer.bos_token or ""
    writes_bos = bool(bos) and "bos_token" in tokenizer.chat_template and wrap["system"][0].startswith(bos)
    if writes_bos:  # the template's BOS comes first in any chat: llama.cpp adds it as a token instead
        wrap["system"] = (wrap["system"][0][len(bos):], wrap["system"][1])
    alone = _render(tokenizer, chat[1:2])
    user_text = wrap["user"][0] + chat[1]["content"] + wrap["user"][1]
    if not alone.endswith(user_text):
        raise _refuse("a chat without a system message is not the same user text")
    default_system = alone[: -len(user_text)]
    if writes_bos and default_system.startswith(bos):
        default_system = default_system[len(bos):]
    return ChatShape(wrap, generation, default_system, writes_bos)


def _go_text(text: str) -> str:
    """Literal text for a Go template: only ``{{`` would start an action, so it goes through a string action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(shape: ChatShape) -> str:
    """Ollama's TEMPLATE: the roles' texts around ``.Content`` and the generation prompt after the last message.

    No trim markers (``{{-``): every character outside the actions is the template's own text.
    """
    parts = []
    if shape.default_system:
        parts.append('{{ if or (eq (len .Messages) 0) (ne (index .Messages 0).Role "system") }}'
                     f"{_go_text(shape.default_system)}{{{{ end }}}}")
    parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    for n, role in enumerate(_ROLES):
        prefix, suffix = shape.wrap[role]
        keyword = "if" if n == 0 else "else if"
        parts.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_text(prefix)}{{{{ .Content }}}}{_go_text(suffix)}')
    parts.append("{{ end }}")
    parts.append(f'{{{{ if and $last (ne .Role "assistant") }}}}{_go_text(shape.generation)}{{{{ end }}}}{{{{ end }}}}')
    return "".join(parts)


def stop_tokens(tokenizer, shape: ChatShape, generation_config) -> list[str]:
    """End-of-sequence tokens (generation config, tokenizer) and the special token ending a turn."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    stops = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    stops += [t for t in specials if t in shape.wrap["assistant"][1]]
    return list(dict.fromkeys(s for s in stops if s))


def sampling_parameters(generation_config) -> dict[str, float | int]:
    """Ollama PARAMETERs from ``generation_config`` (greedy -> temperature 0)."""
    if generation_config is None:
        return {}
    g = generation_config
    params: dict[str, float | int] = {}
    if g.do_sample is False and any(getattr(g, k, None) is not None for k in ("temperature", "top_p")):
        params["temperature"] = 0
    elif g.do_sample:
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if getattr(g, theirs, None) is not None:
                params[ours] = getattr(g, theirs)
    if getattr(g, "repetition_penalty", None) not in (None, 1.0):
        params["repeat_penalty"] = g.repetition_penalty
    if getattr(g, "max_new_tokens", None):
        params["num_predict"] = g.max_new_tokens
    return params


def modelfile(gguf_name: str, tokenizer, generation_config) -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE, stop tokens, sampling defaults."""
    shape = chat_shape(tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(shape)}"""']
    if '"""' in lines[-1][len('TEMPLATE """'):-3]:
        raise UserError('--ollama: the chat template contains """ (got it in a role\'s text). Write the Modelfile by hand')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop_tokens(tokenizer, shape, generation_config)]
    lines += [f"PARAMETER {k} {v}" for k, v in sampling_parameters(generation_config).items()]
    return "\n".join(lines) + "\n"
