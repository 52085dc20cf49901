"""Data workbench at scale: rows/s and peak RSS of inspect, clean (+ exact and near dedup) and split.

Generates a JSON Lines classification file with our own code (review-like English / Chinese
rows with log-normal lengths, imbalanced labels, 5% exact and 5% near duplicates: see
``generate``), then runs each step in a fresh process (so each peak RSS is its own) and prints
one line per step (``rss_after_imports_mb`` is the process before the step's work). Usage:

    python benchmarks/bench_data.py --rows 1000000 --data /tmp/bench1m.jsonl --steps inspect
    python benchmarks/bench_data.py --data /tmp/bench1m.jsonl --steps clean   # reuses the file
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("data model train loss token batch learn rate layer weight vector sample label split clean "
         "review hotel room service price quality staff clean noisy value").split()
HAN = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"


FUNCTION = ("the a an and or of to in is are was be it that this for with on as you i not by at from but "
            "we they my your very so too").split()  # English function words: about a third of the words
SENT_END = [".", ".", ".", "!", "?"]
NOISE = ["&amp; ", "<br>", "  ", "\u200b", "<b>", "</b>"]


def _english(rng: random.Random, vocab: list[str]) -> str:
    # review-like: 1-8 sentences of 4-18 words (log-normal total), some HTML remnants and odd spaces
    words = max(3, min(300, int(rng.lognormvariate(2.6, 0.6))))
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(4, 18))
        sent = " ".join(rng.choice(FUNCTION) if rng.random() < 0.35 else rng.choice(vocab) for _ in range(n))
        out.append(sent[0].upper() + sent[1:] + rng.choice(SENT_END))
        left -= n
    text = " ".join(out)
    if rng.random() < 0.05:
        text = rng.choice(NOISE) + text + rng.choice(NOISE)
    if rng.random() < 0.01:
        text += f" Contact me at user{rng.randint(1, 10**6)}@example.com or 138{rng.randint(10**7, 10**8 - 1)}."
    return text


def _chinese(rng: random.Random) -> str:
    chars = max(6, min(400, int(rng.lognormvariate(3.4, 0.6))))
    out, left = [], chars
    while left > 0:
        n = min(left, rng.randint(6, 24))
        out.append("".join(rng.choice(HAN) for _ in range(n)) + rng.choice("。。！？，"))
        left -= n
    return "".join(out)


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Review-like classification rows: 55% English-like (log-normal 3-300 words, a third of them
    English function words, the rest domain words and made-up words; sentences, some HTML
    remnants and PII), 45% Chinese (log-normal 6-400 characters); 5 imbalanced labels
    (40/25/20/10/5%); 5% exact and 5% near duplicates (a suffix or one word changed) of rows
    from anywhere earlier in the file."""
    rng = random.Random(seed)
    vocab = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                     for _ in range(30000)]
    labels = ["positive", "negative", "neutral", "question", "spam"]
    weights = [40, 25, 20, 10, 5]
    pool: list[dict] = []  # a reservoir of earlier rows to duplicate
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            r = rng.random()
            if pool and r < 0.05:
                row = dict(rng.choice(pool))  # exact duplicate
            elif pool and r < 0.10:
                src = rng.choice(pool)
                text = src["text"]
                if rng.random() < 0.5:
                    text += rng.choice([" !", "（图）", " (repost)", " thanks", "。转发"])
                else:
                    words = text.split(" ")
                    words[rng.randrange(len(words))] = rng.choice(vocab)
                    text = " ".join(words)
                row = {**src, "text": text}  # near duplicate
            else:
                text = _english(rng, vocab) if rng.random() < 0.55 else _chinese(rng)
                row = {"id": f"r{i}", "text": text, "label": rng.choices(labels, weights)[0]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            if len(pool) < 5000:
                pool.append(row)
            elif rng.random() < 0.05:
                pool[rng.randrange(5000)] = row


STEP = r"""
import json, resource, sys, time
from pathlib import Path
step, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
t = time.perf_counter()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if step == "inspect":
    from tunelab.data.inspect import inspect_file
    tok = None
    if len(sys.argv) > 4:
        from tunelab.models.load import load_tokenizer
        tok = load_tokenizer("smollm2-135m-instruct")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = inspect_file(src, tokenizer=tok)
    info = {"exact": r["exact_duplicates"], "near": r["near_duplicates"]}
elif step == "clean":
    from tunelab.data.clean import clean_file
    from tunelab.data.settings import CleanSettings, ConflictSettings
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = clean_file(src, out / "clean.jsonl", CleanSettings(conflicts=ConflictSettings(policy="flag", near=False)))
    info = {"written": r.rows_written, "removed": r.removed_by_reason}
elif step == "near":  # the near-duplicate index alone: MinHash + LSH over the normalised texts
    from tunelab.data.dedup import NearDupIndex, dedup_key
    from tunelab.data.formats import open_source
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with NearDupIndex(threshold=0.85) as index:
        batch = []
        for item in open_source(src).items():
            batch.append(dedup_key(item.record.messages[0].content))
            if len(batch) == 4096:
                index.add(batch)
                batch = []
        index.add(batch)
        disk = sum(f.stat().st_size for f in Path(index._dir.name).iterdir())
        added = time.perf_counter() - t
        root, _ = index.clusters()
    info = {"near_or_exact": int((root != range(len(root))).sum()), "index_disk_mb": round(disk / 2**20, 1),
            "add_seconds": round(added, 1), "bands_x_rows": [index.bands, index.rows]}
elif step == "split":
    from tunelab.data.split import split_file
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = split_file(src, out / "split")
    info = {"counts": r.counts}
print(json.dumps({"step": step, "seconds": round(time.perf_counter() - t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "rss_after_imports_mb": round(base / 1024, 1), **info}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--steps", nargs="+", default=["inspect", "clean", "split"],
                    help="inspect, clean, split, near (the near-duplicate index alone)")
    ap.add_argument("--tokens", action="store_true", help="inspect with SmolLM2's tokenizer (token lengths)")
    ap.add_argument("--data", type=Path, default=None,
                    help="keep the generated file here and reuse it when it exists (run steps as separate commands)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.data or Path(tmp) / "bench.jsonl"
        if not src.exists():
            t = time.perf_counter()
            generate(src, args.rows)
            print(json.dumps({"step": "generate", "rows": args.rows, "seconds": round(time.perf_counter() - t, 2),
                              "mb": round(src.stat().st_size / 2**20, 1)}), flush=True)
        rows = sum(1 for _ in src.open(encoding="utf-8"))
        for step in args.steps:
            cmd = [sys.executable, "-c", STEP, step, str(src), tmp] + (["tok"] if args.tokens else [])
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            res["rows"] = rows
            res["rows_per_s"] = round(rows / res["seconds"])
            print(json.dumps(res, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
