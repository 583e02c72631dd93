"""Bad input: one line naming the source, the file, the line and what was expected."""
from __future__ import annotations

import pytest

from moedist.config_yaml import ConfigError
from moedist.data.formats import read_documents
from moedist.data.tokenizer import ByteTokenizer
from tok_helpers import write_jsonl

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
GOOD_PC = {"prompt": "a", "completion": "b"}


def error_of(source, tok, index=0) -> str:
    with pytest.raises(ConfigError) as info:
        list(read_documents(source, tok, index))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"data.sources[{index}] (name {source['name']!r}): ")
    return msg


def test_missing_path(tmp_path, tok):
    msg = error_of({"name": "s", "path": str(tmp_path / "nope.jsonl"), "format": "jsonl"}, tok, 2)
    assert "nope.jsonl" in msg and "no such file or directory" in msg


def test_unknown_format(tmp_path, tok):
    (tmp_path / "a.txt").write_text("x")
    msg = error_of({"name": "s", "path": str(tmp_path / "a.txt"), "format": "csv"}, tok)
    assert "'csv'" in msg and "text|jsonl|prompt_completion|chat|parquet" in msg


def test_empty_directory(tmp_path, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".only_hidden").write_text("x")
    assert "has no files" in error_of({"name": "s", "path": str(tmp_path / "d"), "format": "text"}, tok)


def test_malformed_json_names_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, "", {"text": "ok"}, '{"text": "a" "b"}'])
    msg = error_of({"name": "sft", "path": path, "format": "jsonl"}, tok)
    assert f"{path} line 4: malformed JSON (Expecting ',' delimiter" in msg


def test_not_an_object(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ["[1, 2]"])
    assert "a.jsonl line 1: expected a JSON object, got array" in error_of(
        {"name": "s", "path": path, "format": "jsonl"}, tok)


def test_missing_field_prompt_completion(tmp_path, tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [GOOD_PC, GOOD_PC, {"prompt": "only"}])
    msg = error_of({"name": "pc", "path": path, "format": "prompt_completion"}, tok)
    assert msg.endswith("pc.jsonl line 3: missing field 'completion' (format prompt_completion needs prompt "
                        "and completion)")


def test_missing_text_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}])
    msg = error_of({"name": "s", "path": path, "format": "jsonl"}, tok)
    assert "a.jsonl line 1: missing field 'text'" in msg


def test_non_string_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, {"text": 12}])
    assert "a.jsonl line 2: field 'text' must be a string, got number" in error_of(
        {"name": "s", "path": path, "format": "jsonl"}, tok)
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": None, "completion": "x"}])
    assert "pc.jsonl line 1: field 'prompt' must be a string, got null" in error_of(
        {"name": "s", "path": path, "format": "prompt_completion"}, tok)


def test_chat_without_assistant(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD_CHAT, {"messages": [{"role": "user", "content": "hi"}]}])
    msg = error_of({"name": "c", "path": path, "format": "chat"}, tok)
    assert msg.endswith("c.jsonl line 2: no assistant turn (format chat needs at least one message with role "
                        "'assistant')")


@pytest.mark.parametrize("row, expected", [
    ({"conversation": []}, "missing field 'messages'"),
    ({"messages": "hi"}, "must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0]: missing field 'content'"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "messages[0].content: must be a string, got int"),
])
def test_chat_bad_messages(tmp_path, tok, row, expected):
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    msg = error_of({"name": "c", "path": path, "format": "chat"}, tok)
    assert "c.jsonl line 1: " in msg and expected in msg


def test_chat_needs_a_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD_CHAT])
    with pytest.raises(ConfigError, match="chat_template"):
        list(read_documents({"name": "c", "path": path, "format": "chat"}, ByteTokenizer()))


def test_not_utf8(tmp_path, tok):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert "a.jsonl line 2: not UTF-8 text" in error_of(
        {"name": "s", "path": str(tmp_path / "a.jsonl"), "format": "jsonl"}, tok)


def test_parquet_errors(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "t.parquet")
    assert "t.parquet row 2: field 'text' must be a string, got null" in error_of(
        {"name": "p", "path": str(tmp_path / "t.parquet"), "format": "parquet"}, tok)
    assert "no column 'body' (columns: text" in error_of(
        {"name": "p", "path": str(tmp_path / "t.parquet"), "format": "parquet", "text_field": "body"}, tok)
    (tmp_path / "bad.parquet").write_text("not parquet")
    assert "bad.parquet: not a parquet file" in error_of(
        {"name": "p", "path": str(tmp_path / "bad.parquet"), "format": "parquet"}, tok)
