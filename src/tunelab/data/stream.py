"""Rows of a data file one at a time, with the file's own raw row kept beside its record.

The workbench (clean, split, augment, weights) rewrites files *in their own format*: it changes
the raw row (a dict as the file has it, column names and extra keys included) and writes it
back, and uses the canonical :class:`~tunelab.data.records.Record` parsed from it (by the
readers of :mod:`tunelab.data.formats`, same rules, same rejects) to judge it.

Every format is streamed, so memory does not grow with the file: JSON Lines and ``.txt`` line by
line, ``.csv`` with the ``csv`` module's reader, ``.parquet`` in record batches
(``pyarrow.parquet.ParquetFile.iter_batches``), and a ``.json`` top-level array element by
element. JSON and JSON Lines go through :mod:`tunelab.data.jsonread`, the one strict parser the
whole-file readers of ``formats`` use too (text after a ``.json`` array is an error, never
ignored). A ``.json`` file that is not an array (e.g. JSON Lines saved as ``.json``) is read
whole by the readers in ``formats``. Writers are atomic (temp file + rename), refuse to write over the input
file, and stream too: ``.csv`` and ``.parquet`` rows are spooled to a temporary JSON Lines
file and converted at :meth:`RowWriter.close` (Parquet in batches with one unified schema).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data import formats as _f
from tunelab.data import jsonread
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
        if source.columns:  # a mapping that names a column the file lacks: say which
            first = next((raw for _, raw in _rows(source.path, source.limit) if isinstance(raw, dict)), {})
            _f._check_mapping(source.path, first, source.columns)
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
    """Raw rows of any file; JSON and JSON Lines through :mod:`tunelab.data.jsonread`, the parser
    the whole-file readers use too."""
    ext = p.suffix.lower()
    if ext == ".txt":
        yield from jsonread.iter_lines(p, limit, as_text=True)
    elif ext == ".jsonl":
        yield from jsonread.iter_lines(p, limit, as_text=False)
    elif ext == ".csv":
        yield from _stream_csv(p, limit)
    elif ext == ".parquet":
        yield from _stream_parquet(p, limit)
    else:  # .json: an array streamed, anything else read whole (e.g. JSON Lines saved as .json)
        yield from _f._iter_rows(p, ext, limit)


def _stream_csv(p: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    """CSV rows as dicts (header = keys), like ``formats._read_csv`` but one row at a time."""
    seen = 0
    try:
        with p.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            for index, row in enumerate(reader):
                if limit is not None and index >= limit:
                    return
                seen += 1
                yield index, {k: v for k, v in row.items() if k is not None}
            if not seen:
                raise UserError(f"{p}: the CSV file has a header but no rows (got {_f._show(reader.fieldnames)}). "
                                "Add rows.")
    except csv.Error as err:
        raise UserError(f"{p}: not valid CSV (got {err}). Check quoting; the first line must be a header.") from err
    except UnicodeDecodeError as err:
        raise jsonread.not_utf8(p) from err


def _stream_parquet(p: Path, limit: int | None, batch_size: int = 4096) -> Iterator[tuple[int, Any]]:
    """Parquet rows as dicts, one record batch (``batch_size`` rows) in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{p}: not a readable Parquet file (got {str(err).splitlines()[0]}). Re-export it.") from err
    if pf.metadata.num_rows == 0:
        raise UserError(f"{p}: the Parquet file has no rows (got columns {pf.schema_arrow.names}). Add rows.")
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                if limit is not None and index >= limit:
                    return
                yield index, row
                index += 1
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{p}: not a readable Parquet file (got {str(err).splitlines()[0]} at row {index}). "
                        "Re-export it.") from err


# The strict .json array reader (kept under its old names for callers of this module).
MAX_JSON_ROW = jsonread.MAX_JSON_ROW
_stream_json_array = jsonread.iter_json_array


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
