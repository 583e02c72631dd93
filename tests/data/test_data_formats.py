"""Each source format's ids and loss mask, against ids computed by hand from tok.encode."""
from __future__ import annotations

import pytest

from moedist.config_yaml import ConfigError
from moedist.data.chat import chat_ids_and_mask
from moedist.data.formats import read_documents
from moedist.data.tokenizer import ByteTokenizer
from tok_helpers import write_jsonl


def docs(source, tok, index=0):
    return list(read_documents(source, tok, index))


def test_text_directory_sorted_recursive_hidden_skipped(tmp_path, tok):
    root = tmp_path / "txt"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("Second file.\n")
    (root / "a.txt").write_text("First file, with two words")
    (root / "sub" / "c.md").write_text("Nested one.")
    (root / ".hidden").write_text("never read")
    (root / ".git").mkdir()
    (root / ".git" / "x").write_text("never read")
    got = docs({"name": "t", "path": str(root), "format": "text"}, tok)
    texts = ["First file, with two words", "Second file.\n", "Nested one."]
    assert [ids for ids, _ in got] == [tok.encode(t) + [tok.eos_id] for t in texts]
    assert all(mask == [1] * len(ids) for ids, mask in got)


def test_text_bytes_tokenizer_has_no_eos(tmp_path):
    (tmp_path / "a.txt").write_text("héllo")
    [(ids, mask)] = docs({"name": "t", "path": str(tmp_path / "a.txt"), "format": "text"}, ByteTokenizer())
    assert ids == [104, 195, 169, 108, 108, 111] and mask == [1] * 6


def test_jsonl_text_field_and_blank_lines(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "one doc", "text": "ignored"}, "", "   ",
                                               {"body": "two docs here"}])
    got = docs({"name": "j", "path": path, "format": "jsonl", "text_field": "body"}, tok)
    assert got == [(tok.encode("one doc") + [0], [1] * (len(tok.encode("one doc")) + 1)),
                   (tok.encode("two docs here") + [0], [1] * (len(tok.encode("two docs here")) + 1))]
    assert tok.eos_id == 0                        # <|endoftext|> is the first special token


def test_prompt_completion_masks_the_prompt(tmp_path, tok):
    rows = [{"prompt": "What is the type of None?\n", "completion": "NoneType, the class of None."},
            {"prompt": "Q: ", "completion": "A"}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    got = docs({"name": "pc", "path": path, "format": "prompt_completion"}, tok)
    for (ids, mask), row in zip(got, rows):
        p, c = tok.encode(row["prompt"]), tok.encode(row["completion"])
        assert ids == p + c + [tok.eos_id]
        assert mask == [0] * len(p) + [1] * (len(c) + 1)


CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a keyword."},
        {"role": "assistant", "content": "lambda"},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "yield, of course."}]


def _hand(tok, pieces):
    """(ids, mask) from (text, counted) pieces, each tokenized alone."""
    ids, mask = [], []
    for text, counted in pieces:
        piece = tok.encode(text)
        ids += piece
        mask += [int(counted)] * len(piece)
    return ids, mask


def qwen_pieces(conv):
    out = []
    for m in conv:
        if m["role"] == "assistant":
            out += [("<|im_start|>assistant\n", 0), (m["content"] + "<|im_end|>", 1), ("\n", 0)]
        else:
            out += [(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0)]
    return out


def test_chat_counts_exactly_assistant_content_and_end_of_turn(tok):
    ids, mask = chat_ids_and_mask(tok, CONV)
    want_ids, want_mask = _hand(tok, qwen_pieces(CONV))
    assert ids == want_ids and mask == want_mask
    assert tok.encode(tok.render_chat(CONV)) == want_ids       # the pieces tokenize like the whole
    counted = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert counted == "lambda<|im_end|>yield, of course.<|im_end|>"


def test_chat_generation_markers_path_agrees(tmp_path):
    from moedist.data.tokenizer import load_tokenizer
    from tok_helpers import QWEN_STYLE_GENERATION, make_tokenizer_dir

    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "gen", chat_template=QWEN_STYLE_GENERATION))
    assert tok.has_generation_markers()
    assert chat_ids_and_mask(tok, CONV) == _hand(tok, qwen_pieces(CONV))


def test_chat_whitespace_only_suffix_is_kept(tmp_path):
    """No end-of-turn token: the newline after the content is what ends the turn, so it counts."""
    from moedist.data.tokenizer import load_tokenizer
    from tok_helpers import make_tokenizer_dir

    plain = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "plain", chat_template=plain))
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]
    want = _hand(tok, [("user:\nhi\n", 0), ("assistant:\n", 0), ("Hello there\n", 1)])
    assert tok.encode(tok.render_chat(conv)) == want[0]
    assert chat_ids_and_mask(tok, conv) == want


def test_chat_first_message_from_assistant(tok):
    conv = [{"role": "assistant", "content": "Hi, ask me."}, {"role": "user", "content": "ok"}]
    ids, mask = chat_ids_and_mask(tok, conv)
    assert (ids, mask) == _hand(tok, qwen_pieces(conv))


def test_chat_jsonl_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}, {"messages": CONV[1:3]}])
    got = docs({"name": "c", "path": path, "format": "chat"}, tok)
    assert got == [_hand(tok, qwen_pieces(CONV)), _hand(tok, qwen_pieces(CONV[1:3]))]


def test_chat_not_prefix_stable_is_refused(tmp_path):
    from moedist.data.tokenizer import load_tokenizer
    from tok_helpers import make_tokenizer_dir

    # Renders only the last message: earlier prefixes are not prefixes of the whole.
    odd = "{{ messages[-1]['role'] + ': ' + messages[-1]['content'] }}"
    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "odd", chat_template=odd))
    with pytest.raises(ConfigError, match="not prefix-stable"):
        chat_ids_and_mask(tok, CONV)


def test_parquet_rows_in_batches(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row number {i} of the table" for i in range(30)]
    pq.write_table(pa.table({"id": list(range(30)), "content": texts}), tmp_path / "t.parquet", row_group_size=7)
    got = docs({"name": "p", "path": str(tmp_path / "t.parquet"), "format": "parquet", "text_field": "content"}, tok)
    assert got == [(tok.encode(t) + [tok.eos_id], [1] * (len(tok.encode(t)) + 1)) for t in texts]
