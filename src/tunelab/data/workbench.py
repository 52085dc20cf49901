"""The training config's data steps: read, clean, split, mix, augment, weight (``data.prepare``).

:func:`prepare_records` is the one function every task calls in its ``rows`` before tokenisation.
Cleaning (the expensive step) is cached under ``<cache>/prepared/<fingerprint>/``, keyed by the
input file's bytes, the clean settings and the tunelab version; the report of every step is
returned (and written into the run directory as ``data_prepare.json``, with the removed rows
as ``prepare_removed.jsonl``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab import __version__
from tunelab.data.augment import augment_records
from tunelab.data.clean import clean_file
from tunelab.data.formats import read_records
from tunelab.data.records import Record, Reject
from tunelab.data.sampling import mix, mix_counts
from tunelab.data.split import assign, groups_of
from tunelab.data.weights import balance
from tunelab.fsutil import atomic_folder, atomic_write_text, sha256_file


@dataclass
class PreparedRecords:
    train: list[Record]
    eval: list[Record]
    rejects: list[Reject]
    files: list[dict[str, Any]]
    eval_files: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)
    datasets: tuple[str, ...] = ()  # names, when several training datasets are kept apart
    dataset_of: dict[str, int] = field(default_factory=dict)
    label_of: dict[str, str | None] = field(default_factory=dict)

    def _lookup(self, table: dict, sample_id: str, default):
        if sample_id in table:
            return table[sample_id]
        return table.get(sample_id.rsplit("#", 1)[0], default)

    def groups(self, encoded) -> list[int] | None:
        """Dataset index per encoded sample (None with one dataset: the fast path)."""
        if len(self.datasets) < 2:
            return None
        return [self._lookup(self.dataset_of, e.id, 0) for e in encoded]

    def strata(self, encoded, by: str = "label") -> tuple[int, ...]:
        """A class index per encoded sample: its label, else its dataset."""
        keys = [self._lookup(self.label_of, e.id, None) for e in encoded]
        if all(k is None for k in keys):
            keys = [str(self._lookup(self.dataset_of, e.id, 0)) for e in encoded]
        index = {k: i for i, k in enumerate(sorted({str(k) for k in keys}))}
        return tuple(index[str(k)] for k in keys)


def data_problems(d) -> list[str]:
    """Cross-field rules of the data section's workbench keys (called by config validation)."""
    p: list[str] = []
    prep = d.prepare
    if prep is not None and prep.split is not None and (d.eval or d.eval_ratio > 0):
        p.append("data.prepare.split and data.eval/data.eval_ratio are both set. Choose one source of validation data.")
    if d.mix.strategy == "ratio":
        missing = [str(i) for i, spec in enumerate(d.train) if spec.ratio is None]
        if missing:
            p.append(f"data.mix.strategy=ratio needs a ratio on every data.train entry (missing on entries {', '.join(missing)}).")
    if d.sampler != "random" and d.packing:
        p.append(f"data.sampler={d.sampler} needs unpacked rows (a packed row mixes samples). Set data.packing: false.")
    if d.sampler != "random" and d.group_by_length:
        p.append(f"data.sampler={d.sampler} and data.group_by_length are both set. Choose one.")
    names = [spec.name for spec in d.train if spec.name]
    if len(names) != len(set(names)):
        p.append(f"data.train: dataset names must be unique (got {names}).")
    return p



