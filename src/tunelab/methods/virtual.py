"""Shared code of the virtual-token methods (``prefix``, ``prompt``, ``ptuning``), through PEFT.

These methods do not change any weight of the base model: they learn ``n`` virtual tokens that
every sample sees first, either as input embeddings (prompt tuning, P-tuning) or as extra keys
and values in every attention layer (prefix tuning). PEFT builds them (``get_prompt``);
:func:`hidden_states` feeds them to the decoder exactly the way
``PeftModelForCausalLM.forward`` does (the attention mask gains ``n`` ones in front; prompt
embeddings take positions ``0..n-1`` and shift the sample's; prefix keys and values sit in the
cache before position 0), but returns hidden states of the *real* tokens only, so
:class:`~tunelab.objectives.causal_lm.CausalLMLoss` keeps its labels-only chunked cross-entropy
and virtual tokens get no loss.

Not mergeable: there is no weight to fold a virtual token into. Such a run is served with its
adapter loaded onto the base (``tunelab chat RUN`` / ``tunelab serve RUN``): PEFT's ``generate``
prepends the virtual tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import UserError

if TYPE_CHECKING:
    import torch

MERGEABLE = False
NOT_MERGEABLE = (
    "virtual tokens live outside the weights, so there is nothing to merge: serve the run with its adapter "
    "loaded onto the base (tunelab serve RUN, tunelab chat RUN)"
)
VIRTUAL_TOKENS = True
FUSED_KERNELS = False  # the kernels assume no virtual tokens
CLASSIFICATION = False  # a class head's backbone would not see them


def wrap(model, peft_config):
    from peft import get_peft_model

    if getattr(model.config, "is_encoder_decoder", False):

        raise UserError("method: virtual-token methods here support decoder-only models. Use lora instead")
    return get_peft_model(model, peft_config)


def save(model, folder: Path) -> None:
    """A PEFT adapter folder (prefix tuning stores the projected keys/values, not the MLP)."""
    model.save_pretrained(folder, safe_serialization=True)


def is_virtual(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def hidden_states(model, decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None) -> torch.Tensor:
    """Last hidden states ``[batch, length, hidden]`` of the real tokens of ``input_ids``."""
    import torch
    from peft.utils import PeftType

    config = model.active_peft_config
    n = config.num_virtual_tokens
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
    if config.peft_type == PeftType.PREFIX_TUNING:
        past = model.get_prompt(batch, max_cache_len=length + n)
        positions = position_ids + n if position_ids is not None else None
        return decoder(input_ids=input_ids, attention_mask=mask, past_key_values=past, position_ids=positions,
                       use_cache=False).last_hidden_state
    embeds = model.word_embeddings(input_ids)
    prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
    out = decoder(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, use_cache=False)
    return out.last_hidden_state[:, n:]
