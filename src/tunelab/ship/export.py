"""``tunelab export``: a run's weights as a folder other tools load directly.

Three shapes, all in the standard Hugging Face layout (safetensors, tokenizer with its chat
template, generation config) plus ``tunelab.json`` and a ``SHA256SUMS`` manifest
(``sha256sum -c SHA256SUMS`` checks it):

* **merged** (``--merge``): PEFT's ``merge_and_unload()`` folds the adapters into the base
  weights (computed in float32, then cast to ``--dtype``); plain ``transformers`` loads the
  folder with ``AutoModelForCausalLM`` (or ``...ForSequenceClassification``) and gets the same
  outputs as the adapter model;
* **adapters only** (the default for adapter runs): the PEFT adapter folder
  (``PeftModel.from_pretrained(base, folder)``) with the tokenizer;
* **full** runs and plain models are written as they are (cast to ``--dtype`` if asked).

``--gguf`` also writes GGUF files of the merged model, one per ``--quant`` type (default: the
export dtype's float type), and runs each in llama.cpp before reporting success
(:mod:`tunelab.ship.gguf_export`: the writer, the K-quants, the checks; a failed check leaves no
output).

Whether a method can be merged is the method module's business: ``MERGEABLE`` and, for those
that cannot, ``NOT_MERGEABLE`` (one line: why, and how to serve instead). The output folder is
built in a temporary sibling and renamed into place; an existing non-empty ``--out`` is never
written over without ``--force``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab import methods
from tunelab.errors import UserError
from tunelab.fsutil import atomic_folder, check_name, sha256_file
from tunelab.ship import llamacpp
from tunelab.ship.gguf_types import DEFAULT_FOR_DTYPE, needs_llama_cpp, parse_quants
from tunelab.ship.inference import base_model_folder, load_for_inference, read_info, weights_folder
from tunelab.ship.ollama import modelfile

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANIFEST = "SHA256SUMS"


@dataclass
class ExportResult:
    out: Path
    kind: str  # "merged", "adapter", "full" or "model"
    dtype: str | None
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gguf: Path | None = None  # the first GGUF file written
    ggufs: list = field(default_factory=list)  # every GGUF file: tunelab.ship.gguf_export.GGUFFile


def merge_policy(method: str) -> tuple[bool, str]:
    """(mergeable, reason-if-not) for a tunelab method name, read from its module."""

    module = methods.METHODS.get(method)
    if module is None:
        return True, ""  # unknown here (a newer run): PEFT decides when merging
    mergeable = bool(getattr(module, "MERGEABLE", False))
    reason = getattr(module, "NOT_MERGEABLE", None) or (
        f"method '{method}' cannot be folded into the base weights; serve the adapters on their base with "
        "`tunelab serve RUN`"
    )
    return mergeable, reason


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is a file (got a file). Choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: the folder exists and is not empty. Choose another folder, or pass --force "
                        "to replace it")


def export(target: str | Path, out: str | Path, *, merge: bool = False, dtype: str | None = None,
           gguf: bool = False, force: bool = False, checkpoint: str = "final", verify: bool = True,
           quant=None, ollama: bool = False, lora_gguf: bool = False) -> ExportResult:
    """Export a run (or a model) to ``out``; see the module docstring for the shapes.

    ``quant``: GGUF types (names, or comma-separated names, of :data:`tunelab.ship.gguf_types.QUANTS`);
    giving any implies ``gguf``. ``ollama``: also an Ollama ``Modelfile`` for the first GGUF type (implies ``gguf``).
    ``lora_gguf``: a LoRA run's adapters also as llama.cpp's GGUF adapter, with the base as F16 GGUF
    (:mod:`tunelab.ship.lora_gguf`).
    """
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype (got {dtype!r}). Use one of {', '.join(DTYPES)}")
    quants = parse_quants(quant)
    gguf = gguf or bool(quants) or ollama
    if any(needs_llama_cpp(q) for q in quants):
        llamacpp.llama_cpp(f"--quant {next(q for q in quants if needs_llama_cpp(q))}")  # before any work
    check_out(out, force)
    folder = weights_folder(target, checkpoint)
    info = read_info(folder) if folder is not None else {}
    is_adapter = folder is not None and (folder / "adapter_config.json").is_file()
    notes: list[str] = []

    if lora_gguf and (not is_adapter or gguf or merge):
        got = "--gguf/--merge/--quant too" if is_adapter else "a run without adapters"
        raise UserError(f"--lora-gguf: writes a LoRA run's adapters for llama.cpp (got {got}). Give it alone with "
                        "a LoRA run, or use --gguf for a merged model")
    if lora_gguf:
        llamacpp.llama_cpp("--lora-gguf")  # before any work
    if is_adapter:
        mergeable, reason = merge_policy(info["method"])
        if (merge or gguf) and not mergeable:
            raise UserError(f"--merge: {reason}")
        if gguf and not merge:
            merge = True
            notes.append("--gguf writes a merged model, so the adapters are merged (--merge implied)")
        if not merge:
            notes.append(f"adapters only (PEFT format); {'add --merge for a standalone model' if mergeable else reason}")
    elif merge:
        notes.append("these are full weights: there is nothing to merge, exported as they are")

    if is_adapter and not merge:
        result = ExportResult(out, "adapter", dtype, notes=notes)
        lora = (target, checkpoint, verify) if lora_gguf else None
        atomic_folder(out, lambda tmp: _fill_adapter(tmp, folder, info, dtype, result, lora))
    else:
        kind = "merged" if is_adapter else ("full" if folder is not None else "model")
        result = ExportResult(out, kind, dtype, notes=notes)
        ggufs = quants if gguf else []
        atomic_folder(out, lambda tmp: _fill_model(tmp, target, checkpoint, info, result, ggufs, gguf, verify,
                                                   ollama))
    for file in result.ggufs:
        file.path = out / file.path.name
    result.gguf = result.ggufs[0].path if result.ggufs else None
    return result


def _fill_adapter(tmp: Path, folder: Path, info: dict, dtype: str | None, result: ExportResult,
                  lora: tuple | None = None) -> None:
    """The PEFT adapter folder + tokenizer; adapter tensors cast to ``dtype`` if given; with ``lora``
    ((target, checkpoint, verify)), also the llama.cpp GGUF adapter and its base."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    for name in ("adapter_config.json", "README.md"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, tmp / name)
    for weights in folder.glob("adapter_model*.safetensors"):
        if dtype is None:
            shutil.copy2(weights, tmp / weights.name)
        else:
            tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in load_file(weights).items()}
            save_file(tensors, tmp / weights.name, metadata={"format": "pt"})
    if (folder / "adapter_model.bin").is_file():
        raise UserError(f"{folder}: the adapter is a pickle (adapter_model.bin). Re-save it as safetensors")
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    _copy_generation_config(info, tmp)
    _write_info(tmp, info, folder, merged=False, dtype=dtype)
    if lora is not None:
        from tunelab.ship.lora_gguf import write_lora_files

        target, checkpoint, verify = lora
        name = _gguf_name(info, target)
        result.ggufs = write_lora_files(tmp, load_for_inference(target, checkpoint=checkpoint), info, name, verify)
    result.files = _write_manifest(tmp)


