"""The one reader of data files: rows streamed from a file, each parsed into a canonical
:class:`~tunelab.data.records.Record` by the parser of its *format*.

:func:`open_source` checks the file and detects its format (:data:`DETECT`); :meth:`Source.items`
streams ``(raw row, record or reject)`` items (:func:`raw_rows`, then :data:`PARSERS`), which the
``data`` verbs use to rewrite files in their own format; :func:`read_records`, what training reads,
is ``list(items())`` with the whole-file checks. Files are parsed with the standard library
(``json`` through :mod:`tunelab.data.jsonread`, ``csv``) and pyarrow (``.parquet``). The formats:

* ``alpaca``: ``instruction``, ``input``, ``output``, optional ``system`` and ``history``
  (a list of ``[user, assistant]`` pairs that become earlier turns);
* ``sharegpt``: ``conversations`` (a list of ``{from, value}``), optional ``system``, ``tools``;
* ``messages``: OpenAI style ``messages`` (a list of ``{role, content}``), optional ``tools``;
* ``text``: a ``text`` field (or a ``.txt`` file, one document per non-empty line);
* ``classification``: ``text`` plus ``label`` and/or ``label_text``;
* ``preference``: a prompt (``conversations``, ``messages``, ``instruction`` + ``input``, or
  ``prompt``) plus a ``chosen`` and a ``rejected`` reply (a string, a turn, or a list of one turn);
  the record's messages end with the chosen reply, ``meta["rejected"]`` holds the other;
* ``kto``: a whole chat (``messages`` or ``conversations``) plus a boolean ``label`` (desirable or
  not), in ``meta["desirable"]``.

Two kinds of problems, two ways of reporting them:

* a problem with the whole file (missing, empty, not UTF-8, not JSON, unknown extension, no
  row has the fields the format needs) raises :class:`~tunelab.errors.UserError`;
* a problem with one row never stops the read and is never silent: the row becomes a
  :class:`~tunelab.data.records.Reject` with a short ``reason`` code and a one-line ``detail``.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data import jsonread
from tunelab.data.records import ROLES, Message, Record, Reject
from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_text

FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "messages", "text", "classification", "preference", "kto")
#: The formats whose records are preference data (pairs, or KTO's unpaired judgements).
PREFERENCE_FORMATS: tuple[str, ...] = ("preference", "kto")
EXTENSIONS: tuple[str, ...] = (".json", ".jsonl", ".csv", ".parquet", ".txt")

#: Canonical field names a ``columns:`` mapping may rename. The first group are row keys,
#: the second keys inside one turn of ``conversations`` / ``messages``.
ROW_FIELDS: tuple[str, ...] = (
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "conversations",
    "messages",
    "tools",
    "text",
    "label",
    "label_text",
    "prompt",
    "chosen",
    "rejected",
)
TURN_FIELDS: tuple[str, ...] = ("from", "value", "role", "content")

#: ShareGPT speaker names and the canonical role each one becomes.
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}

#: Format detection: the first format whose rule holds for the file's first object row (canonical keys).
DETECT: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...] = (
    ("preference", lambda row: {"chosen", "rejected"} <= row.keys()),
    ("kto", lambda row: bool(row.keys() & {"messages", "conversations"}) and isinstance(row.get("label"), bool)),
    ("sharegpt", lambda row: "conversations" in row),
    ("messages", lambda row: "messages" in row),
    ("alpaca", lambda row: "instruction" in row),
    ("classification", lambda row: "text" in row and bool(row.keys() & {"label", "label_text"})),
    ("text", lambda row: "text" in row),
)

_RAW_LIMIT = 500
_FORMAT_HINT = f"Set `format:` to one of {', '.join(FORMATS)}"


@dataclass
class ReadResult:
    """What :func:`read_records` found in one file."""

    records: list[Record]
    rejects: list[Reject]
    format: str  # the format used (detected when ``format="auto"``)
    path: str
    rows: int  # rows seen (records + rejects)


# --------------------------------------------------------------------------- public API


@dataclass
class Item:
    """One row of a file: its index, the raw row (as the file has it), and its record or its reject."""

    index: int
    raw: Any
    record: Record | None
    reject: Reject | None
    missing: str = ""  # the required field the row lacks (a ``missing_field`` reject)


@dataclass
class Source:
    """An opened data file: its path, format (detected or given) and column mapping. :meth:`items` is
    the one reader: training reads ``list(items())`` (:func:`read_records`), the ``data`` verbs stream it."""

    path: Path
    format: str
    columns: dict[str, str]
    limit: int | None = None

    def items(self) -> Iterator[Item]:
        """Every row of the file, parsed (a fresh pass each call)."""
        for index, raw in raw_rows(self.path, self.limit):
            yield parse(index, raw, self)


def open_source(path: str | Path, format: str = "auto", columns: dict[str, str] | None = None,
                limit: int | None = None) -> Source:
    """Check the file and the settings, and detect the format from the keys of the first row that is a
    JSON object (:data:`DETECT`)."""
    p = Path(path)
    if format != "auto" and format not in FORMATS:
        raise UserError(f"data.format: unknown format (got {format!r}). Use auto or one of {', '.join(FORMATS)}.")
    cols = _check_columns(columns)
    check_file(p)
    if p.suffix.lower() == ".txt":
        if format not in ("auto", "text"):
            raise UserError(
                f"{p}: a .txt file is read as plain text, one document per line (got format {format!r}). "
                "Set `format: text` (or auto), or convert the file to .jsonl."
            )
        if next(raw_rows(p, 1), None) is None:
            raise UserError(f"{p}: the file is empty (got only whitespace). Point at a file with rows.")
        return Source(p, "text", cols, limit)
    head: list[tuple[int, Any]] = []
    for index, raw in raw_rows(p, limit):
        head.append((index, raw))
        if isinstance(raw, dict):
            break
    if not head:
        raise UserError(f"{p}: the file is empty (got only whitespace). Point at a file with rows.")
    if not isinstance(head[-1][1], dict) and p.suffix.lower() == ".jsonl":
        raise UserError(_not_jsonl_message(p, head))
    return Source(p, format if format != "auto" else _detect_format(p, head, cols), cols, limit)


def parse(index: int, raw: Any, source: Source) -> Item:
    """The record (or reject) of one raw row of ``source``."""
    ctx = _Ctx(path=source.path, row=index, raw=raw)
    try:
        obj = _rename(_as_object(raw), source.columns)
        record = _with_weight(obj, PARSERS[source.format](obj, ctx, source.columns))
    except _RowError as err:
        return Item(index, raw, None, err.to_reject(ctx), err.field if err.reason == "missing_field" else "")
    return Item(index, raw, record, None)


def check_usable(source: Source, rows: int, records: int, reasons: dict[str, int]) -> None:
    """No row was usable and every one lacked a required field: the format or the columns are wrong (a
    :class:`UserError` naming the field, or the mapped column the file does not have)."""
    if not rows or records or reasons.get("missing_field", 0) != rows:
        return
    index, first = next(((i, r) for i, r in raw_rows(source.path, source.limit) if isinstance(r, dict)), (0, {}))
    _check_mapping(source.path, first, source.columns)
    missing = parse(index, first, source).missing or "?"
    raise UserError(
        f"{source.path}: no row has the fields format {source.format!r} needs (got keys {_show(sorted(first))}; "
        f"{missing!r} is missing in all {rows} rows). Map your column names with `columns:` (--column), "
        f"e.g. columns: {{{missing}: <your column>}}, or {_FORMAT_HINT[0].lower()}{_FORMAT_HINT[1:]}."
    )


def read_records(
    path: str | Path,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    limit: int | None = None,
) -> ReadResult:
    """Read one ``.json``/``.jsonl``/``.csv``/``.parquet``/``.txt`` file into records: ``list`` of
    :meth:`Source.items`, with the whole-file checks.

    ``format="auto"`` detects the format from the keys of the first row that is a JSON
    object. ``columns`` maps canonical field names to the file's own names, for example
    ``{"instruction": "question", "output": "answer"}`` or
    ``{"conversations": "dialog", "from": "speaker", "value": "text"}``. ``limit`` stops
    after that many rows.
    """
    source = open_source(path, format, columns, limit)
    items = list(source.items())
    if source.path.suffix.lower() == ".jsonl" and not any(isinstance(i.raw, dict) for i in items):
        raise UserError(_not_jsonl_message(source.path, [(i.index, i.raw) for i in items]))
    records = [i.record for i in items if i.record is not None]
    rejects = [i.reject for i in items if i.reject is not None]
    check_usable(source, len(items), len(records), summarize_rejects(rejects))
    return ReadResult(records=records, rejects=rejects, format=source.format, path=str(source.path), rows=len(items))


def write_rejects(rejects: list[Reject], path: Path, *, replace: bool = False) -> None:
    """Append ``rejects`` to ``path`` as JSON Lines (one :meth:`Reject.to_dict` per line); with ``replace``,
    write the file anew, atomically (a run's data rejects: a resumed run makes the same ones again)."""
    path = Path(path)
    if replace:
        atomic_write_text(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rejects))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for reject in rejects:
            fh.write(json.dumps(reject.to_dict(), ensure_ascii=False) + "\n")


