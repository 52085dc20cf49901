"""Data workbench at scale: rows/s and peak RSS of inspect, clean (+ exact and near dedup) and split.

Generates a JSON Lines classification file with our own code (mixed English / Chinese rows,
5% exact and 5% near duplicates), then runs each step in a fresh process (so each peak RSS
is its own) and prints one line per step. Usage:

    python benchmarks/bench_data.py --rows 1000000
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


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                     for _ in range(20000)]
    with path.open("w", encoding="utf-8") as fh:
        recent: list[dict] = []
        for i in range(rows):
            r = rng.random()
            if recent and r < 0.05:
                row = dict(rng.choice(recent))  # exact duplicate
            elif recent and r < 0.10:
                src = rng.choice(recent)
                row = {**src, "text": src["text"] + rng.choice([" !", "（图）", " (repost)"])}  # near duplicate
            elif rng.random() < 0.5:
                row = {"text": " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 16))), "label": rng.randint(0, 3)}
            else:
                row = {"text": "".join(rng.choice(HAN) for _ in range(rng.randint(12, 40))), "label": rng.randint(0, 3)}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            if i % 50 == 0:
                recent = (recent + [row])[-1000:]


STEP = r"""
import json, resource, sys, time
from pathlib import Path
step, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
t = time.perf_counter()
if step == "inspect":
    from tunelab.data.inspect import inspect_file
    from tunelab.models.load import load_tokenizer
    r = inspect_file(src, tokenizer=load_tokenizer("tiny-random-llama") if len(sys.argv) > 4 else None)
    info = {"exact": r["exact_duplicates"], "near": r["near_duplicates"]}
elif step == "clean":
    from tunelab.data.clean import clean_file
    from tunelab.data.settings import CleanSettings, ConflictSettings
    r = clean_file(src, out / "clean.jsonl", CleanSettings(conflicts=ConflictSettings(policy="flag", near=False)))
    info = {"written": r.rows_written, "removed": r.removed_by_reason}
elif step == "split":
    from tunelab.data.split import split_file
    r = split_file(src, out / "split")
    info = {"counts": r.counts}
print(json.dumps({"step": step, "seconds": round(time.perf_counter() - t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **info}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--steps", nargs="+", default=["inspect", "clean", "split"])
    ap.add_argument("--tokens", action="store_true", help="inspect with a tokenizer (token lengths)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bench.jsonl"
        t = time.perf_counter()
        generate(src, args.rows)
        print(json.dumps({"step": "generate", "rows": args.rows, "seconds": round(time.perf_counter() - t, 2),
                          "mb": round(src.stat().st_size / 2**20, 1)}))
        for step in args.steps:
            cmd = [sys.executable, "-c", STEP, step, str(src), tmp] + (["tok"] if args.tokens else [])
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            res["rows_per_s"] = round(args.rows / res["seconds"])
            print(json.dumps(res, ensure_ascii=False))


if __name__ == "__main__":
    main()
