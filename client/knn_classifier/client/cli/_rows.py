"""Reading labelled rows from CSV, TSV and JSONL files, keeping the rows that cannot be used.

A row that cannot become an exemplar (no text, no label, not JSON, ...) is kept with its line
number and the reason, so that the import can report it and write it back out for fixing.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from knn_classifier.v1 import classifier_pb2 as pb

from ._errors import CliError

Format: TypeAlias = Literal["csv", "tsv", "jsonl"]
FORMATS: dict[str, Format] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
EXPORT_FORMAT = "knn-classifier-export"
"""The ``format`` of an export file's header line (see ``_archive``)."""

Original: TypeAlias = list[str] | dict[str, Any] | str
"""A row as it was read: CSV fields, a JSON object, or a line that is not one."""


@dataclass(frozen=True)
class Columns:
    """Where a row keeps its text, label, optional id and the fields copied into metadata."""

    text: str = "text"
    label: str = "label"
    id: str = "id"
    id_required: bool = False
    """The id column was named explicitly, so a file without it is an error."""
    metadata: Sequence[str] = ()
    out_of_scope: str = "out_of_scope"
    """A row whose value here is true (true, 1, yes) is an out-of-scope example, whose label
    may be empty."""
    all_out_of_scope: bool = False
    """Every row is an out-of-scope example (``--out-of-scope``)."""


@dataclass(frozen=True)
class Row:
    line: int
    text: str
    label: str
    id: str
    metadata: dict[str, str]
    original: Original
    vectors: dict[int, bytes] = field(default_factory=dict)
    """An export's vectors: dimension -> little-endian float32 values."""
    out_of_scope: bool = False

    def exemplar(self, with_vectors: bool = False) -> pb.ExemplarInput:
        vectors = [
            pb.ExemplarVector(dimension=dimension, values=_floats(raw))
            for dimension, raw in sorted(self.vectors.items())
            if with_vectors
        ]
        return pb.ExemplarInput(
            text=self.text,
            label=self.label,
            id=self.id,
            metadata=self.metadata,
            vectors=vectors,
            out_of_scope=self.out_of_scope,
        )


def _floats(raw: bytes) -> list[float]:
    return list(memoryview(raw).cast("f"))  # little-endian: every platform gRPC runs on


def encode_vector(values: Sequence[float]) -> str:
    """A vector as an export line carries it: base64 of its little-endian float32 values."""
    return base64.b64encode(array("f", values).tobytes()).decode()


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str
    original: Original


@dataclass
class Table:
    """A file's rows; ``header`` is an export's first line, ``fields`` a CSV file's header."""

    format: Format
    rows: list[Row] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    header: dict[str, Any] | None = None
    fields: list[str] = field(default_factory=list)


def file_format(path: Path, given: str | None) -> Format:
    if given:
        return FORMATS[f".{given}"]
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise CliError(
            f"cannot tell the format of {str(path)!r} from its suffix; "
            f"pass --format {' or '.join(sorted(set(FORMATS.values())))}"
        ) from None


def read(path: Path, fmt: Format, columns: Columns) -> Table:
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            if fmt == "jsonl":
                return _read_jsonl(file, columns)
            return _read_delimited(file, fmt, columns)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CliError(f"cannot read {str(path)!r}: {error}") from None


def _read_delimited(lines: Iterator[str], fmt: Format, columns: Columns) -> Table:
    table = Table(fmt)
    reader = csv.reader(lines, dialect="excel-tab" if fmt == "tsv" else "excel")
    table.fields = next(reader, [])
    wanted = [columns.text, *columns.metadata]
    if not columns.all_out_of_scope and columns.out_of_scope not in table.fields:
        wanted.insert(1, columns.label)  # only out-of-scope examples may go without labels
    if columns.id_required:
        wanted.append(columns.id)
    missing = [name for name in wanted if name not in table.fields]
    if missing:
        raise CliError(
            f"column(s) {', '.join(map(repr, missing))} not in the header "
            f"({', '.join(table.fields) or 'empty file'}); name them with --text-column, "
            "--label-column, --id-column or --metadata-columns"
        )
    for fields in reader:
        if not fields:
            continue
        line = reader.line_num
        if len(fields) != len(table.fields):
            reason = f"has {len(fields)} fields; the header has {len(table.fields)}"
            table.rejected.append(Rejected(line, reason, fields))
            continue
        record = dict(zip(table.fields, fields, strict=True))
        _add(table, line, fields, record, columns)
    return table


