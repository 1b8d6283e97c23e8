"""A user's own text data: JSON Lines records (text, chat, prompt-completion), gzip, the splits named in
data.files, a split by record where there are fewer than 3 files, and bad records named by file and line."""
import gzip
import json

import pytest

from edgekd.config import from_dict, load_config
from edgekd.data.documents import Source, document_texts, is_records, record_count
from edgekd.data.text import build_text_splits, split_corpus, split_records, tokenize_blocks
from edgekd.errors import ConfigError, DataError


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _words(n, tag):
    return " ".join(f"{tag}{i}" for i in range(n))


def test_records_give_one_document_each_in_every_form(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "plain", "id": 1}) + "\n\n" + json.dumps({"messages": chat}) + "\n"
                 + json.dumps({"prompt": "Q: ", "completion": "A"}) + "\n")
    assert is_records(f) and record_count(f) == 3  # the blank line is no record

    def render(messages):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    assert list(document_texts(f, chat=render)) == ["plain", "user:hi|assistant:hello", "Q: A"]
    assert list(document_texts(Source(f, (2, 0)), chat=render)) == ["Q: A", "plain"]  # a Source's order
    other = _jsonl(tmp_path / "o.jsonl", [{"content": "x", "text": 5}])
    with pytest.raises(DataError, match=r"o.jsonl line 1: field 'text' is a JSON int, not text"):
        list(document_texts(other))
    assert list(document_texts(other, field="content")) == ["x"]
    with pytest.raises(DataError, match=r"d.jsonl line 3 is a chat record, and the teacher's tokenizer has no chat"):
        list(document_texts(f))
    gz = tmp_path / "d.jsonl.gz"  # gzip, by its name
    gz.write_bytes(gzip.compress(f.read_bytes()))
    assert is_records(gz) and list(document_texts(gz, chat=render)) == list(document_texts(f, chat=render))
    plain_gz = tmp_path / "t.txt.gz"
    plain_gz.write_bytes(gzip.compress(b"one document\r\n"))
    assert not is_records(plain_gz) and list(document_texts(plain_gz)) == ["one document\n"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"bad.jsonl line 2 is not JSON \(Expecting ',' delimiter at column 14\)"),
    ('["a list"]', r"bad.jsonl line 2 is a JSON list, not a record with a 'text' field"),
    ('{"body": "x", "id": 3}', r"bad.jsonl line 2 has no 'text' field \(its keys: body, id\); set data.text_field"),
    ('{"messages": [{"role": "user"}]}', r"bad.jsonl line 2: 'messages' is not a list of \{'role', 'content'\}"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        list(document_texts(bad, chat=lambda m: "x"))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"broken.jsonl.gz is not a readable gzip file"):
        list(document_texts(broken))


def test_blocks_end_each_record_with_eos_and_count_documents(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "a b c"}, {"text": "  "}, {"text": "d e"}])
    blocks = tokenize_blocks([f], lambda t: [len(w) for w in t.split()], eos_token_id=0, seq_len=2)
    assert blocks.ids.flatten().tolist() == [1, 1, 1, 0, 1, 1]  # the empty record adds nothing, EOS after each
    assert blocks.documents == 2 and blocks.files == [str(f)]


def test_fewer_than_three_jsonl_files_split_by_record_seeded_and_disjoint(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(30)])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    train, val, test, how = split_corpus([a, b], seed=3, val_fraction=0.1, test_fraction=0.2)
    assert how == "by record, seeded (fewer than 3 files)"

    def ids(sources):
        return [(s.path.name, i) for s in sources for i in s.records]

    tr, va, te = ids(train), ids(val), ids(test)
    assert (len(tr), len(va), len(te)) == (28, 4, 8)
    assert len(set(tr) | set(va) | set(te)) == 40 and not (set(tr) & set(te) or set(va) & set(te) or set(tr) & set(va))
    assert ids(split_corpus([a, b], 3, 0.1, 0.2)[2]) == te and ids(split_corpus([a, b], 4, 0.1, 0.2)[2]) != te
    with pytest.raises(DataError, match="hold 2 record"):
        split_records([_jsonl(tmp_path / "two.jsonl", [{"text": "x"}, {"text": "y"}])], 0, (0.2, 0.2))
    txt = tmp_path / "one.txt"
    txt.write_text("text")
    with pytest.raises(DataError, match=r"2 files, JSON Lines and plain text mixed; .*name the splits"):
        split_corpus([a, txt], 0, 0.2, 0.2)