def _copy_generation_config(info: dict, tmp: Path) -> None:
    """The base model's generation config beside the adapters (stop tokens, sampling defaults)."""
    src = Path(base_model_folder(info["base_model"])) / "generation_config.json"
    if src.is_file():
        shutil.copy2(src, tmp / "generation_config.json")


def _fill_model(tmp: Path, target, checkpoint: str, info: dict, result: ExportResult, quants: list[str],
                gguf: bool, verify: bool, ollama: bool = False) -> None:
    """Merged / full / plain model: ``save_pretrained`` (safetensors) + tokenizer (+ GGUF)."""
    loaded = load_for_inference(target, checkpoint=checkpoint, dtype=torch.float32)
    model = loaded.model
    if info.get("method") == "qlora":
        # QLoRA trains against the 4-bit base; the merged model is the unquantised base + B A (as
        # QLoRA's authors merge), never a re-quantised 4-bit tensor written out as float
        from peft import PeftModel

        from tunelab.models.load import load_model

        base = load_model(info["base_model"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, loaded.folder)
    if loaded.is_adapter:
        model = model.merge_and_unload()  # PEFT folds W + scale * B A into W (float32)
    dtype = result.dtype or _saved_dtype(model)
    result.dtype = dtype
    model = model.to(DTYPES[dtype]).eval()
    tok = loaded.tokenizer
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if getattr(gen, key, None) is None and getattr(tok, key, None) is not None:
                setattr(gen, key, getattr(tok, key))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if info:
        _write_info(tmp, info, loaded.folder, merged=loaded.is_adapter, dtype=dtype)
    if gguf:
        from tunelab.ship.gguf_export import write_ggufs
        from tunelab.ship.to_gguf import caveats

        name = _gguf_name(info, target)
        result.ggufs = write_ggufs(model, tok, tmp, name, quants or [DEFAULT_FOR_DTYPE[dtype]], verify)
        result.notes.extend(caveats(model))
        if ollama:
            others = "".join(f"# also here: {f.path.name} (change FROM to use it)\n" for f in result.ggufs[1:])
            text = modelfile(result.ggufs[0].path.name, tok, getattr(model, "generation_config", None))
            (tmp / "Modelfile").write_text(others + text)
            result.notes.append(f"Ollama: cd {result.out} && ollama create {name} -f Modelfile && ollama run {name}")
    result.files = _write_manifest(tmp)


def _gguf_name(info: dict, target) -> str:
    """The GGUF files' name stem: the run's name (a run named before run.name was checked may hold '/' or
    '..': then ``model``)."""
    name = info.get("run") or Path(str(target)).name
    try:
        check_name(name, "run")
    except UserError:
        return "model"
    return name


def _saved_dtype(model) -> str:
    """The dtype the base model was published in (its config), as fp32 / fp16 / bf16."""
    saved = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    name = str(saved).removeprefix("torch.") if saved is not None else "float32"
    return {"float16": "fp16", "bfloat16": "bf16"}.get(name, "fp32")


def _write_info(tmp: Path, info: dict, folder: Path | None, *, merged: bool, dtype: str | None) -> None:
    exported = {**info, "merged": merged, "exported_from": str(folder) if folder else None, "export_dtype": dtype}
    (tmp / "tunelab.json").write_text(json.dumps(exported, indent=2, default=str))



def _write_manifest(folder: Path) -> list[str]:
    """``SHA256SUMS`` over every file (``sha256sum -c`` format); returns the files it lists."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{sha256_file(folder / f)}  {f}" for f in files]
    (folder / MANIFEST).write_text("\n".join(lines) + "\n")
    return files


def verify_manifest(folder: str | Path) -> list[str]:
    """Files whose checksum differs from ``SHA256SUMS`` (or that are missing); empty when all match."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{folder}: no {MANIFEST} manifest (got none). Export with `tunelab export` to get one")
    bad = []
    for line in manifest.read_text().splitlines():
        digest, name = line.split("  ", 1)
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(name)
    return bad
