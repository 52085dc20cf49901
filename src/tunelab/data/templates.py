"""Named chat templates and choosing one for a tokenizer.

The templates are Jinja files shipped as package data in ``tunelab/templates/`` and read
with :mod:`importlib.resources`; transformers renders them
(``tokenizer.apply_chat_template``), so a named template behaves exactly like one that came
with a model. All of them keep the *prefix property* that label masking relies on: rendering
the first ``i`` messages (with the generation prompt) is a prefix of rendering them all.

* ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` turns (Qwen, SmolLM, ...);
* ``llama3``: Llama 3 header turns ending in ``<|eot_id|>``;
* ``alpaca``: ``### Instruction:`` / ``### Response:`` blocks for base models with no chat
  template; each response ends with the tokenizer's eos token.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

#: The name :func:`set_chat_template` returns when it keeps the tokenizer's own template.
TOKENIZER_TEMPLATE = "tokenizer"
_ATTR = "tunelab_template"  # set on the tokenizer so later error messages can name the template


def template_names() -> list[str]:
    """The named templates shipped with tunelab, sorted."""
    folder = resources.files("tunelab").joinpath("templates")
    return sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))


def load_template(name: str) -> str:
    """The Jinja source of a named template, or of a ``.jinja`` file given by path."""
    if name.endswith(".jinja"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"data.template: template file not found (got {name!r}). Check the path.")
        return path.read_text(encoding="utf-8")
    if name not in template_names():
        raise UserError(
            f"data.template: unknown chat template (got {name!r}). "
            f"Use auto, one of {', '.join(template_names())}, or a path to a .jinja file."
        )
    return resources.files("tunelab").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


def set_chat_template(tokenizer: Any, name: str | None) -> str:
    """Give ``tokenizer`` the chat template to train with and return the name used.

    ``None``/``"auto"`` keeps the tokenizer's own template (returns ``"tokenizer"``) or,
    when it has none (a base model), sets ``chatml``. Any other name sets that template
    (see :func:`template_names`; a path ending in ``.jinja`` also works).
    """
    if name in (None, "auto"):
        if getattr(tokenizer, "chat_template", None):
            used = TOKENIZER_TEMPLATE
            setattr(tokenizer, _ATTR, used)
            return used
        name = "chatml"
    tokenizer.chat_template = load_template(name)
    setattr(tokenizer, _ATTR, name)
    return name


def describe_template(tokenizer: Any) -> str:
    """How to name the tokenizer's current template in a message."""
    name = getattr(tokenizer, _ATTR, TOKENIZER_TEMPLATE)
    if name == TOKENIZER_TEMPLATE:
        return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"
    return f"chat template {name!r}"
