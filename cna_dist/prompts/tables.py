"""Prompt tables (.parquet, .csv): one column of prompts, optionally one of categories, read as a stream.

Benchmark prompt sets ship as tables: JailbreakBench's JBB-Behaviors (`Goal, Target, Behavior, Category, Source`),
AdvBench (`goal, target`), HarmBench. A table is read in batches (parquet row groups through pyarrow's
`iter_batches`, CSV row by row through the stdlib `csv` module), only the selected columns are decoded, and the set's
content hash covers the selected prompt column alone: each prompt as its JSON string plus a newline, in row order. So
a table whose other columns change (a new `Source`, a fixed typo in `Target`) keeps its hash, and a table whose
prompts change never does. A million-row table costs the texts it holds and one batch of decoding, nothing more.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cna_dist.errors import BadInput
from cna_dist.prompts.categories import UNCATEGORIZED

TABLE_FORMATS = (".parquet", ".csv")
DEFAULT_FIELD = "prompt"
BATCH_ROWS = 65_536


@dataclass(frozen=True)
class Table:
    """The selected columns of a table: prompt texts, their categories (when asked for) and the prompt column's hash."""

    texts: list[str]
    categories: list[str] | None
    sha256: str


def is_table(uri: str) -> bool:
    return uri.lower().endswith(TABLE_FORMATS)


def line_hash_update(digest: Any, text: str) -> None:
    """One prompt into the column hash: its JSON string and a newline (a prompt may hold newlines itself)."""
    digest.update(json.dumps(text, ensure_ascii=False).encode("utf-8"))
    digest.update(b"\n")


def read(f: Any, uri: str, field: str | None, category_field: str | None, where: str) -> Table:
    """Read the prompt column (`field`, default `prompt`) and the optional category column of an open binary file.

    `where` is the manifest key the set came from (`prompts.positive`): a missing column names it with `.field` or
    `.category_field`. Errors name the file, the column and the 1-based data row.
    """
    columns = _columns(uri, field or DEFAULT_FIELD, category_field)
    parquet = uri.lower().endswith(".parquet")
    rows = _parquet_rows(f, uri, columns, where) if parquet else _csv_rows(f, uri, columns, where)
    texts: list[str] = []
    categories: list[str] | None = [] if category_field else None
    digest = hashlib.sha256()
    for number, (text, category) in enumerate(rows, start=1):
        if not isinstance(text, str) or not text.strip():
            raise BadInput(f"row {number}: column {columns[0]!r} is {text!r}, not a prompt", source=uri)
        line_hash_update(digest, text)
        texts.append(text)
        if categories is not None:
            categories.append(_category(category, columns[1], number, uri))
    if not texts:
        raise BadInput("prompt table holds no rows", source=uri)
    return Table(texts, categories, digest.hexdigest())


def _columns(uri: str, field: str, category_field: str | None) -> tuple[str, ...]:
    return (field, category_field) if category_field else (field,)


def _category(value: Any, column: str, number: int, uri: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return UNCATEGORIZED
    if not isinstance(value, str):
        raise BadInput(f"row {number}: column {column!r} is {value!r}, not a category name", source=uri)
    return value


def _missing(uri: str, wanted: tuple[str, ...], present: list[str], where: str) -> None:
    """Exit 2 naming the file, the manifest key and the column that is not there."""
    for key, column in zip(("field", "category_field"), wanted, strict=False):
        if column not in present:
            shown = ", ".join(repr(c) for c in present[:12]) + (" …" if len(present) > 12 else "")
            raise BadInput(f"no column {column!r} in the table (columns: {shown})", source=uri, field=f"{where}.{key}")


def _parquet_rows(f: Any, uri: str, columns: tuple[str, ...], where: str) -> Iterator[tuple[Any, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInput(f"not a parquet file ({exc})", source=uri) from None
    _missing(uri, columns, table.schema_arrow.names, where)
    for column in columns:
        kind = table.schema_arrow.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise BadInput(f"column {column!r} holds {kind}, not strings", source=uri)
    return _parquet_batches(table, columns, uri)


def _parquet_batches(table: Any, columns: tuple[str, ...], uri: str) -> Iterator[tuple[Any, Any]]:
    import pyarrow as pa

    batches = table.iter_batches(batch_size=BATCH_ROWS, columns=list(columns))
    done = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:  # a damaged row group: the file is at fault, not the run
            raise BadInput(f"unreadable parquet data after row {done} ({exc})", source=uri) from None
        if batch is None:
            return
        texts = batch.column(0).to_pylist()
        categories = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        done += len(texts)
        yield from zip(texts, categories, strict=True)


def _csv_rows(f: Any, uri: str, columns: tuple[str, ...], where: str) -> Iterator[tuple[Any, Any]]:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")  # newline="": quoted fields may hold newlines
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        raise BadInput("empty CSV file: no header row", source=uri) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"not a UTF-8 CSV file ({exc})", source=uri) from None
    _missing(uri, columns, header, where)
    return _csv_body(reader, uri, [header.index(c) for c in columns])


def _csv_body(reader: Any, uri: str, index: list[int]) -> Iterator[tuple[Any, Any]]:
    number = 0
    try:
        for number, row in enumerate(reader, start=1):  # noqa: B007 - the row number names a bad row below
            if not row:
                continue  # a blank line between records
            if len(row) <= max(index):
                raise BadInput(f"row {number}: {len(row)} fields, too few for the header's columns", source=uri)
            yield row[index[0]], (row[index[1]] if len(index) > 1 else None)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"row {number + 1}: not valid UTF-8 CSV ({exc})", source=uri) from None
