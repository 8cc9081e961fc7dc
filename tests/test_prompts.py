"""Prompt files: .jsonl / .json / .txt parsing, errors that name file and line, loading, chat rendering."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from cna_dist.errors import BadInput
from cna_dist.manifest import PromptSet
from cna_dist.model import checkpoint as modelmod
from cna_dist.prompts import sets as promptsmod

BOM = b"\xef\xbb\xbf"


def parse(data: bytes | str, name: str, field: str | None = None) -> list[str]:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return promptsmod.parse(raw, f"s3://bucket/prompts/{name}", field)


def bad(data: bytes | str, name: str, field: str | None = None) -> str:
    """The error message of a file that must be refused; it always starts with the file's URI."""
    with pytest.raises(BadInput) as info:
        parse(data, name, field)
    assert info.value.source == f"s3://bucket/prompts/{name}"
    message = str(info.value)
    assert message.startswith(f"s3://bucket/prompts/{name}: ")
    return message.removeprefix(f"s3://bucket/prompts/{name}: ")


# --- formats ---------------------------------------------------------------------------------------------------


def test_jsonl_strings_objects_and_blank_lines() -> None:
    data = '"first"\n\n{"prompt": "second", "id": 7}\n   \n"  spaced  "\n'
    assert parse(data, "a.jsonl") == ["first", "second", "  spaced  "]  # text kept exactly, blank lines skipped


def test_jsonl_and_json_with_field() -> None:
    assert parse('{"instruction": "one", "prompt": "no"}\n"two"\n', "a.jsonl", "instruction") == ["one", "two"]
    assert parse('[{"instruction": "one"}, "two"]', "a.json", "instruction") == ["one", "two"]


def test_json_list_over_several_lines() -> None:
    assert parse('[\n  "one",\n  {"prompt": "two"}\n]\n', "a.json") == ["one", "two"]


def test_txt_one_prompt_per_line() -> None:
    assert parse("first line\n\n   \nsecond line\n  kept as is \n", "a.txt") == [
        "first line",
        "second line",
        "  kept as is ",
    ]


def test_suffix_is_case_insensitive() -> None:
    assert parse('"x"\n', "A.JSONL") == ["x"]
    assert parse('["x"]', "A.Json") == ["x"]


@pytest.mark.parametrize(
    "name,data",
    [
        ("a.jsonl", '"one"\r\n\r\n{"prompt": "two"}\r\n'),
        ("a.json", '[\r\n "one",\r\n "two"\r\n]\r\n'),
        ("a.txt", "one\r\n\r\ntwo\r\n"),
    ],
)
def test_crlf_line_endings(name: str, data: str) -> None:
    assert parse(data, name) == ["one", "two"]  # no stray "\r" in any prompt


def test_crlf_error_line_numbers_count_crlf_once() -> None:
    assert bad('"one"\r\n"two"\r\n{broken\r\n', "a.jsonl").startswith("line 3: invalid JSON")


@pytest.mark.parametrize(
    "name,data",
    [("a.jsonl", b'"one"\n"two"\n'), ("a.json", b'["one", "two"]'), ("a.txt", b"one\ntwo\n")],
)
def test_utf8_bom_is_ignored(name: str, data: bytes) -> None:
    assert parse(BOM + data, name) == ["one", "two"]


def test_jsonl_line_with_unicode_line_separator_inside_a_string() -> None:
    line = json.dumps({"prompt": "one\u2028two"}, ensure_ascii=False)
    assert parse(line + "\n", "a.jsonl") == ["one\u2028two"]


def test_non_ascii_text() -> None:
    assert parse('"héllo wörld ✓"\n', "a.jsonl") == ["héllo wörld ✓"]
    assert parse("日本語のプロンプト\n", "a.txt") == ["日本語のプロンプト"]


# --- errors ----------------------------------------------------------------------------------------------------


def test_jsonl_invalid_json_names_the_line() -> None:
    assert bad('"ok"\n\n{"prompt": "x"\n', "a.jsonl").startswith("line 3: invalid JSON")


def test_json_invalid_names_the_line() -> None:
    assert bad('[\n "ok",\n "missing comma"\n "x"\n]', "a.json").startswith("invalid JSON at line 4:")


def test_missing_field_names_line_field_and_keys() -> None:
    assert (
        bad('"ok"\n{"text": "x", "id": 1}\n', "a.jsonl")
        == "line 2: object has no field 'prompt' (keys: ['id', 'text'])"
    )
    assert bad('[{"prompt": "x"}]', "a.json", "instruction") == (
        "item 0: object has no field 'instruction' (keys: ['prompt'])"
    )


@pytest.mark.parametrize(
    "name,data,message",
    [
        ("a.jsonl", '"ok"\n{"prompt": 42}\n', "line 2: field 'prompt' is int, not a string"),
        ("a.jsonl", '"ok"\n{"prompt": null}\n', "line 2: field 'prompt' is NoneType, not a string"),
        ("a.json", '["ok", {"prompt": ["x"]}]', "item 1: field 'prompt' is list, not a string"),
        ("a.jsonl", '"ok"\n42\n', "line 2: expected a string or an object, got int"),
        ("a.json", '["ok", ["x"]]', "item 1: expected a string or an object, got list"),
    ],
)
def test_wrong_types_name_line_or_item(name: str, data: str, message: str) -> None:
    assert bad(data, name) == message