def fingerprint(path: Path, settings: dict[str, Any], extra: dict[str, Any]) -> str:
    h = hashlib.sha256(f"tunelab {__version__} prepare v1".encode())
    h.update(sha256_file(path).encode())
    h.update(json.dumps({"settings": settings, **extra}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def cleaned_file(spec, settings, model_path: str, report: dict) -> Path:
    """The cleaned copy of one data file, from the cache or made now."""
    from tunelab.models.registry import cache_root

    src = Path(spec.path)
    if settings.length is not None and settings.length.tokenizer is None:
        settings = settings.model_copy(update={"length": settings.length.model_copy(update={"tokenizer": model_path})})
    key = fingerprint(src, settings.model_dump(mode="json"),
                      {"format": spec.format, "columns": spec.columns, "limit": spec.limit})
    folder = cache_root() / "prepared" / key
    out = folder / src.name
    if out.is_file() and (folder / "report.json").is_file():
        entry = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        report.update({**entry, "from_cache": True, "fingerprint": key})
        return out

    def fill(tmp: Path) -> None:
        r = clean_file(src, tmp / src.name, settings, format=spec.format, columns=spec.columns or None,
                       removed=tmp / "removed.jsonl", limit=spec.limit)
        (tmp / "report.json").write_text(json.dumps({**r.to_dict(), "output": str(out),
                                                     "removed_file": str(folder / "removed.jsonl")}))

    atomic_folder(folder, fill)
    entry = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    report.update({**entry, "from_cache": False, "fingerprint": key})
    return out


def _read(spec, prep, model_path: str, reports: list) -> tuple[Any, dict[str, Any]]:

    path, limit = Path(spec.path), spec.limit
    if prep is not None and prep.clean is not None:
        rep: dict[str, Any] = {"path": str(path)}
        path, limit = cleaned_file(spec, prep.clean, model_path, rep), None
        reports.append(rep)
    res = read_records(path, format=spec.format, columns=spec.columns or None, limit=limit)
    info = {"path": str(spec.path), "format": res.format, "rows": res.rows, "records": len(res.records),
            "rejected": len(res.rejects)}
    if path != Path(spec.path):
        info["cleaned"] = str(path)
    return res, info


def _unique_names(specs) -> list[str]:
    names, seen = [], set()
    for spec in specs:
        base = spec.name or Path(spec.path).stem
        name, k = base, 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


def prepare_records(cfg, run=None, console=None, is_main: bool = True) -> PreparedRecords:
    """Read the data files and run the configured workbench steps; returns records to tokenise.

    Over 100 lines on purpose: the steps (read, clean, split, mix, weights) run in the order the
    config gives and share one report, one rejects list and the fingerprints of the clean cache.
    """

    d, prep = cfg.data, cfg.data.prepare
    report: dict[str, Any] = {}
    clean_reports: list[dict[str, Any]] = []
    names = _unique_names(d.train)
    per_dataset: list[list[Record]] = []
    rejects: list[Reject] = []
    files = []
    for spec, name in zip(d.train, names, strict=True):
        res, info = _read(spec, prep, cfg.model.path, clean_reports)
        recs = res.records
        if spec.weight != 1.0:
            recs = [dataclasses.replace(r, weight=r.weight * spec.weight) for r in recs]
        per_dataset.append(recs)
        rejects += res.rejects
        files.append({**info, "name": name})
    eval_records, eval_files = [], []
    for spec in d.eval:
        res, info = _read(spec, None, cfg.model.path, [])
        eval_records += res.records
        rejects += res.rejects
        eval_files.append(info)
    if clean_reports:
        report["clean"] = clean_reports

    # ids must be unique across datasets to map samples back to their dataset
    seen: set[str] = set()
    for k, recs in enumerate(per_dataset):
        if any(r.id in seen for r in recs):
            per_dataset[k] = recs = [dataclasses.replace(r, id=f"{names[k]}/{r.id}") for r in recs]
        seen.update(r.id for r in recs)
    train = [r for recs in per_dataset for r in recs]
    dataset_of = {r.id: k for k, recs in enumerate(per_dataset) for r in recs}

    # --- validation data: eval_ratio (as before), or a stratified, group-aware split
    if d.eval_ratio > 0:
        order = list(range(len(train)))
        random.Random(cfg.train.seed).shuffle(order)
        held = set(order[: max(1, round(d.eval_ratio * len(train)))])
        eval_records = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    elif prep is not None and prep.split is not None:
        s = prep.split
        labels = [r.label for r in train]
        groups = groups_of(train, s.group, s.threshold)
        which = assign(labels, groups, s.ratios, s.seed, s.stratify and any(x is not None for x in labels))
        parts = [[r for r, w in zip(train, which, strict=True) if w == k] for k in range(len(s.ratios))]
        train, eval_records = parts[0], parts[1]
        report["split"] = {"ratios": list(s.ratios), "train": len(parts[0]), "eval": len(parts[1]),
                           "groups": len(set(groups.tolist())), "group": s.group}
        if len(parts) == 3:
            report["split"]["test"] = len(parts[2])
            if run is not None and is_main:

                atomic_write_text(run.path / "test.jsonl", "".join(
                    json.dumps(record_row(r), ensure_ascii=False) + "\n" for r in parts[2]))
                report["split"]["test_file"] = str(run.path / "test.jsonl")

    # --- mixing several datasets (train only)
    if len(per_dataset) > 1 and d.mix.strategy != "concat":
        by_set = [[r for r in train if dataset_of[r.id] == k] for k in range(len(per_dataset))]
        counts = mix_counts([len(x) for x in by_set], strategy=d.mix.strategy,
                            ratios=[spec.ratio for spec in d.train], temperature=d.mix.temperature, size=d.mix.size)
        mixed = mix(by_set, counts, d.mix.seed)
        train = [r for _, r in mixed]
        report["mix"] = {"strategy": d.mix.strategy, "rows": dict(zip(names, counts, strict=True)),
                         "available": dict(zip(names, [len(x) for x in by_set], strict=True))}

    # --- augmentation (train only, after the split: never reaches validation)
    if prep is not None and prep.augment is not None:

        extra, aug_report = augment_records(train, prep.augment)
        for r in extra:
            dataset_of[r.id] = dataset_of.get(r.meta.get("source_id", ""), 0)
        train = train + extra
        report["augment"] = aug_report

    # --- class-balanced weights
    if prep is not None and prep.weights is not None:

        w = prep.weights
        key = (lambda r: r.label) if w.by == "label" else (lambda r: names[dataset_of[r.id]])
        train, table = balance(train, key, w.scheme, w.beta)
        report["weights"] = {"scheme": w.scheme, "by": w.by, "class_weights": table}

    if run is not None and is_main and report:
        run.write_json("data_prepare.json", report)
        removed = [Path(c["removed_file"]) for c in clean_reports if Path(c.get("removed_file", "")).is_file()]
        if removed:
            with (run.path / "prepare_removed.jsonl").open("w", encoding="utf-8") as out:
                for path in removed:
                    with path.open(encoding="utf-8") as fh:
                        shutil.copyfileobj(fh, out)
    if console is not None and is_main and report:
        _print(console, report)
    keep_apart = len(per_dataset) > 1
    return PreparedRecords(
        train=train, eval=eval_records, rejects=rejects, files=files, eval_files=eval_files, report=report,
        datasets=tuple(names) if keep_apart else (), dataset_of=dataset_of if keep_apart else {},
        label_of={r.id: r.label for r in train},
    )


def record_row(r: Record) -> dict[str, Any]:
    """A record as a row tunelab reads back (classification, text or OpenAI messages)."""
    if r.label is not None and len(r.messages) == 1:
        return {"text": r.messages[0].content, "label": r.label}
    if r.is_text:
        return {"text": r.text}
    row: dict[str, Any] = {"messages": [{"role": m.role, "content": m.content} for m in r.messages]}
    if r.tools:
        row["tools"] = r.tools
    if r.weight != 1.0:
        row["weight"] = r.weight
    return row


def _print(console, report: dict[str, Any]) -> None:
    for c in report.get("clean", []):
        console.print(f"prepare: cleaned {c['input']}: {c['rows_read']} -> {c['rows_written']} rows "
                      f"{c.get('removed_by_reason', {})}" + (" (from the cache)" if c.get("from_cache") else ""))
    if "split" in report:
        console.print(f"prepare: split {report['split']}")
    if "mix" in report:
        console.print(f"prepare: mixed {report['mix']['rows']}")
    if "augment" in report:
        console.print(f"prepare: augmented {report['augment']}")
    if "weights" in report:
        console.print(f"prepare: class weights {report['weights']['class_weights']}")
