"""Training-time kernels of our own, switched on for the duration of training only.

* :mod:`~tunelab.kernels.attention`: segment-wise causal attention for packed rows on CPU;
* :mod:`~tunelab.kernels.decoder`: a whole Llama-style decoder layer (frozen base weights, LoRA or
  none) as one function with a hand-written backward, on CPU with packed rows;
* :mod:`~tunelab.kernels.lora`: a fused forward/backward for PEFT's LoRA linear layers (those
  outside fused decoder layers);
* :mod:`~tunelab.kernels.patching`: the instance ``forward``s they are installed as.

They replace instance ``forward``s of transformers and PEFT classes and rely on those classes'
internals, so they are version-gated: :data:`TESTED` lists the transformers and PEFT versions they
were tested with, and on any other version they stay off (:func:`version_notice` says why, in
one line) and training runs the stock code.

:func:`training_kernels` is the one switch: ``fine_tune`` (and the advisor's timed probe) runs the
loop inside it, and it puts the stock transformers / PEFT code back when the block is left (also
on an exception). Inside, :meth:`TrainingKernels.stock` gives the stock code to what must run it
(checkpoint saving, evaluation by generation). Building, the final save and evaluation after
training run outside it. The parameters and saved formats are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata

from packaging.version import InvalidVersion, Version
from torch import nn

from tunelab.kernels import attention as att
from tunelab.kernels import decoder
from tunelab.kernels import lora as fused_lora
from tunelab.kernels.patching import install_forward, remove_forward

__all__ = ["TESTED", "TrainingKernels", "install_forward", "remove_forward", "restore_stock", "training_kernels",
           "version_notice"]

# The versions the kernels were tested with (tests/test_kernels.py, tests/test_decoder_kernel.py):
# package -> ranges (lowest tested, first version not tested), patch releases of a tested minor
# included. Add a range only after those tests pass on the new version; pyproject.toml allows
# more, and on those the kernels stay off.
TESTED: dict[str, list[tuple[str, str]]] = {
    "transformers": [("5.23.0", "5.24"), ("5.25.0", "5.26")],
    "peft": [("0.21.2", "0.22")],
}


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def version_notice() -> str | None:
    """None when the installed transformers and PEFT are within :data:`TESTED`; else the one-line
    notice that the kernels stay off, naming the untested versions."""
    untested = []
    for package, ranges in TESTED.items():
        found = _installed(package)
        try:
            ok = found is not None and any(Version(low) <= Version(found) < Version(high) for low, high in ranges)
        except InvalidVersion:
            ok = False
        if not ok:
            tested = " or ".join(f">={low},<{high}" for low, high in ranges)
            untested.append(f"{package} {found or 'not installed'} (tested: {tested})")
    if not untested:
        return None
    return (f"training kernels off: untested {', '.join(untested)}; training runs the stock "
            "transformers / PEFT code")


def _switch_on(model: nn.Module) -> list[str]:
    used = []
    if att.use_packed_attention(model):
        used.append("segment-wise causal attention")
        n = decoder.use_fused_layers(model)
        if n:
            used.append(f"fused decoder layer ({n} layers)")
    n = fused_lora.use_fused_lora(model)
    if n:
        used.append(f"fused LoRA linear ({n} layers)")
    return used


def restore_stock(model: nn.Module) -> bool:
    """The stock transformers attention and PEFT forward again; returns whether any of ours was on."""
    attention_was_on = att.restore_sdpa(model)
    layers_were_on = decoder.restore(model)
    lora_was_on = fused_lora.restore(model)
    return attention_was_on or layers_were_on or lora_was_on


@dataclass
class TrainingKernels:
    """What :func:`training_kernels` switched on for its ``with`` block."""

    model: nn.Module
    active: list[str] = field(default_factory=list)  # e.g. "segment-wise causal attention"; empty: stock code
    notice: str | None = None  # why they stayed off on this transformers / PEFT, if they did
    inside: bool = False  # within the ``with`` block; after it, :meth:`stock` has nothing to switch

    def __bool__(self) -> bool:
        return bool(self.active)

    @contextmanager
    def stock(self) -> Iterator[None]:
        """The stock transformers / PEFT code for the block (saving, generation), ours again after it."""
        if not (self.active and self.inside):
            yield
            return
        restore_stock(self.model)
        try:
            yield
        finally:
            _switch_on(self.model)


@contextmanager
def training_kernels(model: nn.Module, enabled: bool = True, *,
                     notify: Callable[[str], object] | None = None) -> Iterator[TrainingKernels]:
    """Our training kernels on ``model`` for the ``with`` block, the stock code again after it (also
    when the block raises).

    ``enabled``: the caller's decision (``train.fused_kernels`` and whether the task fits, see
    ``tunelab.train.build.kernels_apply``); false gives the stock code with no notice. On untested
    transformers / PEFT versions they stay off: the notice is in ``.notice`` and, when given, sent to
    ``notify`` (e.g. ``console.print``). Yields a :class:`TrainingKernels` (falsy when nothing is on).
    """
    state = TrainingKernels(model, inside=True)
    if enabled:
        state.notice = version_notice()
        if state.notice is None:
            state.active = _switch_on(model)
        elif notify is not None:
            notify(state.notice)
    try:
        yield state
    finally:
        state.inside = False
        if state.active:
            restore_stock(model)
