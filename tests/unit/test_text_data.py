"""Text corpora: files and globs, the split by file, blocks of seq_len, the token bound and bad input."""
import pytest
import torch

from edgekd.data.text import (
    TokenBlocks,
    build_text_splits,
    resolve_text_files,
    split_files,
    stdlib_sources,
    tokenize_blocks,
)
from edgekd.errors import DataError


def _files(tmp_path, n=6, size=50):
    for i in range(n):
        (tmp_path / f"f{i}.txt").write_text(" ".join(f"w{i}_{j}" for j in range(size)))
    return sorted(tmp_path.glob("*.txt"))


def test_globs_resolve_sorted_and_unique(tmp_path):
    files = _files(tmp_path)
    found = resolve_text_files(["*.txt", "f0.txt", "**/f1.txt"], root=tmp_path)
    assert found == files
    with pytest.raises(DataError, match=r"'\*.md' matches no file under"):
        resolve_text_files(["*.md"], root=tmp_path)


def test_split_is_by_file_seeded_and_disjoint(tmp_path):
    files = _files(tmp_path, n=20)
    train, val, test = split_files(files, seed=7, val_fraction=0.1, test_fraction=0.2)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert set(train) | set(val) | set(test) == set(files)
    assert not (set(train) & set(test)) and not (set(val) & set(test)) and not (set(train) & set(val))
    assert split_files(files, 7, 0.1, 0.2) == (train, val, test)
    assert split_files(files, 8, 0.1, 0.2)[2] != test
    with pytest.raises(DataError, match=r"at least 3 .*or the splits named: data.files: \{train"):
        split_files(files[:2], 0, 0.1, 0.1)


def test_blocks_join_files_with_eos_and_respect_the_token_bound(tmp_path):
    files = _files(tmp_path, n=3, size=10)

    def encode(text):
        return [len(w) for w in text.split()]  # one token per word

    blocks = tokenize_blocks(files, encode, eos_token_id=0, seq_len=4)
    stream = [t for f in files for t in encode(f.read_text()) + [0]]
    assert blocks.ids.dtype == torch.long and blocks.ids.shape == (len(stream) // 4, 4)
    assert blocks.ids.flatten().tolist() == stream[:len(stream) // 4 * 4]
    assert blocks.ids[2, 2].item() == 0  # the end-of-text token after the first file's 10 tokens
    bounded = tokenize_blocks(files, encode, eos_token_id=0, seq_len=4, max_tokens=9)
    assert bounded.tokens == 8 and bounded.files == [str(files[0])]
    with pytest.raises(DataError, match="fewer than one block of data.seq_len 64"):
        tokenize_blocks(files[:1], encode, 0, seq_len=64)
    (tmp_path / "empty.py").write_text("  \n")
    with pytest.raises(DataError, match=r"the test split's 2 file\(s\) give 11 tokens \(1 document\(s\) empty\)"):
        tokenize_blocks([files[0], tmp_path / "empty.py"], encode, 0, seq_len=64, split="test")


def test_binary_and_non_utf8_files_are_named_not_tokenized(tmp_path):
    files = _files(tmp_path, n=3, size=10)

    def encode(text):
        return [len(w) for w in text.split()]

    crlf = tmp_path / "crlf.txt"  # line ends read as text mode reads them: the tokens do not depend on them
    crlf.write_bytes(b"a b\r\nc d\re f\n")
    from edgekd.data.documents import read_text

    assert read_text(crlf) == "a b\nc d\ne f\n" == crlf.read_text()
    latin = tmp_path / "latin.txt"  # a few Latin-1 bytes in text: kept, each replaced
    latin.write_bytes(b"caf\xe9 " * 3 + b"word " * 200)
    assert tokenize_blocks([latin], encode, 0, seq_len=4).tokens > 0
    image = tmp_path / "image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"image.png is not text \(it holds NUL bytes\)"):
        tokenize_blocks([files[0], image], encode, 0, seq_len=4)
    blob = tmp_path / "blob.txt"
    blob.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(DataError, match=r"blob.txt is not UTF-8 text \(1024 undecodable bytes\)"):
        tokenize_blocks([blob], encode, 0, seq_len=4)


def test_stdlib_default_corpus_excludes_tests():
    files = stdlib_sources()
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    assert not any("/test/" in str(f) or "/site-packages/" in str(f) for f in files)


def test_build_splits_with_a_real_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tests.lm_fixtures import corpus_files, tiny_tokenizer

    tok = tiny_tokenizer()
    splits = build_text_splits(corpus_files(), tok, seq_len=32, seed=0, val_fraction=0.2, test_fraction=0.2,
                               max_train_tokens=2048)
    assert splits.train.ids.shape[1] == 32 and splits.train.tokens <= 2048
    assert splits.vocab_size == len(tok) and splits.eos_token_id == tok.eos_token_id
    assert int(splits.train.ids.max()) < len(tok)
    summary = splits.summary()
    assert set(summary) == {"split", "train", "validation", "test"} and summary["test"]["files"] >= 1
    assert summary["split"] == "by file, seeded" and summary["test"]["documents"] == summary["test"]["files"]
    assert not set(splits.test.files) & set(splits.train.files)


def test_prompts_are_spread_over_the_split_first_and_last_block_included():
    blocks = TokenBlocks(torch.arange(100 * 4).view(100, 4))
    got = blocks.prompts(5, 2)
    assert [p[0] // 4 for p in got] == [0, 25, 50, 74, 99] and all(len(p) == 2 for p in got)
    assert [p[0] // 4 for p in blocks.prompts(500, 1)] == list(range(100))  # more asked than there are: each once
    assert TokenBlocks(torch.arange(8).view(1, 8)).prompts(3, 3) == [[0, 1, 2]]