@pytest.mark.parametrize(
    "name,data,message",
    [
        ("a.jsonl", '"ok"\n"   "\n', "line 2: empty prompt"),
        ("a.jsonl", '{"prompt": ""}\n', "line 1: empty prompt"),
        ("a.json", '["ok", "", "x"]', "item 1: empty prompt"),
        ("a.json", '["ok", {"prompt": "\\n\\t"}]', "item 1: empty prompt"),
    ],
)
def test_empty_prompt_names_line_or_item(name: str, data: str, message: str) -> None:
    assert bad(data, name) == message


def test_json_must_be_a_list() -> None:
    assert bad('{"prompt": "x"}', "a.json") == "expected a JSON list, got dict"


@pytest.mark.parametrize("name", ["a.xlsx", "prompts", "a.jsonl.gz"])
def test_unsupported_suffix(name: str) -> None:
    assert bad('"x"\n', name) == "unsupported prompt file type (use one of .jsonl, .json, .txt, .parquet, .csv)"


def test_not_utf8() -> None:
    message = bad(b'"caf\xe9"\n', "a.jsonl")  # Latin-1
    assert message.startswith("not UTF-8 text (") and "position 4" in message


@pytest.mark.parametrize(
    "name,data",
    [("a.jsonl", ""), ("a.jsonl", "\n\n  \n"), ("a.txt", ""), ("a.txt", "\r\n \r\n"), ("a.json", "[]")],
)
def test_empty_file(name: str, data: str) -> None:
    assert bad(data, name) == "prompt file holds no prompts"


# --- load ------------------------------------------------------------------------------------------------------


def test_load_limit_and_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    data = b'"one"\n{"prompt": "two"}\n\n"three"\n'
    path.write_bytes(data)
    loaded = promptsmod.load("positive", PromptSet(uri=str(path), limit=2))
    assert loaded.name == "positive" and loaded.uri == str(path)
    assert loaded.texts == ["one", "two"]
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()  # the whole file's bytes, whatever the limit
    assert promptsmod.load("positive", PromptSet(uri=str(path), limit=10)).texts == ["one", "two", "three"]
    path.write_bytes(data.replace(b"\n", b"\r\n"))  # same prompts, other bytes: another hash
    assert promptsmod.load("positive", PromptSet(uri=str(path))).sha256 != loaded.sha256


def test_load_missing_file_and_folder_name_the_field(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(BadInput) as info:
        promptsmod.load("negative", PromptSet(uri=missing))
    assert info.value.field == "prompts.negative.uri" and info.value.source == missing
    assert str(info.value) == f"{missing}: prompts.negative.uri: prompt file does not exist"

    folder = tmp_path / "set.jsonl"
    folder.mkdir()
    with pytest.raises(BadInput) as info:
        promptsmod.load("diverse", PromptSet(uri=str(folder)))
    assert info.value.field == "prompts.diverse.uri"
    assert str(info.value) == f"{folder}: prompts.diverse.uri: is a folder, not a prompt file"


def test_load_parse_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('"ok"\n{"text": 1}\n')
    with pytest.raises(BadInput, match=r"p\.jsonl: line 2: object has no field 'prompt'"):
        promptsmod.load("positive", PromptSet(uri=str(path)))


def test_load_from_s3(s3_server: str) -> None:
    import uuid

    from cna_dist.store import uri as urimod

    uri = f"s3://cna/{uuid.uuid4().hex}/prompts.json"
    fs, path = urimod.filesystem(uri)
    data = json.dumps([{"q": "one"}, {"q": "two"}]).encode()
    fs.pipe_file(path, data)
    loaded = promptsmod.load("eval", PromptSet(uri=uri, field="q"))
    assert loaded.texts == ["one", "two"] and loaded.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(BadInput, match="prompts.eval.uri: prompt file does not exist"):
        promptsmod.load("eval", PromptSet(uri=uri + ".missing.json"))


# --- chat template, render, encode -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Any:
    return modelmod.load_tokenizer(tiny_llama)


def test_use_chat_template(tokenizer: Any) -> None:
    assert promptsmod.use_chat_template(tokenizer, None) is True
    assert promptsmod.use_chat_template(tokenizer, True) is True
    assert promptsmod.use_chat_template(tokenizer, False) is False
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert promptsmod.use_chat_template(plain, None) is False
    assert promptsmod.use_chat_template(plain, False) is False
    with pytest.raises(BadInput, match="model.chat_template is true but the tokenizer has no chat template"):
        promptsmod.use_chat_template(plain, True)


def test_render_with_and_without_chat(tokenizer: Any) -> None:
    assert promptsmod.render(tokenizer, "how do i bake a cake", chat=True) == (
        "<s><|user|> how do i bake a cake <|end|> <|assistant|>"
    )
    assert promptsmod.render(tokenizer, "how do i bake a cake", chat=False) == "how do i bake a cake"


def test_encode_has_exactly_one_bos(tokenizer: Any) -> None:
    words = ["how", "do", "i", "bake", "a", "cake"]
    rendered = promptsmod.render(tokenizer, " ".join(words), chat=True)
    chat_ids = promptsmod.encode(tokenizer, rendered, chat=True)
    expected = tokenizer.convert_tokens_to_ids(["<s>", "<|user|>", *words, "<|end|>", "<|assistant|>"])
    assert chat_ids == expected  # the template's BOS only
    assert tokenizer(rendered)["input_ids"] == [tokenizer.bos_token_id, *expected]  # what add_special_tokens adds
    plain_ids = promptsmod.encode(tokenizer, " ".join(words), chat=False)
    assert plain_ids == tokenizer.convert_tokens_to_ids(["<s>", *words])  # BOS from add_special_tokens
    assert isinstance(plain_ids, list) and all(isinstance(i, int) for i in plain_ids)


def test_sha256_text() -> None:
    assert promptsmod.sha256_text("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
