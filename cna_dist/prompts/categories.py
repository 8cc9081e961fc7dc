"""Categorised eval sets (JailbreakBench's JBB-Behaviors: `{"instruction", "category"}` objects): each prompt's
category, read beside the prompt itself (`cna_dist.eval.metrics` counts refusals within each category)."""

from __future__ import annotations

import json
from typing import Any

from cna_dist.errors import BadInput

UNCATEGORIZED = "uncategorized"  # JBB-style files may hold "category": null


def _category(item: Any, field: str, where: str) -> str:
    if not isinstance(item, dict):
        raise BadInput(f"{where}: a {type(item).__name__} has no {field!r} field; categories need JSON objects")
    if field not in item:
        raise BadInput(f"{where}: object has no field {field!r} (keys: {sorted(item)[:8]})")
    value = item[field]
    if value is None:
        return UNCATEGORIZED
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{where}: field {field!r} is {value!r}, not a category name")
    return value


def categories_of(data: bytes, uri: str, field: str) -> list[str]:
    """Each prompt's category in file order (the order the prompt loader keeps), from a .json list or .jsonl."""
    text = data.decode("utf-8-sig")
    if uri.lower().endswith(".jsonl"):
        rows = [(f"line {n}", line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
        try:
            items = [(where, json.loads(line)) for where, line in rows]
        except json.JSONDecodeError as exc:
            raise BadInput(f"invalid JSON ({exc.msg})", source=uri) from None
    elif uri.lower().endswith(".json"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"invalid JSON at line {exc.lineno}: {exc.msg}", source=uri) from None
        if not isinstance(loaded, list):
            raise BadInput(f"expected a JSON list, got {type(loaded).__name__}", source=uri)
        items = [(f"item {i}", item) for i, item in enumerate(loaded)]
    else:
        raise BadInput("categories need a .json or .jsonl prompt file of objects", source=uri)
    try:
        return [_category(item, field, where) for where, item in items]
    except BadInput as exc:
        raise BadInput(str(exc), source=uri) from None
