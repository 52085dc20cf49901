"""``tunelab export RUN --lora-gguf``: a LoRA run as llama.cpp's GGUF adapter (``llama-cli -m BASE --lora ADAPTER``).

For users who keep one base GGUF and several adapters. Our own writer for the same reason as
:mod:`tunelab.ship.to_gguf` (llama.cpp's ``convert_lora_to_gguf.py`` is a script, not a library);
it follows that script's layout: ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, and for each adapted matrix ``<gguf name>.lora_a`` (PEFT's ``lora_A``,
``[r, in]``) and ``<gguf name>.lora_b`` (``lora_B``, ``[out, r]``, its rows in llama.cpp's rotary
order for a Llama-style q/k projection, as the base's rows are). llama.cpp scales ``B A`` by
``alpha / r``; rsLoRA's ``alpha / sqrt(r)`` is written as ``alpha * sqrt(r)``.

Written beside it: the base model as ``<name>-base-f16.gguf``. Checked like the other GGUF files
(:func:`tunelab.ship.llamacpp.check_greedy`): llama.cpp running the base file with the adapter
gives the merged model's greedy tokens and top-1 logits (F16 tolerance). DoRA, per-layer ranks or
alphas, and adapters that also train whole modules (``modules_to_save``, embeddings) have no
llama.cpp LoRA form and are refused in one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tunelab.errors import UserError
from tunelab.ship import llamacpp
from tunelab.ship.to_gguf import check_supported, permute_rows, write_gguf


def _lora_config(folder: Path) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    problems = [what for what, bad in (
        ("DoRA", config.get("use_dora")), ("per-layer ranks", config.get("rank_pattern")),
        ("per-layer alphas", config.get("alpha_pattern")), ("modules_to_save", config.get("modules_to_save")),
        ("a non-LoRA adapter", config.get("peft_type") != "LORA"),
    ) if bad]
    if problems:
        raise UserError(f"--lora-gguf: llama.cpp's LoRA adapters cannot express {', '.join(problems)} (got them in "
                        f"{folder / 'adapter_config.json'}). Export with --gguf (merged) instead")
    return config


def write_lora_gguf(folder: Path, base, path: Path, name: str) -> Path:
    """The PEFT LoRA adapter in ``folder`` (trained on ``base``, a transformers model) as a llama.cpp GGUF adapter."""
    import gguf
    from safetensors.torch import load_file

    family = check_supported(base)
    config = _lora_config(folder)
    cfg = base.config
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= math.sqrt(r)  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)
    arch = gguf.MODEL_ARCH[family.arch]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tensors = load_file(folder / "adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise UserError(f"--lora-gguf: the adapter holds {key!r}, not a LoRA matrix. Export with --gguf instead")
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        pairs.setdefault(module, {})["a" if ".lora_A." in key else "b"] = value.float()
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    for module, ab in sorted(pairs.items()):
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None or "token_embd" in gguf_name or gguf_name == "output.weight":
            raise UserError(f"--lora-gguf: no llama.cpp LoRA form for {module!r}. Export with --gguf instead")
        b = ab["b"]
        if family.permute_qk and module.endswith("q_proj"):
            b = permute_rows(b, n_head)
        elif family.permute_qk and module.endswith("k_proj"):
            b = permute_rows(b, n_kv)
        writer.add_tensor(gguf_name + ".lora_a", ab["a"].numpy())
        writer.add_tensor(gguf_name + ".lora_b", b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def write_lora_files(tmp: Path, loaded, info: dict, name: str, verify: bool) -> list:
    """Base F16 GGUF + adapter GGUF in ``tmp``, checked in llama.cpp against the merged model."""
    from tunelab.models.load import load_model
    from tunelab.ship.gguf_export import GGUFFile

    llamacpp.llama_cpp("--lora-gguf")
    _lora_config(loaded.folder)
    base = load_model(info["base_model"], dtype=torch.float32).eval()
    base_file = GGUFFile("f16", tmp / f"{name}-base-f16.gguf")
    lora_file = GGUFFile("lora", tmp / f"{name}-lora-f32.gguf")
    write_gguf(base, loaded.tokenizer, tmp, base_file.path, kind="f16", name=f"{name}-base")
    write_lora_gguf(loaded.folder, base, lora_file.path, name)
    if verify:
        merged = loaded.model.merge_and_unload().float().eval()
        reference = llamacpp.hf_reference(merged, loaded.tokenizer)
        with llamacpp.Runner(base_file.path, lora=lora_file.path) as runner:
            lora_file.figures.update(llamacpp.check_greedy(runner, reference, "f16", what="--lora-gguf"))
        lora_file.checked_by = "llama.cpp"
    for file in (base_file, lora_file):
        file.size = file.path.stat().st_size
    return [base_file, lora_file]
