"""`edgekd cache list` and `edgekd cache clear [--older-than DAYS] [KIND]` on the user cache."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edgekd.cli import main
from edgekd.runs import cache_dir, cache_entries


@pytest.fixture
def cache(tmp_path, monkeypatch) -> dict[str, Path]:
    root = tmp_path / "cache"
    monkeypatch.setenv("EDGEKD_CACHE", str(root))
    files = {
        "old_teacher": root / "teachers" / "torchvision_resnet18-aaa.pt",
        "new_teacher": root / "teachers" / "edge_cnn-bbb.pt",
        "old_logits": root / "teacher-logits" / "ccc.pt",
        "sysroot": root / "arm64-sysroot-0123456789ab" / "lib" / "libc.so",
        "foreign": root / "venvs" / "keep" / "python",
    }
    for i, p in enumerate(files.values()):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * (1000 * (i + 1)))
    ten_days_ago = time.time() - 10 * 86400
    for key in ("old_teacher", "old_logits"):
        os.utime(files[key], (ten_days_ago, ten_days_ago))
    return files


def test_list_shows_each_entry_its_size_and_the_total(cache, capsys):
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["KIND", "SIZE", "AGE", "PATH"]
    assert len(lines) == 1 + 4 + 1  # header, four entries, the total
    row = next(line for line in lines if line.endswith("torchvision_resnet18-aaa.pt"))
    assert row.split()[:3] == ["teachers", "1.0", "KB"] and "10.0 d" in row
    assert any(line.startswith("sysroots") and "4.0 KB" in line for line in lines)  # a folder: all it holds
    assert lines[-1] == f"total: 4 entries, 10.0 KB in {cache_dir()}"
    assert "venvs" not in out  # not edgekd's


def test_list_one_kind(cache, capsys):
    assert main(["cache", "list", "logits"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("logits") and lines[-1].startswith("total: 1 entry, 3.0 KB")


def test_clear_older_than_removes_only_old_entries(cache, capsys):
    assert main(["cache", "clear", "--older-than", "5"]) == 0
    out = capsys.readouterr().out
    assert not cache["old_teacher"].exists() and not cache["old_logits"].exists()
    assert cache["new_teacher"].exists() and cache["sysroot"].exists() and cache["foreign"].exists()
    assert out.strip().splitlines()[-1] == f"removed 2 entries, 4.0 KB from {cache_dir()}"


def test_clear_one_kind_then_everything(cache, capsys):
    assert main(["cache", "clear", "sysroots"]) == 0
    assert not cache["sysroot"].parent.parent.exists() and cache["new_teacher"].exists()
    assert main(["cache", "clear"]) == 0
    assert cache_entries() == []
    assert cache["foreign"].exists()  # only what edgekd writes is ever removed
    assert "removed 3 entries" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["clear", "--older-than", "-1"], ["clear", "weights"], []])
def test_bad_arguments_exit_2(cache, args, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own exit for a bad choice or a missing action
        code = main(["cache", *args])
        raise SystemExit(code)
    assert e.value.code == 2
    assert cache["old_teacher"].exists()


def test_a_cache_path_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "afile"))
    assert main(["cache", "list"]) == 2
    assert "afile (EDGEKD_CACHE, else $XDG_CACHE_HOME/edgekd) is a file, not a folder" in capsys.readouterr().err
