"""Peak memory and speed of tunelab's LoRA training step vs sequence length and model size.

Each configuration runs in its own subprocess (so its peak RSS is its own): a random-initialised
Llama of the given shape (SmolLM2's tokenizer size), LoRA r=16 on every linear layer, tunelab's
training path (``CausalLMLoss``: labels-only chunked cross-entropy; bf16 autocast with bf16
frozen base weights where the CPU supports it; the training kernels of ``tunelab.kernels``:
fused decoder layers, segment-wise attention; glibc keeping freed memory), one packed row of ``seq`` tokens per step,
AdamW, 3 steps. Reported: peak RSS (``VmHWM``), seconds per step (best of the last two) and
tokens/s. Shapes: ``135m`` = SmolLM2-135M, ``360m`` = SmolLM2-360M, ``1b`` = Llama-3.2-1B's
layers with a 49k vocabulary.

    python benchmarks/bench_memory.py                 # the default matrix, a Markdown table
    python benchmarks/bench_memory.py --only 135m:512 --checkpointing
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
}
DEFAULT_MATRIX = ["135m:256", "135m:512", "135m:1024", "135m:2048", "360m:512", "1b:512"]


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(shape: str, seq: int, checkpointing: bool, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.kernels import training_kernels
    from tunelab.methods import lora
    from tunelab.objectives.causal_lm import CausalLMLoss
    from tunelab.train.cpu_tuning import keep_freed_memory
    from tunelab.train.precision import cpu_supports_bf16

    bf16 = cpu_supports_bf16()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                         **SHAPES[shape])
    # built directly in the training dtype: an fp32 build of the 1B shape alone would peak at 4.3 GB
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32)
    model = lora.apply(model, lora.Config(r=16, alpha=32))
    keep_freed_memory()
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_model = CausalLMLoss(model)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(5, 49152, (1, seq))
    labels = ids.clone()
    labels[:, : seq // 3] = -100  # a third of the row is prompt
    segment = min(seq, 256)  # samples of 256 tokens packed into the row
    pos = torch.arange(seq).remainder(segment)[None]
    times = []
    with training_kernels(model) as kernels:
        for _ in range(steps):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = loss_model(input_ids=ids, labels=labels, position_ids=pos)
                loss, n = out.total, out.count
            (loss / n).backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    best = min(times[1:]) if len(times) > 1 else times[0]
    return {"shape": shape, "params": params, "seq": seq, "checkpointing": checkpointing, "bf16": bf16,
            "peak_rss_mib": round(_peak_rss_mib(), 1), "s_per_step": round(best, 3),
            "tokens_per_s": round(seq / best, 1), "kernels": kernels.active}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="SHAPE:SEQ items, e.g. 135m:512")
    ap.add_argument("--checkpointing", action="store_true", help="also run each item with gradient checkpointing")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        shape, seq, ckpt = args.worker.split(":")
        print(json.dumps(worker(shape, int(seq), ckpt == "1", args.steps)))
        return
    items = args.only or DEFAULT_MATRIX
    rows = []
    for item in items:
        for ckpt in ([False, True] if args.checkpointing else [False]):
            cmd = [sys.executable, __file__, "--worker", f"{item}:{int(ckpt)}", "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{item} checkpointing={ckpt}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| model | params | seq | grad. checkpointing | peak RSS (MiB) | s/step | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {r['params'] / 1e6:.0f}M | {r['seq']} | {'yes' if r['checkpointing'] else 'no'} | "
              f"{r['peak_rss_mib']:,.0f} | {r['s_per_step']:.2f} | {r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
