"""Writing data files in their own format, and the texts of a record, for the workbench verbs.

The workbench (clean, split, augment, weights) reads a file with the one reader,
:func:`tunelab.data.formats.open_source` (each row's raw dict beside its canonical record), changes
the raw row (column names and extra keys kept) and writes it back here. Writers are atomic (temp
file + rename), refuse to write over the input file, and stream: ``.csv`` and ``.parquet`` rows are
spooled to a temporary JSON Lines file and converted at :meth:`RowWriter.close` (Parquet in batches
with one unified schema).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.data.records import Record
from tunelab.errors import UserError

# Keys whose values are not prose (never normalised, augmented or masked).
NON_TEXT_KEYS = frozenset({"tools", "id", "weight", "label", "source_id", "augmented", "from", "role"})


def prompt_text(record: Record) -> str:
    """What the model is given: the text, or every turn before the last assistant turn."""
    if record.is_text:
        return record.text or ""
    turns = list(record.messages)
    last = max((i for i, m in enumerate(turns) if m.role == "assistant"), default=len(turns))
    return "\n".join(m.content for m in turns[:last])


def answer_text(record: Record) -> str | None:
    """What the model should produce: the label, else the last assistant turn (None for text)."""
    if record.label is not None:
        return record.label
    for m in reversed(record.messages):
        if m.role == "assistant":
            return m.content
    return None


def full_text(record: Record) -> str:
    answer = answer_text(record)
    return prompt_text(record) + ("\n" + answer if answer is not None else "")


def map_text(raw: Any, fn, skip: frozenset[str] = NON_TEXT_KEYS) -> Any:
    """``raw`` with ``fn`` applied to every prose string (nested lists/dicts too)."""
    if isinstance(raw, str):
        return fn(raw)
    if isinstance(raw, list):
        return [map_text(v, fn, skip) for v in raw]
    if isinstance(raw, dict):
        return {k: (v if k in skip else map_text(v, fn, skip)) for k, v in raw.items()}
    return raw


# --------------------------------------------------------------------------- writers


class RowWriter:
    """Write raw rows to ``path`` in the format its extension names, atomically, in bounded memory.

    ``.jsonl``, ``.json`` and ``.txt`` stream to a temp file in the same folder; ``.csv`` and
    ``.parquet`` rows are spooled to a temporary JSON Lines file and converted at :meth:`close`
    (CSV: the header is every key seen; Parquet: batches of ``batch_rows`` with one schema
    unified over all batches by ``pyarrow.unify_schemas``). Nothing appears at ``path`` until
    :meth:`close` succeeds.
    """

    batch_rows = 8192

    def __init__(self, path: str | Path, *, protect: list[Path] | None = None):
        self.path = Path(path)
        self.ext = self.path.suffix.lower()
        if self.ext not in (".jsonl", ".json", ".csv", ".parquet", ".txt"):
            raise UserError(f"{self.path}: unsupported output type (got {self.ext or 'no extension'!r}). "
                            "Use .jsonl, .json, .csv, .parquet or .txt.")
        for p in protect or []:
            if Path(p).resolve() == self.path.resolve():
                raise UserError(f"{self.path}: the output is the input file. Write to another path; "
                                "the input is never modified.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._fh = os.fdopen(fd, "w", encoding="utf-8", newline="")
        self._spool = (tempfile.TemporaryFile("w+", encoding="utf-8", newline="")  # noqa: SIM115 - closed in close/abort
                       if self.ext in (".csv", ".parquet") else None)
        self._names: dict[str, None] = {}
        self.count = 0
        if self.ext == ".json":
            self._fh.write("[")

    def write(self, raw: Any) -> None:
        if self.ext == ".jsonl":
            self._fh.write(json.dumps(raw, ensure_ascii=False) + "\n")
        elif self.ext == ".json":
            self._fh.write(("\n" if self.count == 0 else ",\n") + json.dumps(raw, ensure_ascii=False))
        elif self.ext == ".txt":
            text = raw.get("text", "") if isinstance(raw, dict) else str(raw)
            self._fh.write(text.replace("\n", " ") + "\n")
        else:
            self._names.update(dict.fromkeys(raw))
            self._spool.write(json.dumps(raw, ensure_ascii=False) + "\n")
        self.count += 1

    def _spooled(self) -> Iterator[list[Any]]:
        self._spool.seek(0)
        batch: list[Any] = []
        for line in self._spool:
            batch.append(json.loads(line))
            if len(batch) >= self.batch_rows:
                yield batch
                batch = []
        if batch:
            yield batch

    def _write_csv(self) -> None:
        writer = csv.DictWriter(self._fh, fieldnames=list(self._names))
        writer.writeheader()
        for batch in self._spooled():
            writer.writerows(_csv_row(r) for r in batch)

    def _write_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = list(self._names)  # every key of every row (from_pylist would take the first row's only)

        def columns(batch: list[Any]) -> dict[str, list[Any]]:
            return {n: [r.get(n) if isinstance(r, dict) else None for r in batch] for n in names}

        try:
            schemas = [pa.Table.from_pydict(columns(b)).schema for b in self._spooled()]
            schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
            with pq.ParquetWriter(self._tmp, schema) as out:
                for batch in self._spooled():
                    out.write_table(pa.Table.from_pydict(columns(batch), schema=schema))
        except (pa.ArrowException, TypeError) as err:
            raise UserError(f"{self.path}: the rows' columns have types Parquet cannot hold together (got "
                            f"{str(err).splitlines()[0]}). Write .jsonl instead, or make each column one type.") from err

    def close(self) -> Path:
        try:
            if self.ext == ".json":
                self._fh.write("\n]\n")
            elif self.ext == ".csv":
                self._write_csv()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            if self.ext == ".parquet":
                self._write_parquet()
            if self._spool is not None:
                self._spool.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self._spool is not None and not self._spool.closed:
            self._spool.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in r.items()}


def write_rows(path: str | Path, rows, *, protect: list[Path] | None = None) -> int:
    """Write raw rows atomically; returns how many."""
    with RowWriter(path, protect=protect) as w:
        for r in rows:
            w.write(r)
    return w.count


def output_path(out_dir: Path, name: str, like: Path) -> Path:
    """``<out_dir>/<name><the input's extension>`` (``.jsonl`` for ``.txt`` inputs with metadata)."""
    return Path(out_dir) / f"{name}{like.suffix.lower()}"