def summarize_rejects(rejects: list[Reject]) -> dict[str, int]:
    """Count rejects per ``reason``, most frequent first."""
    return dict(Counter(r.reason for r in rejects).most_common())


# --------------------------------------------------------------------------- row errors


@dataclass
class _Ctx:
    path: Path
    row: int
    raw: Any

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.row}"


class _RowError(Exception):
    """One row is unusable; becomes a :class:`Reject` (never escapes this module)."""

    def __init__(self, reason: str, field: str, value: Any, what: str, fix: str):
        super().__init__(what)
        self.reason, self.field, self.value, self.what, self.fix = reason, field, value, what, fix

    def to_reject(self, ctx: _Ctx) -> Reject:
        where = f"{ctx.path.name} row {ctx.row}" + (f", field '{self.field}'" if self.field else "")
        detail = f"{where}: {self.what} (got {_show(self.value)}). {self.fix}."
        raw = ctx.raw.line if isinstance(ctx.raw, BadLine) else _show(ctx.raw, _RAW_LIMIT)
        return Reject(source=str(ctx.path), row=ctx.row, reason=self.reason, detail=detail, raw=raw)


def _show(value: Any, limit: int = 80) -> str:
    """A one-line, truncated rendering of a value for messages."""
    if value is _MISSING:
        return "nothing"
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


