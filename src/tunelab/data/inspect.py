"""``tunelab data inspect``: what is in a data file, in one streaming pass, in bounded memory.

Rows read and rejected (by reason); token lengths per role with the model's tokenizer
(p50/p90/p99/max and the share of rows over ``max_length``, the rendered length estimated as
content tokens + the chat template's measured per-message overhead); turns per conversation;
exact and near duplicates (:mod:`tunelab.data.dedup`); label distribution and imbalance ratio;
language mix (Chinese / English / other, by script and English function words); empty or very
short answers. Terminal tables (rich) and an HTML page with histograms (matplotlib).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from tunelab.data.coverage import coverage_warning, unknown_tokens
from tunelab.data.dedup import NearDupIndex, digest64, exact_duplicates
from tunelab.data.formats import check_usable, open_source
from tunelab.data.split import row_keys
from tunelab.data.stream import answer_text, full_text
from tunelab.fsutil import atomic_write_text
from tunelab.report import plots

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_LETTER = re.compile(r"[^\W\d_]")
_EN_WORDS = frozenset("the a an and or of to in is are was be it that this for with on as you i not by at from "
                      "what how why which can do does your my we they he she".split())
ROLES = ("system", "user", "assistant", "tool", "text")


def language(text: str) -> str:
    """zh when CJK characters are >= 30% of the letters; en for Latin script with English function
    words (or too short to tell); other otherwise."""
    sample = text[:2000]
    letters = len(_LETTER.findall(sample))
    if not letters:
        return "other"
    if len(_CJK.findall(sample)) >= 0.3 * letters:
        return "zh"
    if len(_LATIN.findall(sample)) >= 0.5 * letters:
        words = re.findall(r"[a-z']+", sample.lower())
        if len(words) < 4 or any(w in _EN_WORDS for w in words):
            return "en"
    return "other"


class Lengths:
    """A histogram of integer lengths (value -> count): exact statistics in memory bounded by the
    number of *distinct* lengths, not by the number of rows.

    Percentiles interpolate linearly between order statistics, exactly as ``numpy.percentile``
    would on the full list of values.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, values) -> None:
        arr = np.asarray(values, dtype=np.int64)
        if len(arr):
            uniq, cnt = np.unique(arr, return_counts=True)
            self.counts.update(dict(zip(uniq.tolist(), cnt.tolist(), strict=True)))

    def __len__(self) -> int:
        return sum(self.counts.values())

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct values, their counts)."""
        keys = np.array(sorted(self.counts), dtype=np.int64)
        return keys, np.array([self.counts[k] for k in keys.tolist()], dtype=np.int64)

    def percentile(self, qs: list[float]) -> list[float]:
        keys, counts = self.table()
        cum = np.cumsum(counts)
        n = int(cum[-1])

        def at(i: int) -> float:  # the i-th smallest value (0-based)
            return float(keys[np.searchsorted(cum, i, side="right")])

        out = []
        for q in qs:
            h = (n - 1) * q / 100
            lo, hi = int(np.floor(h)), int(np.ceil(h))
            out.append(at(lo) + (h - lo) * (at(hi) - at(lo)))
        return out

    def summary(self) -> dict[str, float]:
        n = len(self)
        if not n:
            return {"n": 0}
        keys, counts = self.table()
        p50, p90, p99 = self.percentile([50, 90, 99])
        return {"n": n, "mean": round(float((keys * counts).sum() / n), 1), "p50": p50, "p90": p90,
                "p99": p99, "max": int(keys[-1])}

    def share_over(self, limit: int) -> float:
        keys, counts = self.table()
        return float(counts[keys > limit].sum() / max(counts.sum(), 1))


def template_overhead(tokenizer) -> float:
    """Tokens the chat template adds per message (measured on a two-message chat)."""
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    try:
        ids = tokenizer.apply_chat_template(msgs, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        content = sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in msgs)
        return max(0.0, (len(ids) - content) / 2)
    except Exception:  # noqa: BLE001 - no template: no overhead to add
        return 0.0


def inspect_file(path: str | Path, *, tokenizer=None, max_length: int | None = None, format: str = "auto",
                 columns: dict[str, str] | None = None, near_threshold: float = 0.85, short_answer: int = 3,
                 limit: int | None = None, chunk: int = 4096) -> dict[str, Any]:
    """The statistics of one file (see the module docstring), in one streaming pass.

    Memory per row: an 8-byte exact-duplicate digest; MinHash signatures and LSH band keys go to
    temporary files (:class:`~tunelab.data.dedup.NearDupIndex`). Lengths and turns are kept as
    histograms (:class:`Lengths`), labels, languages and field names as counters.

    Over 100 lines on purpose: the one streaming pass updates every statistic per row, so their
    accumulators live side by side in this function rather than being passed between many.
    """
    src = open_source(path, format, columns, limit)
    rows = 0
    rejects: Counter = Counter()
    chars: dict[str, Lengths] = {r: Lengths() for r in ROLES}
    tokens: dict[str, Lengths] = {r: Lengths() for r in ROLES}
    totals, turns, digests = Lengths(), Lengths(), array("q")
    labels: Counter = Counter()
    langs: Counter = Counter()
    fields: Counter = Counter()
    short: list[dict[str, Any]] = []
    n_short = 0
    overhead = template_overhead(tokenizer) if tokenizer is not None else 0.0
    unknown = [0, 0]  # unknown tokens, tokens (special tokens not counted)
    index = NearDupIndex(threshold=near_threshold)
    try:
        batch: list = []

        def flush(batch: list) -> None:
            nonlocal n_short
            texts: dict[str, list[str]] = {r: [] for r in ROLES}
            owner: dict[str, list[int]] = {r: [] for r in ROLES}
            keys = []
            n_turns = []
            for k, item in enumerate(batch):
                rec = item.record
                if isinstance(item.raw, dict) and len(fields) < 200:
                    fields.update(item.raw.keys())
                if rec.is_text:
                    texts["text"].append(rec.text or "")
                    owner["text"].append(k)
                for m in rec.messages:
                    texts[m.role].append(m.content)
                    owner[m.role].append(k)
                n_turns.append(sum(1 for m in rec.messages if m.role == "user"))
                key = row_keys(rec)
                keys.append(key)
                digests.append(digest64(key[0] + "\n" + key[1]))
                if rec.label is not None:
                    labels[rec.label] += 1
                langs[language(full_text(rec))] += 1
                ans = answer_text(rec)
                if ans is not None and rec.label is None and len(ans.strip()) <= short_answer:
                    n_short += 1
                    if len(short) < 10:
                        short.append({"id": rec.id, "answer": ans})
            turns.add(n_turns)
            index.add([k[0] for k in keys], [k[1] for k in keys])
            row_tokens = np.zeros(len(batch), dtype=np.int64)
            row_msgs = np.array([max(1, len(i.record.messages)) for i in batch])
            for role in ROLES:
                if not texts[role]:
                    continue
                chars[role].add([len(t) for t in texts[role]])
                if tokenizer is not None:
                    ids = tokenizer(texts[role], add_special_tokens=False)["input_ids"]
                    lens = [len(x) for x in ids]
                    seen = unknown_tokens(tokenizer, ids)
                    if seen is not None:
                        unknown[0] += seen["unknown"]
                        unknown[1] += seen["tokens"]
                    tokens[role].add(lens)
                    np.add.at(row_tokens, owner[role], lens)
            if tokenizer is not None:
                totals.add(row_tokens + np.round(overhead * row_msgs).astype(np.int64))

        for item in src.items():
            rows += 1
            if item.reject is not None:
                rejects[item.reject.reason] += 1
                continue
            batch.append(item)
            if len(batch) >= chunk:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        check_usable(src, rows, rows - sum(rejects.values()), rejects)
        dig = np.frombuffer(digests, dtype=np.int64) if len(digests) else np.zeros(0, dtype=np.int64)
        first = exact_duplicates(dig)
        is_first = first == np.arange(len(first))
        exact = int((~is_first).sum())
        del dig, first
        root, _ = index.clusters(is_first)
        near = int((root != np.arange(len(root))).sum())
    finally:
        index.close()
    records = rows - sum(rejects.values())
    report: dict[str, Any] = {
        "path": str(src.path), "format": src.format, "rows": rows, "records": records,
        "rejected": sum(rejects.values()), "rejected_by_reason": dict(rejects.most_common()),
        "fields": dict(fields.most_common()),
        "chars": {r: h.summary() for r, h in chars.items() if len(h)},
        "turns": turns.summary() if turns.counts.keys() - {0} else None,
        "exact_duplicates": exact, "near_duplicates": near, "near_threshold": near_threshold,
        "labels": dict(labels.most_common()),
        "imbalance_ratio": round(max(labels.values()) / min(labels.values()), 3) if labels else None,
        "languages": {k: round(v / max(records, 1), 4) for k, v in langs.most_common()},
        "short_answers": n_short, "short_answer_examples": short,
    }
    if tokenizer is not None:
        report["tokens"] = {r: h.summary() for r, h in tokens.items() if len(h)}
        report["tokens_total"] = totals.summary()
        report["template_overhead_per_message"] = round(overhead, 2)
        if getattr(tokenizer, "unk_token_id", None) is not None:  # byte-level tokenizers have no unknown token
            report["unknown_tokens"] = {"unknown": unknown[0], "tokens": unknown[1],
                                        "rate": round(unknown[0] / unknown[1], 4) if unknown[1] else 0.0}
        if max_length:
            report["max_length"] = max_length
            report["over_max_length"] = round(totals.share_over(max_length) if len(totals) else 0.0, 4)
    report["_hist"] = {"tokens" if tokenizer is not None else "chars":
                       {r: h for r, h in (tokens if tokenizer is not None else chars).items() if len(h)},
                       "turns": turns}
    return report


def inspect_target(target: str | Path, *, model: str | None = None, max_length: int | None = None,
                   **kw) -> list[dict[str, Any]]:
    """A data file, or every training/eval file of a training config (with its model and max_length)."""
    from tunelab.models.load import load_tokenizer

    p = Path(target)
    specs: list[tuple[str, str, dict]] = []
    if p.suffix.lower() in (".yaml", ".yml"):
        from tunelab.config import load_config

        cfg, _ = load_config(p)
        model = model or cfg.model.path
        max_length = max_length or cfg.data.max_length
        specs = [(s.path, s.format, s.columns) for s in cfg.data.train + cfg.data.eval]
    else:
        specs = [(str(p), kw.pop("format", "auto"), kw.pop("columns", None) or {})]
    tokenizer = load_tokenizer(model) if model else None
    reports = [inspect_file(path, tokenizer=tokenizer, max_length=max_length, format=fmt, columns=cols or None, **kw)
               for path, fmt, cols in specs]
    for r in reports:
        if model:
            r["model"] = str(model)
    return reports


# ----------------------------------------------------------------------------- output


def print_report(report: dict[str, Any], console) -> None:

    t = Table(title=f"{report['path']} ({report['format']})", show_header=False)
    t.add_row("rows read / usable / rejected", f"{report['rows']:,} / {report['records']:,} / {report['rejected']:,}")
    if report["rejected_by_reason"]:
        t.add_row("rejected by reason", ", ".join(f"{k}: {v}" for k, v in report["rejected_by_reason"].items()))
    if report.get("fields"):
        t.add_row("fields (rows with it)", ", ".join(f"{k}: {v:,}" for k, v in list(report["fields"].items())[:12]))
    t.add_row("exact / near duplicates", f"{report['exact_duplicates']:,} / {report['near_duplicates']:,} "
              f"(near: Jaccard >= {report['near_threshold']})")
    t.add_row("languages", ", ".join(f"{k} {v:.1%}" for k, v in report["languages"].items()))
    if report["labels"]:
        t.add_row("labels", ", ".join(f"{k}: {v}" for k, v in report["labels"].items()))
        t.add_row("imbalance ratio (max/min)", str(report["imbalance_ratio"]))
    if report.get("turns"):
        tr = report["turns"]
        t.add_row("user turns per conversation", f"p50 {tr['p50']:.0f}, p90 {tr['p90']:.0f}, max {tr['max']}")
    t.add_row("empty / very short answers", f"{report['short_answers']:,}")
    if "over_max_length" in report:
        t.add_row(f"rows over max_length {report['max_length']}", f"{report['over_max_length']:.2%} "
                  f"(template overhead {report['template_overhead_per_message']} tokens/message)")
    if report.get("unknown_tokens") is not None:
        u = report["unknown_tokens"]
        t.add_row("unknown tokens ([UNK])", f"{u['rate']:.2%} ({u['unknown']:,} of {u['tokens']:,})")
    console.print(t)
    warning = coverage_warning(report.get("unknown_tokens"), report.get("model", "the model"))
    if warning is not None:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    for kind in ("tokens", "chars"):
        if kind not in report:
            continue
        lt = Table(title=f"{kind} per role")
        for col in ("role", "n", "mean", "p50", "p90", "p99", "max"):
            lt.add_column(col, justify="right" if col != "role" else "left")
        rows = dict(report[kind])
        if kind == "tokens" and report.get("tokens_total", {}).get("n"):
            rows["(row total)"] = report["tokens_total"]
        for role, st in rows.items():
            lt.add_row(role, *(f"{st[c]:,.0f}" if c != "mean" else f"{st[c]:,.1f}" for c in ("n", "mean", "p50", "p90", "p99", "max")))
        console.print(lt)


def _figure(data: dict[str, Lengths], title: str, xlabel: str, vline: float | None = None) -> str:
    plt = plots.pyplot(verb="tunelab data inspect --html", extra="data")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, hist in data.items():
        if len(hist):
            values, counts = hist.table()
            ax.hist(values, weights=counts, bins=min(60, max(5, len(values))), alpha=0.55, label=name)
    if vline:
        ax.axvline(vline, color="red", linestyle="--", label=f"max_length {vline:.0f}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_html(reports: list[dict[str, Any]], path: str | Path) -> Path:
    """One HTML page: the tables and histograms of every report (images embedded)."""


    parts = ["<!doctype html><meta charset='utf-8'><title>tunelab data inspect</title>",
             "<style>body{font-family:sans-serif;max-width:980px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}</style>",
             "<h1>tunelab data inspect</h1>"]
    for r in reports:
        parts.append(f"<h2>{html.escape(r['path'])} <small>({r['format']})</small></h2>")
        summary = {k: v for k, v in r.items() if not k.startswith("_") and k not in ("chars", "tokens", "tokens_total")}
        parts.append("<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v, ensure_ascii=False))}</td></tr>"
                                         for k, v in summary.items()) + "</table>")
        for kind in ("tokens", "chars"):
            if kind in r:
                parts.append(f"<h3>{kind} per role</h3><table><tr><th>role</th>" +
                             "".join(f"<th>{c}</th>" for c in ("n", "mean", "p50", "p90", "p99", "max")) + "</tr>" +
                             "".join(f"<tr><td>{role}</td>" + "".join(f"<td>{st.get(c, '')}</td>" for c in ("n", "mean", "p50", "p90", "p99", "max")) + "</tr>"
                                     for role, st in r[kind].items()) + "</table>")
        hist = r.get("_hist", {})
        for kind in ("tokens", "chars"):
            if hist.get(kind):
                img = _figure(hist[kind], f"{kind} per message, by role", kind, r.get("max_length") if kind == "tokens" else None)
                parts.append(f"<img src='data:image/png;base64,{img}'>")
        if "turns" in hist and hist["turns"].counts.keys() - {0}:
            parts.append(f"<img src='data:image/png;base64,{_figure({'conversations': hist['turns']}, 'user turns per conversation', 'turns')}'>")
    atomic_write_text(Path(path), "\n".join(parts))
    return Path(path)


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the raw histogram arrays (for JSON)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}
