"""The one parser of JSON and JSON Lines data files, shared by every reader.

The one reader of data files (:func:`tunelab.data.formats.raw_rows`), the server's JSON Lines
inputs and ``predict`` read rows through these functions, so a file means the same rows everywhere:

* a ``.json`` top-level array is read element by element (:func:`iter_json_array`), strictly:
  anything but whitespace after its closing ``]`` (a second array, garbage) is a
  :class:`~tunelab.errors.UserError` naming the byte offset, never ignored;
* JSON Lines are split on ``\\n``, ``\\r\\n`` and ``\\r`` only (:func:`line_rows`): ``str.splitlines``
  would also split inside a row at U+2028, U+0085 or a form feed, which JSON strings may hold raw.
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

RAW_LIMIT = 500  # characters of a broken line kept for its reject
MAX_JSON_ROW = 64 * 2**20  # characters one element of a .json array may take (bounded reads)
_BOM = codecs.BOM_UTF8


@dataclass
class BadLine:
    """A JSON Lines line that did not parse (becomes a ``bad_json`` reject, never a crash)."""

    line: str
    error: str


def _show(text: str, limit: int = 40) -> str:
    """A short quoted rendering of file text for a one-line message (``repr`` escapes newlines)."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def not_utf8(p: Path) -> UserError:
    """The error for a file that is not UTF-8, naming the first bad byte and its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0
    with Path(p).open("rb") as fh:
        while True:
            block = fh.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                offset, byte = fed - pending + err.start, err.object[err.start]
                break
            if not block:  # decodes after all (the caller saw another error): no offset to name
                return UserError(f"{p}: the file is not UTF-8 text. Re-save it as UTF-8, "
                                 "e.g. `iconv -f GBK -t UTF-8 in.jsonl > out.jsonl`.")
            fed += len(block)
    return UserError(
        f"{p}: the file is not UTF-8 text (got byte 0x{byte:02x} at offset {offset}). "
        "Re-save it as UTF-8, e.g. `iconv -f GBK -t UTF-8 in.jsonl > out.jsonl`."
    )


def byte_offset(p: Path, chars: int) -> int:
    """The byte offset in ``p`` of character ``chars`` of its text (as read with ``newline=""``)."""
    with Path(p).open("rb") as fh:
        total = len(_BOM) if fh.read(len(_BOM)) == _BOM else 0
    with Path(p).open("r", encoding="utf-8-sig", newline="") as fh:
        while chars > 0:
            block = fh.read(min(chars, 1 << 20))
            if not block:
                break
            total += len(block.encode("utf-8"))
            chars -= len(block)
    return total


def first_char(p: Path) -> str:
    """The first non-space character of a text file ('' when none in the first 64 KiB)."""
    try:
        with Path(p).open("r", encoding="utf-8-sig", newline="") as fh:
            return fh.read(65536).lstrip()[:1]
    except UnicodeDecodeError as err:
        raise not_utf8(p) from err


def line_rows(lines: Iterable[str], limit: int | None, *, as_text: bool) -> Iterator[tuple[int, Any]]:
    """``(line index, row)`` of every non-blank line: a ``{"text": line}`` (``as_text``), else the
    parsed JSON value or a :class:`BadLine`. ``lines`` come from a file or ``io.StringIO`` opened
    with ``newline=""`` (line ends kept, stripped here)."""
    seen = 0
    for index, line in enumerate(lines):
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
            yield index, BadLine(line[:RAW_LIMIT], f"{err.msg} at column {err.colno}")


def text_lines(text: str) -> Iterator[str]:
    """The lines of ``text`` split exactly as :func:`iter_lines` splits a file."""
    return iter(io.StringIO(text, newline=""))


def iter_lines(p: Path, limit: int | None, *, as_text: bool) -> Iterator[tuple[int, Any]]:
    """:func:`line_rows` of a file, read line by line."""
    try:
        with Path(p).open("r", encoding="utf-8-sig", newline="") as fh:
            yield from line_rows(fh, limit, as_text=as_text)
    except UnicodeDecodeError as err:
        raise not_utf8(p) from err


def iter_json_array(p: Path, limit: int | None = None, chunk: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """The elements of the top-level JSON array of ``p``, one at a time, reading ``chunk`` characters
    at a time (memory does not grow with the file; no streaming JSON parser is a dependency).

    ``json.JSONDecoder.raw_decode`` parses one element from a buffer; when it fails and the file
    has more text, more is read (doubling) and it retries, so an element may span chunks. An
    element still unparsable after :data:`MAX_JSON_ROW` characters, or at the end of the file, is
    a syntax error, and so is any text after the closing ``]``: each a :class:`UserError` naming
    the byte offset. ``limit`` stops after that many elements (the rest is not read).
    """
    decoder = json.JSONDecoder()
    consumed = 0  # characters dropped from the front of buf (for error offsets)
    try:
        with Path(p).open("r", encoding="utf-8-sig", newline="") as fh:
            buf, eof = fh.read(chunk), False

            def more(n: int) -> bool:
                nonlocal buf, eof
                if eof:
                    return False
                part = fh.read(n)
                eof = not part
                buf += part
                return bool(part)

            def skip_ws(pos: int) -> int:
                while True:
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        pos += 1
                    if pos < len(buf) or not more(chunk):
                        return pos

            def syntax(pos: int, what: str) -> UserError:
                return UserError(
                    f"{p}: not valid JSON: {what} at byte {byte_offset(p, consumed + pos)} "
                    f"(got {_show(buf[pos : pos + 40]) if pos < len(buf) else 'the end of the file'}). "
                    "Fix the syntax: a .json file holds one list [{...}, ...] of rows."
                )

            pos = skip_ws(0)
            if buf[pos : pos + 1] != "[":
                raise syntax(pos, "no opening '['")
            pos = skip_ws(pos + 1)
            if buf[pos : pos + 1] == "]":
                raise UserError(f"{p}: the JSON list is empty (got []). Point at a file with rows.")
            index = 0
            while True:
                if limit is not None and index >= limit:
                    return
                want = chunk
                while True:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                        if end < len(buf) or not more(want):  # a number may go on in the next chunk
                            break
                    except json.JSONDecodeError as err:
                        if len(buf) - pos > MAX_JSON_ROW or not more(want):
                            raise syntax(err.pos, f"{err.msg} in element {index}") from err
                        want *= 2
                yield index, value
                index += 1
                pos = skip_ws(end)
                sep = buf[pos : pos + 1]
                if sep == "]":
                    break
                if sep != ",":
                    raise syntax(pos, f"expected ',' or ']' after element {index - 1}")
                pos = skip_ws(pos + 1)
                if pos > chunk:  # drop what was parsed: the buffer stays about one chunk long
                    consumed += pos
                    buf, pos = buf[pos:], 0
            pos = skip_ws(pos + 1)
            if pos < len(buf):
                raise UserError(
                    f"{p}: unexpected data after the JSON array at byte {byte_offset(p, consumed + pos)} "
                    f"(got {_show(buf[pos : pos + 40])} after its {index} rows). A .json file holds one list "
                    "[{...}, ...] of rows: merge the arrays into one list, remove what follows the closing "
                    "']', or write JSON Lines (one object per line)."
                )
    except UnicodeDecodeError as err:
        raise not_utf8(p) from err
