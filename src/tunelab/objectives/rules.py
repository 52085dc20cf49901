"""Config rules of the objectives section, kept apart so that reading a config never imports torch."""

from __future__ import annotations


def keep_problems(cfg) -> list[str]:
    """Config rules of ``objectives.l2sp / ewc / distill`` (called by the config's cross-field check)."""
    p: list[str] = []
    o = cfg.objectives
    if o.ewc is not None and o.ewc.online and not o.ewc.fisher:
        p.append("objectives.ewc.online needs the previous Fisher: set objectives.ewc.fisher to an earlier run's "
                 "fisher.safetensors")
    return p