def _read_jsonl(lines: Iterator[str], columns: Columns) -> Table:
    table = Table("jsonl")
    for line, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError) as error:  # also nested too deep, integers too long
            table.rejected.append(Rejected(line, f"not valid JSON: {error}", raw.rstrip("\n")))
            continue
        if not isinstance(record, dict):
            table.rejected.append(Rejected(line, "not a JSON object", raw.rstrip("\n")))
        elif line == 1 and record.get("format") == EXPORT_FORMAT:
            table.header = record
        else:
            _add(table, line, record, record, columns)
    return table


def _add(
    table: Table, line: int, original: Original, record: dict[str, Any], columns: Columns
) -> None:
    """Appends the record as a row, or as rejected with the reason."""
    text, label = record.get(columns.text), record.get(columns.label)
    flag = _flag(record.get(columns.out_of_scope))
    out_of_scope = columns.all_out_of_scope or flag is True
    reason = _missing(text, columns.text)
    if flag is None and not columns.all_out_of_scope:
        reason = reason or (
            f"{columns.out_of_scope!r} is {record.get(columns.out_of_scope)!r}: write "
            "true / 1 / yes, or false / 0 / no / empty"
        )
    if not out_of_scope or label not in (None, ""):
        reason = reason or _missing(label, columns.label)
    if reason:
        table.rejected.append(Rejected(line, reason, original))
        return
    vectors = _vectors(record.get("vectors")) if table.header is not None else {}
    if vectors is None:
        reason = "'vectors' is not an object of dimension: base64 float32 values"
        table.rejected.append(Rejected(line, reason, original))
        return
    metadata = record.get("metadata")  # a JSON object; in CSV it is an ordinary column
    entries = dict(metadata) if isinstance(metadata, dict) else {}
    entries.update({name: record[name] for name in columns.metadata if name in record})
    row = Row(
        line=line,
        text=str(text),
        label="" if label is None else _string(label),
        id=_string(record.get(columns.id) or ""),
        metadata={str(key): _string(value) for key, value in entries.items()},
        original=original,
        vectors=vectors,
        out_of_scope=out_of_scope,
    )
    strings = [row.text, row.label, row.id, *row.metadata, *row.metadata.values()]
    if not all(map(is_unicode, strings)):
        reason = "holds a lone surrogate (such as \\ud800), which is not Unicode text"
        table.rejected.append(Rejected(line, reason, original))
        return
    table.rows.append(row)


def is_unicode(value: str) -> bool:
    """Whether ``value`` can go in a request: not if it holds a lone surrogate (a JSON escape
    such as ``\\ud800``, or a byte that is not UTF-8 read from stdin or an argument)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _flag(value: Any) -> bool | None:
    """An out-of-scope column's value: yes (JSON true, or true / 1 / yes), no (absent, JSON
    false, empty, or false / 0 / no), or None for anything else, which rejects its row: read
    as no, a typo would make a labelled negative vote."""
    if value is None or isinstance(value, bool):
        return bool(value)
    word = str(value).strip().lower()
    if word in {"true", "1", "yes"}:
        return True
    return False if word in {"", "false", "0", "no"} else None


def _vectors(value: Any) -> dict[int, bytes] | None:
    """An export line's vectors, decoded; None if they are malformed."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        return None
    try:
        decoded = {int(key): base64.b64decode(raw, validate=True) for key, raw in value.items()}
    except (ValueError, TypeError, binascii.Error):
        return None
    if any(len(raw) != 4 * dimension for dimension, raw in decoded.items()):
        return None
    return decoded


def _missing(value: Any, column: str) -> str | None:
    """Why ``value`` cannot be the row's text or label, if it cannot."""
    if value is None:
        return f"no {column!r}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        return f"{column!r} is not a string"
    if not str(value).strip():
        return f"{column!r} is empty"
    return None


def _string(value: Any) -> str:
    """A field as the API's string: strings as they are, other JSON values as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def write_rejected(path: Path, table: Table, rejected: Sequence[Rejected]) -> None:
    """Writes ``rejected`` in the input's format, each with its line number and reason.

    CSV and TSV: the input's columns after ``line`` and ``error``, so that the file can be
    fixed and imported again. JSONL: ``{"line", "error", "row"}``, the row as it was read.
    """
    with path.open("w", encoding="utf-8", newline="") as file:
        if table.format == "jsonl":
            for item in rejected:
                entry = {"line": item.line, "error": item.reason, "row": item.original}
                text = json.dumps(entry, ensure_ascii=False)
                if not is_unicode(text):  # a lone surrogate stays the escape it was read as
                    text = json.dumps(entry)
                file.write(text + "\n")
            return
        writer = csv.writer(file, dialect="excel-tab" if table.format == "tsv" else "excel")
        writer.writerow(["line", "error", *table.fields])
        for item in rejected:
            fields = item.original if isinstance(item.original, list) else []
            writer.writerow([item.line, item.reason, *fields])
