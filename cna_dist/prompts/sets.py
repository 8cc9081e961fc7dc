"""Prompt sets: read from any fsspec URI (.jsonl, .json, .txt, or a .parquet / .csv table), hashed, rendered with the
chat template."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

from cna_dist.errors import BadInput
from cna_dist.manifest import PromptSet
from cna_dist.prompts import tables
from cna_dist.store import uri as urimod

FORMATS = (".jsonl", ".json", ".txt")


@dataclass(frozen=True)
class Prompts:
    """One loaded prompt set: the raw texts and their hash (of the file's bytes; of the prompt column for a table),
    and, for a table read with `category_field`, each prompt's category."""

    name: str
    uri: str
    texts: list[str]
    sha256: str
    categories: list[str] | None = None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _text_of(item: Any, field: str, where: str) -> str:
    if isinstance(item, str):
        text = item
    elif isinstance(item, dict):
        if field not in item:
            raise BadInput(f"{where}: object has no field {field!r} (keys: {sorted(item)[:8]})")
        text = item[field]
        if not isinstance(text, str):
            raise BadInput(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    else:
        raise BadInput(f"{where}: expected a string or an object, got {type(item).__name__}")
    if not text.strip():
        raise BadInput(f"{where}: empty prompt")
    return text


def _lines(text: str) -> list[str]:
    """Lines split at \\n only (a \\r before it dropped): JSON strings may hold U+2028 and friends unescaped."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse_txt(text: str, key: str) -> list[str]:
    return [line for line in _lines(text) if line.strip()]


def _parse_jsonl(text: str, key: str) -> list[str]:
    texts: list[str] = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"line {number}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise BadInput(f"line {number}: invalid JSON (nested too deeply)") from None
        texts.append(_text_of(item, key, f"line {number}"))
    return texts


def _parse_json(text: str, key: str) -> list[str]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        raise BadInput("invalid JSON: nested too deeply") from None
    if not isinstance(items, list):
        raise BadInput(f"expected a JSON list, got {type(items).__name__}")
    return [_text_of(item, key, f"item {index}") for index, item in enumerate(items)]


_PARSERS = {".txt": _parse_txt, ".jsonl": _parse_jsonl, ".json": _parse_json}


def parse(data: bytes, uri: str, field: str | None) -> list[str]:
    """Parse prompt-file bytes; errors name the file and the line (or list index)."""
    if tables.is_table(uri):
        return tables.read(io.BytesIO(data), uri, field, None, "prompts").texts
    suffix = next((s for s in FORMATS if uri.lower().endswith(s)), None)
    if suffix is None:
        known = ", ".join((*FORMATS, *tables.TABLE_FORMATS))
        raise BadInput(f"unsupported prompt file type (use one of {known})", source=uri)
    try:
        text = data.decode("utf-8-sig")  # a BOM (Windows editors write one) is not part of the first prompt
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text ({exc})", source=uri) from None
    try:
        texts = _PARSERS[suffix](text, field or "prompt")
    except BadInput as exc:
        raise BadInput(str(exc), source=uri) from None
    if not texts:
        raise BadInput("prompt file holds no prompts", source=uri)
    return texts


def load(name: str, spec: PromptSet) -> Prompts:
    where = f"prompts.{name}"
    try:
        fs, path = urimod.filesystem(spec.uri, spec.storage_options)
        with fs.open(path, "rb") as f:
            if tables.is_table(spec.uri):
                table = tables.read(f, spec.uri, spec.field, spec.category_field, where)
            else:
                data = f.read()
    except FileNotFoundError:
        raise BadInput("prompt file does not exist", source=spec.uri, field=f"{where}.uri") from None
    except IsADirectoryError:
        raise BadInput("is a folder, not a prompt file", source=spec.uri, field=f"{where}.uri") from None
    except OSError as exc:
        raise BadInput(f"cannot read prompt file: {exc}", source=spec.uri, field=f"{where}.uri") from None
    if tables.is_table(spec.uri):
        texts, categories, sha256 = table.texts, table.categories, table.sha256
    else:
        if spec.category_field is not None:
            message = "category_field is read from .parquet and .csv tables only"
            raise BadInput(message, source=spec.uri, field=f"{where}.category_field")
        texts, categories, sha256 = parse(data, spec.uri, spec.field), None, hashlib.sha256(data).hexdigest()
    if spec.limit is not None:
        texts = texts[: spec.limit]
        categories = None if categories is None else categories[: spec.limit]
    return Prompts(name=name, uri=spec.uri, texts=texts, sha256=sha256, categories=categories)


def use_chat_template(tokenizer: Any, wanted: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if wanted and not has:
        raise BadInput("model.chat_template is true but the tokenizer has no chat template")
    return has if wanted is None else wanted


def render(tokenizer: Any, text: str, chat: bool) -> str:
    """The exact string the model sees: the user turn plus the generation prompt, when chat is on."""
    if not chat:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def encode(tokenizer: Any, rendered: str, chat: bool) -> list[int]:
    """Token ids without a second BOS: a chat template already carries its own special tokens."""
    return list(tokenizer(rendered, add_special_tokens=not chat)["input_ids"])


@dataclass
class Encoded:
    """A prompt set as the model sees it: rendered text, token ids and the hash of each rendered prompt."""

    prompts: Prompts
    rendered: list[str]
    token_ids: list[list[int]]
    row_hashes: list[str]


def token_limit(tokenizer: Any, max_length: int | None) -> tuple[int | None, str]:
    """The most tokens a prompt may have, and what set it: capture.max_length, else the tokenizer's own limit.

    transformers writes a huge placeholder (1e30) for a tokenizer without a known limit: that means none.
    """
    if max_length is not None:
        return max_length, "capture.max_length"
    known = getattr(tokenizer, "model_max_length", None)
    if isinstance(known, int) and 0 < known < 10**9:
        return known, "the tokenizer's model_max_length"
    return None, ""


def encode_set(prompts: Prompts, tokenizer: Any, chat: bool, max_length: int | None = None) -> Encoded:
    """Render and tokenize a set; a prompt over the token limit is an error naming it (never truncated)."""
    limit, why = token_limit(tokenizer, max_length)
    rendered = [render(tokenizer, t, chat) for t in prompts.texts]
    ids = [encode(tokenizer, r, chat) for r in rendered]
    too_long = [i for i, t in enumerate(ids) if limit is not None and len(t) > limit]
    if too_long:
        raise BadInput(
            f"prompt {too_long[0] + 1} of {len(ids)} has {len(ids[too_long[0]])} tokens, over {why} {limit}",
            source=prompts.uri,
            field=f"prompts.{prompts.name}",
        )
    return Encoded(prompts, rendered, ids, [sha256_text(r) for r in rendered])