# --------------------------------------------------------------------------- files → rows


def _as_object(row: Any) -> dict[str, Any]:
    """The row as a JSON object, or the row's reject."""
    if isinstance(row, BadLine):
        raise _RowError(
            "bad_json",
            "",
            row.line,
            f"the line is not valid JSON ({row.error})",
            "Fix the JSON syntax or remove the line",
        )
    if not isinstance(row, dict):
        raise _RowError(
            "wrong_type", "", row, "the row is not a JSON object", "Write each row as an object {...}"
        )
    return row


# A JSON Lines line that did not parse: a row that becomes a ``bad_json`` reject.
BadLine = jsonread.BadLine


def check_file(p: Path) -> None:
    if not p.exists():
        hint = ""
        if p.parent.is_dir():
            close = difflib.get_close_matches(p.name, [c.name for c in p.parent.iterdir()], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"{p}: file not found (got path {str(p)!r}). Check the path.{hint}")
    if p.is_dir():
        names = sorted(c.name for c in p.iterdir() if c.suffix.lower() in EXTENSIONS)[:5]
        raise UserError(
            f"{p}: is a directory, not a data file (got a folder with {len(names)} data file(s)"
            f"{': ' + ', '.join(names) if names else ''}). Point at one file."
        )
    if p.suffix.lower() not in EXTENSIONS:
        raise UserError(
            f"{p}: unsupported file type (got {p.suffix or 'no extension'!r}). "
            f"Use one of {', '.join(EXTENSIONS)}, e.g. convert it to JSON Lines."
        )
    try:
        size = p.stat().st_size
        with p.open("rb"):
            pass
    except OSError as err:
        raise UserError(
            f"{p}: cannot read the file (got {err.strerror or err}). Check its permissions."
        ) from err
    if size == 0:
        raise UserError(f"{p}: the file is empty (got 0 bytes). Point at a file with rows.")


def _read_text(p: Path) -> str:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{p}: the file is not UTF-8 text (got byte 0x{data[err.start]:02x} at offset {err.start}). "
            "Re-save it as UTF-8, e.g. `iconv -f GBK -t UTF-8 in.jsonl > out.jsonl`."
        ) from err
    if not text.strip():
        raise UserError(f"{p}: the file is empty (got only whitespace). Point at a file with rows.")
    return text


