"""``tunelab export --gguf --quant ...``: write each GGUF type asked for, then prove each one runs.

The order of work, inside the export's temporary folder (a failed check raises, and the export's
``atomic_folder`` deletes everything written so far: nothing partial is left at ``--out``):

1. the F16 file, always (the K-quants are made from it by llama.cpp, and it is the perplexity
   reference of the lossy types); removed at the end when ``f16`` was not asked for;
2. every other type: the NumPy types by :func:`tunelab.ship.to_gguf.write_gguf`, the K-quants by
   :func:`tunelab.ship.llamacpp.quantize`;
3. the checks, with llama.cpp when ``llama-cpp-python`` is installed (:mod:`tunelab.ship.llamacpp`):
   F32/F16 greedy tokens and top-1 logits against the Hugging Face model; every lossy type's
   held-out perplexity within its bound (:data:`tunelab.ship.gguf_types.QUANTS`) of the F16
   file's. Without it (the NumPy types only), each file is read back by transformers' GGUF loader
   and the same checks run on its logits, and the result says llama.cpp was not run; models whose
   file that reader would misread (Gemma's soft-caps and query scale other than 2B/9B's, Gemma 3's
   RoPE scaling, Phi-3's LongRoPE) are refused before any writing, naming the extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import UserError
from tunelab.ship import llamacpp
from tunelab.ship.gguf_types import QUANTS, needs_llama_cpp
from tunelab.ship.to_gguf import check_supported, transformers_misreads, write_gguf


@dataclass
class GGUFFile:
    kind: str
    path: Path
    size: int = 0
    checked_by: str | None = None  # "llama.cpp", "transformers" or None (--no-verify)
    figures: dict = field(default_factory=dict)


def write_ggufs(model, tokenizer, folder: Path, name: str, kinds: list[str], verify: bool) -> list[GGUFFile]:
    """Write ``kinds`` as ``folder/{name}-{kind}.gguf`` and check them; see the module docstring."""
    check_supported(model)
    k_quants = [k for k in kinds if needs_llama_cpp(k)]
    if k_quants:
        llamacpp.llama_cpp(f"--quant {k_quants[0]}")  # the one-line error before any writing
    use_llama = verify and (bool(k_quants) or llamacpp.available())
    if verify and not use_llama and (lost := transformers_misreads(model)):
        raise UserError(f"--gguf: without llama.cpp the files are checked by transformers' GGUF reader, which would "
                        f"lose {', '.join(lost)} of this {model.config.model_type} model. Check them in llama.cpp: "
                        "pip install 'tunelab[gguf]', or pass --no-verify")
    files = {k: GGUFFile(k, folder / f"{name}-{k}.gguf") for k in kinds}
    f16 = files["f16"].path if "f16" in files else folder / f".{name}-f16.reference.gguf"
    need_f16 = "f16" in kinds or k_quants or (verify and any(QUANTS[k].ppl_bound for k in kinds))
    if need_f16:
        write_gguf(model, tokenizer, folder, f16, kind="f16", name=name)
    for kind, file in files.items():
        if kind == "f16":
            continue
        if needs_llama_cpp(kind):
            llamacpp.quantize(f16, file.path, kind)
        else:
            write_gguf(model, tokenizer, folder, file.path, kind=kind, name=name)
    if verify:
        reference = llamacpp.hf_reference(model, tokenizer)
        check = _check_in_llama_cpp if use_llama else _check_in_transformers
        check(list(files.values()), f16 if need_f16 else None, reference)
    if need_f16 and "f16" not in files:
        f16.unlink()
    for file in files.values():
        file.size = file.path.stat().st_size
    return list(files.values())


def _check_ppl(file: GGUFFile, ppl: float, f16_ppl: float) -> None:
    bound = QUANTS[file.kind].ppl_bound
    rise = ppl / f16_ppl - 1
    file.figures.update(perplexity=ppl, f16_perplexity=f16_ppl, perplexity_rise=rise, bound=bound)
    if rise > bound:
        raise UserError(f"--quant {file.kind}: perplexity check failed: {ppl:.3f} on the held-out text is "
                        f"{rise:+.1%} over F16's {f16_ppl:.3f} (bound {bound:.0%}). Choose a type with more bits")


def _check_in_llama_cpp(files: list[GGUFFile], f16: Path | None, ref: llamacpp.Reference) -> None:
    f16_ppl = None
    if f16 is not None:
        with llamacpp.Runner(f16) as runner:
            f16_ppl = llamacpp.held_out_perplexity(runner, ref)
    for file in files:
        with llamacpp.Runner(file.path) as runner:
            if QUANTS[file.kind].ppl_bound is None:
                file.figures.update(llamacpp.check_greedy(runner, ref, file.kind))
                file.figures["perplexity"] = llamacpp.held_out_perplexity(runner, ref)
            else:
                _check_ppl(file, llamacpp.held_out_perplexity(runner, ref), f16_ppl)
        file.figures["hf_perplexity"] = ref.held_out_ppl
        file.checked_by = "llama.cpp"


def _check_in_transformers(files: list[GGUFFile], f16: Path | None, ref: llamacpp.Reference) -> None:
    """No llama.cpp here: the same checks on the logits of the file read back (dequantised) by transformers."""
    import torch

    def held_ppl(model) -> float:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ref.held_out])).logits[0].numpy()
        return llamacpp.perplexity(logits, ref.held_out)

    f16_ppl = held_ppl(_read_back(f16)) if f16 is not None else None
    for file in files:
        back = _read_back(file.path)
        if QUANTS[file.kind].ppl_bound is None:
            file.figures.update(llamacpp.check_greedy(_TransformersRunner(back, ref), ref, file.kind))
            file.figures["perplexity"] = held_ppl(back)
        else:
            _check_ppl(file, held_ppl(back), f16_ppl)
        file.figures["hf_perplexity"] = ref.held_out_ppl
        file.checked_by = "transformers"


def _read_back(path: Path):
    from tunelab.ship.to_gguf import load_gguf_back

    try:
        return load_gguf_back(path)
    except (RuntimeError, ValueError, KeyError) as err:  # transformers' GGUF reader lacks some fields (Qwen3 head_dim)
        raise UserError(f"--gguf: transformers' GGUF reader cannot check {path.name} ({str(err).splitlines()[0][:80]}). "
                        "Check it in llama.cpp: pip install 'tunelab[gguf]', or pass --no-verify") from None


class _TransformersRunner:
    """The :class:`tunelab.ship.llamacpp.Runner` interface over a model read back by transformers."""

    def __init__(self, model, ref: llamacpp.Reference):
        self.model = model
        self.encoded = dict(zip(ref.texts, ref.prompts, strict=True))  # the tokenizer is the one written, not re-read

    def tokenize(self, text: str) -> list[int]:
        return self.encoded[text]

    def logits(self, tokens: list[int]):
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([tokens])).logits[0].numpy()
