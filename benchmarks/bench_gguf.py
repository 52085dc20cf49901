"""GGUF quant types of one run in llama.cpp: file size, tokens/s and perplexity against F16.

``tunelab export RUN --quant f16,bf16,q8_0,...`` writes and checks every type (greedy tokens for
F16, the held-out perplexity bound for the others); then, for each file, in llama.cpp
(``llama-cpp-python``, the ``[gguf]`` extra):

* prompt tokens/s: one ``eval`` of a 256-token prompt (logits of the last position only);
* generation tokens/s: 128 greedy tokens one at a time after a 32-token prompt;
* perplexity on held-out text: the first ``--ppl-tokens`` tokens of
  ``../shared/data/instruct/llamafactory_demo/wiki_demo.txt`` (not demo data) in windows of 512
  tokens, every token but each window's first scored, and the same for the exported Hugging Face
  model (float32) as the reference the F16 file should equal.

Usage::

    python benchmarks/bench_gguf.py demo_run/runs/policy --threads 2
    python benchmarks/bench_gguf.py smollm2-135m-instruct        # the base model
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "instruct" / "llamafactory_demo" / "wiki_demo.txt"
KINDS = "f16,bf16,q8_0,q6_k,q5_k_m,q5_1,q5_0,q4_k_m,q4_1,q4_0"


def windows(tokens: list[int], size: int = 512) -> list[list[int]]:
    return [tokens[i:i + size] for i in range(0, len(tokens) - 1, size) if len(tokens[i:i + size]) > 1]


def nll_sum(logits: np.ndarray, tokens: list[int]) -> float:
    x = logits[:-1].astype(np.float64)
    top = x.max(axis=1)
    log_z = np.log(np.exp(x - top[:, None]).sum(axis=1)) + top
    return float((log_z - x[np.arange(len(tokens) - 1), tokens[1:]]).sum())


def llama_figures(path: Path, text_tokens: list[int], threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, n_threads=threads,
                verbose=False)
    total, count = 0.0, 0
    for window in windows(text_tokens):
        llm.reset()
        llm.eval(window)
        total += nll_sum(np.array(llm.scores[:len(window)]), window)
        count += len(window) - 1
    # generation: 32-token prompt, then 128 greedy tokens one eval each
    llm.reset()
    llm.eval(text_tokens[:32])
    start = time.perf_counter()
    for _ in range(128):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    gen = 128 / (time.perf_counter() - start)
    llm.close()
    fast = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads, verbose=False)
    fast.eval(text_tokens[:8])  # warm-up
    fast.reset()
    start = time.perf_counter()
    fast.eval(text_tokens[:256])
    prompt = 256 / (time.perf_counter() - start)
    fast.close()
    return {"ppl": float(np.exp(total / count)), "gen_tps": gen, "prompt_tps": prompt, "tokens": count}


def best_speed(path: Path, text_tokens: list[int], threads: int, repeats: int) -> tuple[float, float]:
    """(prompt, generation) tokens/s, the best of ``repeats`` runs (other work on the machine only slows a run)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads, verbose=False)
    prompt = gen = 0.0
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(text_tokens[:256])
        prompt = max(prompt, 256 / (time.perf_counter() - start))
        start, count = None, 0
        for _ in llm.generate(text_tokens[:32], temp=0.0):  # greedy; the first token comes after the prompt
            if start is None:
                start = time.perf_counter()
                continue
            count += 1
            if count == 64:
                break
        gen = max(gen, 64 / (time.perf_counter() - start))
    llm.close()
    return prompt, gen


def speed_table(folder: Path, threads: int, repeats: int) -> None:
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(folder)(WIKI.read_text(encoding="utf-8")[:20000],
                                                   add_special_tokens=False)["input_ids"]
    print(f"| type | prompt tokens/s | generation tokens/s |  (best of {repeats}, {threads} threads)")
    print("| --- | ---: | ---: |")
    for path in sorted(folder.glob("*.gguf"), key=lambda p: p.stat().st_size, reverse=True):
        prompt, gen = best_speed(path, tokens, threads, repeats)
        print(f"| {path.stem.rsplit('-', 1)[-1]} | {prompt:.0f} | {gen:.1f} |", flush=True)


def hf_ppl(folder: Path, text_tokens: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows(text_tokens):
            total += nll_sum(model(input_ids=torch.tensor([window])).logits[0].numpy(), window)
            count += len(window) - 1
    return float(np.exp(total / count))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a run directory or a model")
    parser.add_argument("--quant", default=KINDS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--out", help="keep the export here (default: a temporary folder)")
    parser.add_argument("--json", help="write the figures as JSON here")
    parser.add_argument("--no-verify", action="store_true", help="export without the checks (to see every figure)")
    parser.add_argument("--speed-only", metavar="DIR", help="only the tokens/s of the GGUF files already in DIR")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.speed_only:
        speed_table(Path(args.speed_only), args.threads, args.repeats)
        return 0

    from bench_micro_threads import matmul_gflops  # benchmarks/, beside this script

    from tunelab.ship import llamacpp
    from tunelab.ship.export import export

    host_before = matmul_gflops(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-gguf-")) / "export"
    start = time.perf_counter()
    result = export(args.target, out, quant=args.quant, dtype="fp32", verify=not args.no_verify)
    export_s = time.perf_counter() - start
    from transformers import AutoTokenizer

    text = WIKI.read_text(encoding="utf-8")
    tokens = AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"][:args.ppl_tokens]
    reference = hf_ppl(out, tokens)
    held = AutoTokenizer.from_pretrained(out)(llamacpp.HELD_OUT, add_special_tokens=False)["input_ids"]
    rows = []
    for file in result.ggufs:
        fig = llama_figures(file.path, tokens, args.threads)
        with llamacpp.Runner(file.path) as runner:  # the export check's own held-out text
            fig["held_out_ppl"] = llamacpp.perplexity(runner.logits(held), held)
        rows.append({"kind": file.kind, "size_mib": file.size / 2**20, **fig, "export_check": file.figures})
    f16 = next(r["ppl"] for r in rows if r["kind"] == "f16")
    f16_held = next(r["held_out_ppl"] for r in rows if r["kind"] == "f16")
    host_after = matmul_gflops(args.threads)
    print(f"host GFLOP/s ({args.threads} threads) bf16 {host_before['bf16']} / fp32 {host_before['fp32']} before, "
          f"bf16 {host_after['bf16']} / fp32 {host_after['fp32']} after")
    print(f"export of {len(rows)} types with their checks: {export_s:.0f} s; HF float32 perplexity {reference:.3f} "
          f"on {rows[0]['tokens']} tokens of wiki_demo.txt")
    print("| type | size (MiB) | prompt tokens/s | generation tokens/s | perplexity (wiki) | vs F16 | "
          "held-out perplexity (export check) | vs F16 | export check |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        check = r["export_check"]
        said = ("not run (--no-verify)" if not check else f"{check['greedy_tokens']} greedy tokens identical"
                if "greedy_tokens" in check else f"passed (bound {check['bound']:.0%})")
        print(f"| {r['kind']} | {r['size_mib']:.1f} | {r['prompt_tps']:.0f} | {r['gen_tps']:.1f} | {r['ppl']:.3f} | "
              f"{r['ppl'] / f16 - 1:+.2%} | {r['held_out_ppl']:.3f} | {r['held_out_ppl'] / f16_held - 1:+.2%} | {said} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"hf_ppl": reference, "export_s": export_s, "rows": rows,
                                               "host_gflops": {"before": host_before, "after": host_after}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
