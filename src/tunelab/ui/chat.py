"""The Chat tab's model: one run loaded at a time, streamed replies, the base model by switching the
adapters off (:func:`tunelab.ship.inference.base_only`, as ``tunelab chat --compare-base`` does).

Streaming is transformers' ``TextIteratorStreamer`` fed by :func:`tunelab.ship.inference.generate_reply`
in a worker thread. One lock: a single model in memory serves one reply at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}  # {"path": str, "loaded": Loaded}: the one model in memory


def loaded_model(run: Path):
    """The run's model, loaded once (another run replaces it)."""
    from tunelab.ship.inference import load_for_inference

    if _LOADED.get("path") != str(run):
        _LOADED.clear()
        _LOADED.update(path=str(run), loaded=load_for_inference(run))
    return _LOADED["loaded"]


def stream_reply(run: Path, messages: list[dict], *, base: bool = False, max_new_tokens: int = 128,
                 temperature: float = 0.0) -> Iterator[str]:
    """The reply so far, after each new piece of text; ``base``: the run's base model (adapters off)."""
    from transformers import TextIteratorStreamer

    from tunelab.ship.inference import base_only, generate_reply

    with _LOCK:
        loaded = loaded_model(run)
        context = base_only(loaded) if base else None  # refuses a run without adapters, in one line
        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        errors: list[BaseException] = []

        def work():
            try:
                if context is not None:
                    with context:
                        generate_reply(loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                       streamer=streamer)
                else:
                    generate_reply(loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                   streamer=streamer)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        thread.join()
        if errors:
            raise errors[0]
        yield text.strip()
