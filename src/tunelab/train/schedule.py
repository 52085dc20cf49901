"""Learning-rate schedules (linear warm-up, then linear / cosine decay to 0, constant, or slanted
triangular), layer-wise learning rates and gradual unfreezing."""

from __future__ import annotations

import math
import re


def warmup_steps(total_steps: int, steps: int | None, ratio: float | None) -> int:
    if steps is not None:
        return min(steps, total_steps)
    if ratio is not None:
        return math.ceil(ratio * total_steps)
    return 0


def lr_factor(step: int, *, total_steps: int, warmup: int, kind: str, stlr_cut_frac: float = 0.1,
              stlr_ratio: float = 32.0) -> float:
    """Multiplier of the peak LR for optimiser step ``step`` (0-based)."""
    if kind == "stlr":
        return stlr_factor(step, total_steps=total_steps, cut_frac=stlr_cut_frac, ratio=stlr_ratio)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- ULMFiT-style tools
# Slanted triangular LR, discriminative (layer-wise) learning rates and gradual unfreezing
# (Howard & Ruder 2018). Each is a pure function of the parameter names, the config and the
# step, so a resumed run makes exactly the same choices as one that never stopped.


def stlr_factor(step: int, *, total_steps: int, cut_frac: float, ratio: float) -> float:
    """Slanted triangular LR: a short linear rise to the peak over ``cut_frac`` of the steps,
    then a long linear decay; the lowest LR is ``1 / ratio`` of the peak (ULMFiT eq. 3)."""
    cut = max(1, math.floor(total_steps * cut_frac))
    if step < cut:
        p = step / cut
    else:
        p = 1.0 - (step - cut) / max(1, total_steps - cut)
    p = min(1.0, max(0.0, p))
    return (1.0 + p * (ratio - 1.0)) / ratio


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_positions)\.")


def layer_index(name: str, n_layers: int) -> int:
    """Depth of a parameter by name: ``-1`` for input embeddings, ``i`` for decoder layer ``i``,
    ``n_layers`` for everything above the layers (final norm, output head, virtual tokens)."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1))
    if _EMBEDDING.search(name):
        return -1
    return n_layers


def num_layers(model) -> int:
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    if not n:
        raise ValueError("the model's config has no num_hidden_layers: cannot group parameters by layer")
    return int(n)


def layer_lr_scale(layer: int, n_layers: int, decay: float | None) -> float:
    """Discriminative LR: the top (head, final norm) trains at the peak LR, each layer below at
    ``decay`` times the one above, the input embeddings at ``decay ** (n_layers + 1)``."""
    if decay is None:
        return 1.0
    return decay ** (n_layers - layer)


def param_groups(
    named_params, *, n_layers: int, lr: float, weight_decay: float, layer_decay: float | None,
    multiplier=None,
) -> list[dict]:
    """Optimiser parameter groups: one per (layer, LR multiplier, decayed or not).

    ``multiplier(name) -> float`` is the method's own LR factor (LoRA+: ``B`` matrices train at
    ``ratio`` times the LR). Biases and norm weights (1-D tensors) get no weight decay. Groups are
    ordered top layer first, so group 0 carries the peak LR the loop logs.
    """
    groups: dict[tuple[int, float, bool], list] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        layer = layer_index(name, n_layers) if layer_decay is not None else n_layers
        scale = layer_lr_scale(layer, n_layers, layer_decay) * (multiplier(name) if multiplier else 1.0)
        groups.setdefault((layer, scale, p.ndim >= 2), []).append(p)
    ordered = sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], not kv[0][2]))
    return [
        {"params": params, "lr": lr * scale, "weight_decay": weight_decay if decayed else 0.0, "layer": layer}
        for (layer, scale, decayed), params in ordered
    ]


class GradualUnfreezing:
    """Which layer groups train at a step: top-down, one more group every ``every`` units.

    Group 0 is the top: everything above the decoder layers (head, final norm, virtual tokens)
    plus the top ``group_size`` layers; group k adds the next ``group_size`` layers down; the
    input embeddings join once every layer trains. Only parameters the method made trainable
    are affected. The loop calls :meth:`drop_frozen_grads` between backward and the update:
    still-frozen parameters lose their gradient, so the optimiser (and weight decay, and the
    clipping norm) leave them untouched. Resume-exact: the state is a function of the step.
    """

    def __init__(self, named_params, *, n_layers: int, every: int, unit: str, group_size: int,
                 start_groups: int, steps_per_epoch: int):
        self.n_layers, self.group_size, self.start_groups = n_layers, group_size, start_groups
        self.every_steps = every * (steps_per_epoch if unit == "epoch" else 1)
        self.params = [(layer_index(n, n_layers), p) for n, p in named_params if p.requires_grad]

    def stage(self, step: int) -> int:
        """0 at the start; +1 every ``every`` epochs or steps."""
        return step // max(1, self.every_steps)

    def lowest_trained_layer(self, step: int) -> int:
        """Layers ``>=`` this index train at ``step`` (``-1``: the embeddings too)."""
        unfrozen = (self.start_groups + self.stage(step)) * self.group_size
        return max(-1, self.n_layers - unfrozen)

    def trained(self, layer: int, step: int) -> bool:
        return layer >= self.lowest_trained_layer(step)

    def drop_frozen_grads(self, step: int) -> None:
        lowest = self.lowest_trained_layer(step)
        if lowest < 0:
            return
        for layer, p in self.params:
            if layer < lowest:
                p.grad = None
