"""Rows of a data file one at a time, with the file's own raw row kept beside its record.

The workbench (clean, split, augment, weights) rewrites files *in their own format*: it changes
the raw row (a dict as the file has it, column names and extra keys included) and writes it
back, and uses the canonical :class:`~tunelab.data.records.Record` parsed from it (by the
readers of :mod:`tunelab.data.formats`, same rules, same rejects) to judge it.

JSON Lines and ``.txt`` files are streamed line by line (bounded memory for any size); ``.json``,
``.csv`` and ``.parquet`` files are parsed whole by the readers in ``formats``. Writers are
atomic (temp file + rename) and refuse to write over the input file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data import formats as _f
from tunelab.data.records import Record, Reject
from tunelab.errors import UserError

# Keys whose values are not prose (never normalised, augmented or masked).
NON_TEXT_KEYS = frozenset({"tools", "id", "weight", "label", "source_id", "augmented", "from", "role"})


@dataclass
class Item:
    """One row: its index in the file, the raw row, and its record or its reject."""

    index: int
    raw: Any
    record: Record | None
    reject: Reject | None


@dataclass
class Source:
    """An opened data file: its path, detected format and column mapping."""

    path: Path
    format: str
    columns: dict[str, str]
    limit: int | None = None

    def items(self) -> Iterator[Item]:
        """Every row of the file, parsed (a fresh pass each call)."""
        for index, raw in _rows(self.path, self.limit):
            yield parse(index, raw, self)


def open_source(path: str | Path, format: str = "auto", columns: dict[str, str] | None = None,
                limit: int | None = None) -> Source:
    """Check the file and detect its format from the first object row (like ``read_records``)."""
    p = Path(path)
    if format != "auto" and format not in _f.FORMATS:
        raise UserError(f"--format: unknown format (got {format!r}). Use auto or one of {', '.join(_f.FORMATS)}.")
    cols = _f._check_columns(columns)
    _f._check_file(p)
    if p.suffix.lower() == ".txt":
        return Source(p, "text", cols, limit)
    if format != "auto":
        return Source(p, format, cols, limit)
    head: list[tuple[int, Any]] = []
    for index, raw in _rows(p, limit):
        head.append((index, raw))
        if isinstance(raw, dict):
            break
    return Source(p, _f._detect_format(p, head, cols), cols, limit)


def check_usable(source: Source, rows: int, records: int, reasons: dict[str, int]) -> None:
    """No row was usable and every one lacked a required field: the format or columns are wrong."""
    if rows and not records and reasons.get("missing_field", 0) == rows:
        raise UserError(
            f"{source.path}: no row has the fields format {source.format!r} needs ({rows} rows, each missing a "
            "required field). Map your column names with --column/columns, or set the format explicitly."
        )


def parse(index: int, raw: Any, source: Source) -> Item:
    """The record (or reject) of one raw row, by the same parsers ``read_records`` uses."""
    ctx = _f._Ctx(path=source.path, row=index, raw=raw)
    try:
        obj = _f._rename(_f._as_object(raw), source.columns)
        record = _f._with_weight(obj, _f._PARSERS[source.format](obj, ctx, source.columns))
    except _f._RowError as err:
        return Item(index, raw, None, err.to_reject(ctx))
    return Item(index, raw, record, None)


def _rows(p: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    ext = p.suffix.lower()
    if ext == ".txt":
        yield from _stream_lines(p, limit, as_text=True)
    elif ext == ".jsonl":
        yield from _stream_lines(p, limit, as_text=False)
    else:
        yield from _f._iter_rows(p, ext, limit)


def _stream_lines(p: Path, limit: int | None, *, as_text: bool) -> Iterator[tuple[int, Any]]:
    seen = 0
    try:
        with p.open("r", encoding="utf-8-sig") as fh:
            for index, line in enumerate(fh):
                if limit is not None and seen >= limit:
                    return
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                seen += 1
                if as_text:
                    yield index, {"text": line}
                    continue
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as err:
                    yield index, _f._BadLine(line[:500], f"{err.msg} at column {err.colno}")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{p}: the file is not UTF-8 text (got byte 0x{err.object[err.start]:02x}). "
            "Re-save it as UTF-8, e.g. `iconv -f GBK -t UTF-8 in.jsonl > out.jsonl`."
        ) from err


# --------------------------------------------------------------------------- record text


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
    """Write raw rows to ``path`` in the format its extension names, atomically.

    ``.jsonl`` and ``.json`` stream to a temp file in the same folder; ``.csv`` and ``.parquet``
    collect the rows first. Nothing appears at ``path`` until :meth:`close` succeeds.
    """

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
        self._rows: list[Any] = []
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
            self._rows.append(raw)
        self.count += 1

    def close(self) -> Path:
        try:
            if self.ext == ".json":
                self._fh.write("\n]\n")
            elif self.ext == ".csv":
                self._fh.write(_csv_text(self._rows))
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            if self.ext == ".parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(self._rows), self._tmp)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _csv_text(rows: list[Any]) -> str:
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(names))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                         for k, v in r.items()})
    return buf.getvalue()


def write_rows(path: str | Path, rows, *, protect: list[Path] | None = None) -> int:
    """Write raw rows atomically; returns how many."""
    with RowWriter(path, protect=protect) as w:
        for r in rows:
            w.write(r)
    return w.count


def output_path(out_dir: Path, name: str, like: Path) -> Path:
    """``<out_dir>/<name><the input's extension>`` (``.jsonl`` for ``.txt`` inputs with metadata)."""
    return Path(out_dir) / f"{name}{like.suffix.lower()}"