def raw_rows(p: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    """``(row index, row)`` of any data file, streamed so that memory does not grow with the file; a
    row is a parsed value or a :class:`BadLine`.

    JSON Lines and ``.txt`` line by line, and a ``.json`` top-level array element by element, through
    :mod:`tunelab.data.jsonread` (strict: text after the array is an error, never ignored); ``.csv``
    with the ``csv`` module's reader; ``.parquet`` in record batches. A ``.json`` file that is not an
    array (e.g. JSON Lines saved as ``.json``) is read whole.
    """
    ext = p.suffix.lower()
    if ext == ".txt":
        yield from jsonread.iter_lines(p, limit, as_text=True)
    elif ext == ".jsonl":
        yield from jsonread.iter_lines(p, limit, as_text=False)
    elif ext == ".csv":
        yield from _stream_csv(p, limit)
    elif ext == ".parquet":
        yield from _stream_parquet(p, limit)
    elif jsonread.first_char(p) == "[":
        yield from jsonread.iter_json_array(p, limit)
    else:
        yield from _read_json(p, _read_text(p), limit)


def _stream_csv(p: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    """CSV rows as dicts (header = keys), one at a time."""
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
                raise UserError(f"{p}: the CSV file has a header but no rows (got {_show(reader.fieldnames)}). "
                                "Add rows.")
    except csv.Error as err:
        raise UserError(f"{p}: not valid CSV (got {err}). Check quoting; the first line must be a header.") from err
    except UnicodeDecodeError as err:
        raise jsonread.not_utf8(p) from err


def _stream_parquet(p: Path, limit: int | None, batch_size: int = 4096) -> Iterator[tuple[int, Any]]:
    """Parquet rows as dicts, one record batch (``batch_size`` rows) in memory at a time."""
    import pyarrow as pa  # the [data] / parquet path only
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


def _read_json(p: Path, text: str, limit: int | None) -> list[tuple[int, Any]]:
    """A ``.json`` file that is not an array: JSON Lines, else a :class:`UserError`."""
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as err:
        data, error = _MISSING, err
    else:
        error = None
    # JSON Lines saved as .json? Only if the file is one JSON value per line from its first line
    # on; a pretty-printed document must not half-parse line by line.
    one_line = error is None and isinstance(data, dict) and "\n" not in text.strip()
    rows = _read_jsonl(text, limit) if error is not None or one_line else []
    if rows and isinstance(rows[0][1], dict):
        return rows
    if error is not None and error.msg == "Extra data":
        at = jsonread.byte_offset(p, error.pos)
        raise UserError(
            f"{p}: unexpected data after the JSON value at byte {at} (got {_show(text[error.pos : error.pos + 40])}). "
            "A .json file holds one list [{...}, ...] of rows: put every row in that one list, or write JSON "
            "Lines (one object per line)."
        )
    if error is not None:
        raise UserError(
            f"{p}: not valid JSON and not JSON Lines either (got {error.msg} at line {error.lineno} "
            f"column {error.colno}). Fix the syntax: a .json file holds one list [{{...}}, ...] of rows."
        )
    if isinstance(data, list):  # an array that first_char missed (over 64 KiB of leading space)
        return list(jsonread.iter_json_array(p, limit))
    what = (
        f"an object with keys {_show(sorted(data))}"
        if isinstance(data, dict)
        else f"a JSON {type(data).__name__}"
    )
    raise UserError(
        f"{p}: the top level is not a list of rows (got {what}). "
        "Put the rows in a top-level list [{...}, ...], or write JSON Lines (one object per line)."
    )


def _read_jsonl(text: str, limit: int | None) -> list[tuple[int, Any]]:
    """JSON Lines rows of ``text``, split as the streaming reader splits a file."""
    return list(jsonread.line_rows(jsonread.text_lines(text), limit, as_text=False))


def _not_jsonl_message(p: Path, rows: list[tuple[int, Any]]) -> str:
    first = rows[0][1] if rows else None
    got = f"line {rows[0][0] + 1}: {first.error}" if isinstance(first, BadLine) else f"{_show(first)}"
    return (
        f"{p}: no line is a JSON object (got {got}). "
        "Write JSON Lines: one object {...} per line, or a .json file holding a list."
    )


# --------------------------------------------------------------------------- columns and detection


def _check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    if not columns:
        return {}
    known = ROW_FIELDS + TURN_FIELDS
    for canonical, name in columns.items():
        if canonical not in known:
            close = difflib.get_close_matches(canonical, known, n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise UserError(
                f"data.columns: unknown canonical field (got {canonical!r}). {hint}"
                f"Keys are the canonical names ({', '.join(known)}); values are your column names."
            )
        if not isinstance(name, str) or not name:
            raise UserError(
                f"data.columns.{canonical}: the column name must be a non-empty string (got {name!r})."
            )
    return dict(columns)


def _rename(row: dict[str, Any], cols: dict[str, str]) -> dict[str, Any]:
    """Expose the user's row keys under their canonical names (the mapping wins on clashes)."""
    renamed = {c: u for c, u in cols.items() if c in ROW_FIELDS and c != u}
    if not renamed:
        return row
    out = dict(row)
    for canonical, user in renamed.items():
        out.pop(canonical, None)
        if user in row:
            out[canonical] = row[user]
    return out


def _check_mapping(p: Path, first: dict[str, Any], cols: dict[str, str]) -> None:
    """A ``columns:`` mapping that names a column the file lacks is why no row can be read: say so."""
    absent = {c: u for c, u in cols.items() if c in ROW_FIELDS and c != u and u not in first}
    if not absent:
        return
    canonical, user = next(iter(absent.items()))
    already = f"; the file already has {canonical!r}, so drop that entry" if canonical in first else ""
    raise UserError(
        f"{p}: the column mapping columns: {{{canonical}: {user}}} names column {user!r}, which is not in the "
        f"file (got columns {_show(sorted(first))}). Map {canonical!r} to one of those columns{already}."
    )


def _detect_format(p: Path, rows: list[tuple[int, Any]], cols: dict[str, str]) -> str:
    first = next((r for _, r in rows if isinstance(r, dict)), None)
    if first is None:
        raise UserError(
            f"{p}: no row is a JSON object (got {_show(rows[0][1] if rows else None)}). {_FORMAT_HINT}."
        )
    row = _rename(first, cols)
    for fmt, has in DETECT:
        if has(row):
            return fmt
    _check_mapping(p, first, cols)
    raise UserError(
        f"{p}: cannot tell the data format from the keys of the first row (got {_show(sorted(first))}). "
        f"{_FORMAT_HINT} and map your column names with `columns:`, e.g. columns: {{instruction: question}}."
    )


# --------------------------------------------------------------------------- field helpers


def _get(row: dict[str, Any], key: str) -> Any:
    """The value under ``key``; ``None`` counts as missing."""
    value = row.get(key, _MISSING)
    return _MISSING if value is None else value


def _missing(key: str) -> _RowError:
    return _RowError(
        "missing_field",
        key,
        _MISSING,
        f"required field {key!r} is missing",
        f"Add {key!r} to the row, or map your column with columns: {{{key}: <column>}}",
    )


def _required_str(row: dict[str, Any], key: str) -> str:
    value = _get(row, key)
    if value is _MISSING:
        raise _missing(key)
    if not isinstance(value, str):
        raise _RowError(
            "wrong_type",
            key,
            value,
            f"{key!r} must be a string, not {type(value).__name__}",
            f"Write {key!r} as text",
        )
    return value


def _optional_str(row: dict[str, Any], key: str) -> str | None:
    value = _get(row, key)
    if value is _MISSING or value == "":
        return None
    if not isinstance(value, str):
        raise _RowError(
            "wrong_type",
            key,
            value,
            f"{key!r} must be a string, not {type(value).__name__}",
            f"Write {key!r} as text or leave it out",
        )
    return value


def _with_weight(row: dict[str, Any], record: Record) -> Record:
    """An optional ``weight`` column (a number >= 0) scales the row's share of the loss."""
    value = row.get("weight")
    if value is None or value == "":
        return record
    try:
        weight = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        weight = float("nan")
    if not math.isfinite(weight) or weight < 0:
        raise _RowError("bad_weight", "weight", value, "'weight' must be a finite number >= 0",
                        "Write the row's loss weight as a number such as 1.5, or leave it out")
    return dataclasses.replace(record, weight=weight)


def json_value(value: Any) -> Any:
    """Nested fields in CSV files arrive as JSON text: decode them (other values as they are)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _tools(row: dict[str, Any]) -> str | None:
    """``tools`` as a JSON string: JSON text is checked, a JSON value is serialised."""
    value = _get(row, "tools")
    if value is _MISSING or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise _RowError(
                "bad_tools",
                "tools",
                value,
                f"'tools' is not valid JSON ({err.msg})",
                "Write tools as a JSON list of function schemas",
            ) from err
    else:
        parsed = value
    if not isinstance(parsed, (list, dict)):
        raise _RowError(
            "bad_tools",
            "tools",
            value,
            "'tools' must be a JSON list or object",
            "Write tools as a JSON list of function schemas",
        )
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _check_turns(messages: list[Message], key: str) -> None:
    """Shared rules for every chat format: order, an answer to train on, no empty answers."""
    for index, message in enumerate(messages):
        if message.role == "assistant" and not message.content.strip():
            raise _RowError(
                "empty_response",
                f"{key}[{index}]",
                message.content,
                "the assistant turn is empty",
                "Fill in the response or drop the row",
            )
    roles = [m.role for m in messages]
    if "assistant" not in roles:
        raise _RowError(
            "no_assistant_turn",
            key,
            roles,
            "the conversation has no assistant turn",
            "Add the assistant's answer, or use format: classification for labelled text",
        )
    if roles[-1] != "assistant":
        raise _RowError(
            "no_assistant_turn",
            key,
            roles,
            "the conversation does not end with an assistant turn",
            "End each conversation with the assistant's answer (drop trailing turns)",
        )
    first = next(r for r in roles if r != "system")
    if first == "assistant":
        raise _RowError(
            "bad_turn_order",
            key,
            roles,
            "the conversation starts with an assistant turn",
            "Start with a user turn (after an optional system turn)",
        )


# --------------------------------------------------------------------------- formats


def _alpaca(row: dict[str, Any], ctx: _Ctx, cols: dict[str, str]) -> Record:
    instruction = _required_str(row, "instruction")
    extra = _optional_str(row, "input")
    output = _get(row, "output")
    if output is _MISSING:
        raise _missing("output")
    if not isinstance(output, str):
        raise _RowError(
            "wrong_type",
            "output",
            output,
            f"'output' must be a string, not {type(output).__name__}",
            "Write one response as text (preference pairs are not SFT data)",
        )
    if not output.strip():
        raise _RowError(
            "empty_response", "output", output, "'output' is empty", "Fill in the response or drop the row"
        )
    prompt = "\n".join(part for part in (instruction, extra) if part)
    if not prompt.strip():
        raise _RowError(
            "empty_prompt",
            "instruction",
            instruction,
            "'instruction' and 'input' are both empty",
            "Fill in the instruction or drop the row",
        )
    messages: list[Message] = []
    system = _optional_str(row, "system")
    if system:
        messages.append(Message("system", system))
    messages += _history(row)
    messages += [Message("user", prompt), Message("assistant", output)]
    _check_turns(messages, "history")
    return Record(id=ctx.id, messages=tuple(messages), source=str(ctx.path))


def _history(row: dict[str, Any]) -> list[Message]:
    value = json_value(_get(row, "history"))
    if value is _MISSING or value == "":
        return []
    fix = "Write history as a list of [user, assistant] pairs of strings"
    if not isinstance(value, list):
        raise _RowError("bad_history", "history", value, "'history' must be a list of pairs", fix)
    messages: list[Message] = []
    for index, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise _RowError(
                "bad_history",
                f"history[{index}]",
                pair,
                "a history item is not a [user, assistant] pair",
                fix,
            )
        if not pair[1].strip():
            raise _RowError(
                "empty_response",
                f"history[{index}][1]",
                pair[1],
                "the assistant turn is empty",
                "Fill in the response or drop the row",
            )
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    return messages


def _turn_list(row: dict[str, Any], key: str) -> list[Any]:
    value = json_value(_get(row, key))
    if value is _MISSING:
        raise _missing(key)
    if not isinstance(value, list):
        raise _RowError(
            "wrong_type",
            key,
            value,
            f"{key!r} must be a list of turns, not {type(value).__name__}",
            f"Write {key!r} as a list of turn objects",
        )
    if not value:
        raise _RowError(
            "no_assistant_turn", key, value, "the conversation is empty", "Add the turns or drop the row"
        )
    return value


def _sharegpt_turns(row: dict[str, Any], cols: dict[str, str]) -> list[Message]:
    """The optional ``system`` and the ``conversations`` turns of a row, unchecked."""
    who, what = cols.get("from", "from"), cols.get("value", "value")
    messages: list[Message] = []
    system = _optional_str(row, "system")
    if system:
        messages.append(Message("system", system))
    for index, turn in enumerate(_turn_list(row, "conversations")):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise _RowError(
                "wrong_type",
                where,
                turn,
                "a turn is not an object",
                f"Write each turn as {{{who!r}: ..., {what!r}: ...}}",
            )
        speaker = _get(turn, who)
        if speaker is _MISSING:
            raise _RowError(
                "missing_field",
                f"{where}.{who}",
                turn,
                f"the turn has no {who!r}",
                f"Add {who!r} or map your key with columns: {{from: <key>}}",
            )
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise _RowError(
                "unknown_role",
                f"{where}.{who}",
                speaker,
                "unknown speaker",
                f"Use one of {', '.join(SHAREGPT_ROLES)}",
            )
        messages.append(Message(role, _turn_text(turn, what, f"{where}.{what}")))  # type: ignore[arg-type]
    return messages


def _sharegpt(row: dict[str, Any], ctx: _Ctx, cols: dict[str, str]) -> Record:
    messages = _sharegpt_turns(row, cols)
    _check_turns(messages, "conversations")
    return Record(id=ctx.id, messages=tuple(messages), tools=_tools(row), source=str(ctx.path))


def _message_turns(row: dict[str, Any], cols: dict[str, str], key: str = "messages") -> list[Message]:
    """The OpenAI-style turns under ``key``, unchecked."""
    role_key, content_key = cols.get("role", "role"), cols.get("content", "content")
    messages: list[Message] = []
    for index, turn in enumerate(_turn_list(row, key)):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise _RowError(
                "wrong_type",
                where,
                turn,
                "a message is not an object",
                f"Write each message as {{{role_key!r}: ..., {content_key!r}: ...}}",
            )
        role = _get(turn, role_key)
        if role is _MISSING:
            raise _RowError(
                "missing_field",
                f"{where}.{role_key}",
                turn,
                f"the message has no {role_key!r}",
                f"Add {role_key!r} or map your key with columns: {{role: <key>}}",
            )
        if role not in ROLES:
            raise _RowError(
                "unknown_role", f"{where}.{role_key}", role, "unknown role", f"Use one of {', '.join(ROLES)}"
            )
        if _get(turn, content_key) is _MISSING and turn.get("tool_calls"):
            content = json.dumps([c.get("function", c) for c in turn["tool_calls"]], ensure_ascii=False)
        else:
            content = _turn_text(turn, content_key, f"{where}.{content_key}")
        messages.append(Message(role, content))
    return messages


def _messages(row: dict[str, Any], ctx: _Ctx, cols: dict[str, str]) -> Record:
    messages = _message_turns(row, cols)
    _check_turns(messages, "messages")
    return Record(id=ctx.id, messages=tuple(messages), tools=_tools(row), source=str(ctx.path))


def _turn_text(turn: dict[str, Any], key: str, where: str) -> str:
    """A turn's text: a string, or a list of text parts (``{"type": "text", "text": ...}``) joined."""
    value = _get(turn, key)
    if value is _MISSING:
        raise _RowError(
            "missing_field",
            where,
            turn,
            f"the turn has no {key!r}",
            f"Add {key!r} or map your key with columns",
        )
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                text = part.get("text", part.get("value"))
                if not isinstance(text, str):
                    break
                parts.append(text)
            else:
                break
        else:
            return "\n".join(parts)
    raise _RowError(
        "wrong_type",
        where,
        value,
        "the content must be text or a list of text parts",
        "Only text content is supported; drop images/audio parts",
    )


def _text(row: dict[str, Any], ctx: _Ctx, cols: dict[str, str]) -> Record:
    text = _required_str(row, "text")
    if not text.strip():
        raise _RowError("empty_text", "text", text, "'text' is empty", "Drop the row")
    return Record(id=ctx.id, text=text, source=str(ctx.path))


def _classification(row: dict[str, Any], ctx: _Ctx, cols: dict[str, str]) -> Record:
    text = _required_str(row, "text")
    if not text.strip():
        raise _RowError("empty_text", "text", text, "'text' is empty", "Drop the row")
    label: Any = _get(row, "label_text")
    if label is _MISSING or label == "":
        label = _get(row, "label")
    if label is _MISSING or label == "":
        raise _RowError(
            "missing_field",
            "label",
            _MISSING,
            "required field 'label' (or 'label_text') is missing",
            "Add a label, or map your column with columns: {label: <column>}",
        )
    if not isinstance(label, (str, int, float)):
        raise _RowError(
            "wrong_type",
            "label",
            label,
            f"the label must be a string or number, not {type(label).__name__}",
            "Write one label per row",
        )
    return Record(id=ctx.id, messages=(Message("user", text),), label=str(label), source=str(ctx.path))


def _prompt_turns(row: dict[str, Any], cols: dict[str, str]) -> tuple[list[Message], str]:
    """The prompt of a preference row and the field it came from: ``conversations`` (ShareGPT),
    ``messages`` (OpenAI), ``instruction`` + ``input`` (alpaca) or ``prompt`` (text or turns)."""
    if _get(row, "conversations") is not _MISSING:
        return _sharegpt_turns(row, cols), "conversations"
    if _get(row, "messages") is not _MISSING:
        system = _optional_str(row, "system")
        return [Message("system", system)] * bool(system) + _message_turns(row, cols), "messages"
    system = _optional_str(row, "system")
    head = [Message("system", system)] if system else []
    if _get(row, "instruction") is not _MISSING:
        text = "\n".join(p for p in (_required_str(row, "instruction"), _optional_str(row, "input")) if p)
        return head + _history(row) + ([Message("user", text)] if text.strip() else []), "instruction"
    prompt = json_value(_get(row, "prompt"))
    if isinstance(prompt, list):
        return head + _message_turns(row, cols, "prompt"), "prompt"
    if isinstance(prompt, str):
        return head + ([Message("user", prompt)] if prompt.strip() else []), "prompt"
    raise _RowError("missing_prompt", "prompt", prompt, "the pair has no prompt (no conversations, messages, "
                    "instruction or prompt field)", "Add the prompt, or map your column with columns: {prompt: <column>}")


def _reply(row: dict[str, Any], key: str, cols: dict[str, str]) -> str:
    """A reply of a preference row: text, a turn (``{from, value}`` / ``{role, content}``) or a list of one turn."""
    value = json_value(_get(row, key))
    if value is _MISSING:
        raise _missing(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role_key = next((k for k in (cols.get("from", "from"), cols.get("role", "role")) if k in value), None)
        role = value.get(role_key) if role_key else "assistant"
        if SHAREGPT_ROLES.get(role) != "assistant":
            raise _RowError("wrong_role", f"{key}.{role_key}", role, f"the {key} reply is not an assistant turn",
                            "Give the reply as the assistant's turn (or as plain text)")
        text_key = next((k for k in (cols.get("value", "value"), cols.get("content", "content")) if k in value),
                        cols.get("value", "value"))
        value = _turn_text(value, text_key, f"{key}.{text_key}")
    if not isinstance(value, str):
        raise _RowError("wrong_type", key, value, f"{key!r} must be text, an assistant turn or a list of one turn",
                        f"Write {key!r} as the reply's text")
    if not value.strip():
        raise _RowError("empty_response", key, value, f"the {key} reply is empty", "Fill in the reply or drop the pair")
    return value


def _preference(row: dict[str, Any], ctx: _Ctx, cols: dict[str, str]) -> Record:
    prompt, key = _prompt_turns(row, cols)
    if not any(m.role == "user" and m.content.strip() for m in prompt):
        raise _RowError("missing_prompt", key, _get(row, key), "the prompt has no user turn with text",
                        "Fill in the prompt or drop the pair")
    if prompt[-1].role == "assistant":
        raise _RowError("bad_turn_order", key, [m.role for m in prompt], "the prompt ends with an assistant turn",
                        "End the prompt with the user's turn; the replies are in chosen and rejected")
    chosen, rejected = _reply(row, "chosen", cols), _reply(row, "rejected", cols)
    if chosen.strip() == rejected.strip():
        raise _RowError("identical_pair", "rejected", rejected, "chosen and rejected are the same reply",
                        "Drop the pair: it carries no preference")
    messages = [*prompt, Message("assistant", chosen)]
    _check_turns(messages, key)
    return Record(id=ctx.id, messages=tuple(messages), tools=_tools(row), source=str(ctx.path),
                  meta={"rejected": rejected})


def _kto(row: dict[str, Any], ctx: _Ctx, cols: dict[str, str]) -> Record:
    if _get(row, "conversations") is not _MISSING:
        messages, key = _sharegpt_turns(row, cols), "conversations"
    else:
        messages, key = _message_turns(row, cols), "messages"
    _check_turns(messages, key)
    label = _get(row, "label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"
    if label is _MISSING or not isinstance(label, (bool, int)) or label not in (0, 1):
        raise _RowError("bad_label", "label", label, "'label' must be true (desirable) or false (undesirable)",
                        "Write label as a boolean")
    return Record(id=ctx.id, messages=tuple(messages), tools=_tools(row), source=str(ctx.path),
                  meta={"desirable": bool(label)})


#: Format name -> the parser of one row (a JSON object with canonical keys) into a :class:`Record`.
PARSERS = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "text": _text,
    "classification": _classification,
    "preference": _preference,
    "kto": _kto,
}

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "PARSERS",
    "BadLine",
    "DETECT",
    "Item",
    "PREFERENCE_FORMATS",
    "ReadResult",
    "Source",
    "check_file",
    "check_usable",
    "open_source",
    "parse",
    "raw_rows",
    "read_records",
    "summarize_rejects",
    "write_rejects",
]