def test_one_text_file_is_split_by_position_at_line_boundaries(tmp_path):
    f = tmp_path / "input.txt"  # a single-file corpus, as tiny-shakespeare's input.txt
    lines = [f"line {i:03d}\n" for i in range(100)]  # 9 characters each
    f.write_text("".join(lines))
    train, val, test, how = split_corpus([f], seed=0, val_fraction=0.1, test_fraction=0.2)
    assert how.startswith("by position in each file") and "the first 70%" in how and "the last 20% to test" in how
    texts = ["".join(document_texts(s)) for s in (*train, *val, *test)]
    assert texts == ["".join(lines[:70]), "".join(lines[70:80]), "".join(lines[80:])]  # whole lines, in order
    ragged = tmp_path / "ragged.txt"  # cuts fall at the line boundary nearest each fraction
    ragged.write_text("a" * 50 + "\n" + "b" * 10 + "\n" + "c" * 39)
    parts = split_corpus([ragged], 0, 0.1, 0.4)[:3]
    assert ["".join(document_texts(s[0])) for s in parts] == ["a" * 50 + "\n", "b" * 10 + "\n", "c" * 39]


def test_the_splits_named_are_kept_and_validation_is_carved_from_train(tmp_path):
    files = []
    for name in ("t1.txt", "t2.txt", "t3.txt", "v.txt", "test.txt"):
        (tmp_path / name).write_text(_words(40, name[0]))
        files.append(tmp_path / name)
    t1, t2, t3, v, te = files
    got = split_corpus({"train": [t1, t2, t3], "validation": [v], "test": [te]}, 0, 0.2, 0.2)
    assert got == ([t1, t2, t3], [v], [te], "as named in data.files")
    train, val, test, how = split_corpus({"train": [t1, t2, t3], "test": [te]}, 0, 0.34, 0.2)
    assert len(val) == 1 and sorted(train + val) == [t1, t2, t3] and test == [te] and "carved from the training files" in how
    records = _jsonl(tmp_path / "train.jsonl", [{"text": f"r{i}"} for i in range(10)])
    train, val, test, how = split_corpus({"train": [records], "test": [te]}, 0, 0.2, 0.2)
    assert sum(len(s.records) for s in train) == 8 and sum(len(s.records) for s in val) == 2
    assert "carved from the training records" in how
    with pytest.raises(DataError, match=r"data.files: .*test.txt is in both train and test"):
        split_corpus({"train": [t1, te], "test": [te]}, 0, 0.2, 0.2)
    train, val, test, how = split_corpus({"train": [t1], "test": [te]}, 0, 0.25, 0.2)  # one text file: its last lines
    assert how == "as named; validation carved from the last 25% of the training file's lines"
    assert "".join(document_texts(train[0])) + "".join(document_texts(val[0])) == t1.read_text() and test == [te]


def test_build_splits_renders_chat_records_with_the_tokenizer_template(tmp_path):
    pytest.importorskip("transformers")
    from tests.lm_fixtures import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": _words(20, "q")}, {"role": "assistant",
                                                                         "content": _words(20, "a")}]}
            for _ in range(12)]
    chats = _jsonl(tmp_path / "chat.jsonl", rows)
    test = _jsonl(tmp_path / "test.jsonl", [{"body": _words(60, "t")} for _ in range(3)])
    splits = build_text_splits({"train": [chats], "test": [test]}, tok, seq_len=16, seed=0, val_fraction=0.25,
                               test_fraction=0.2, text_field="body")
    summary = splits.summary()
    assert summary["split"].startswith("as named") and summary["train"]["documents"] == 9
    assert summary["validation"]["documents"] == 3 and summary["test"]["documents"] == 3
    first = tok.decode(splits.train.ids.flatten()[:200].tolist())
    assert first.startswith("<user>q0 q1") and "<assistant>a0" in first  # the template's own markup
    eos = tok.eos_token_id  # the template closes each conversation: no end-of-text token after it; text records get one
    assert not (splits.train.ids == eos).any() and (splits.test.ids == eos).any()
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"chat.jsonl line \d+: the teacher's chat template refused its messages "
                                        r"\(roles must alternate\)"):
        build_text_splits({"train": [chats], "test": [test]}, tok, 16, 0, 0.25, 0.2, text_field="body")


def test_config_takes_the_splits_by_name_relative_to_the_config_file(tmp_path):
    cfg_path = tmp_path / "lm.yaml"
    cfg_path.write_text("task: causal-lm\ndata:\n  files:\n    train: [data/train-*.jsonl]\n    test: data/test.jsonl\n"
                        "  text_field: content\n")
    cfg = load_config(cfg_path)
    assert cfg.data.files.train == [str(tmp_path / "data/train-*.jsonl")]
    assert cfg.data.files.test == [str(tmp_path / "data/test.jsonl")] and cfg.data.files.validation is None
    assert cfg.data.text_field == "content"
    again = from_dict(cfg.model_dump(mode="json"))  # a saved config loads again
    assert again.data.files == cfg.data.files
    for files, message in [({"train": ["a"]}, "data.files.test: Field required"),
                           ({"train": ["a"], "test": ["b"], "valid": ["c"]}, "data.files.valid: unknown key")]:
        with pytest.raises(ConfigError, match=message):
            from_dict({"task": "causal-lm", "data": {"files": files}})
    with pytest.raises(ConfigError, match="data.text_field is read only with task: causal-lm"):
        from_dict({"data": {"text_field": "content"}})
