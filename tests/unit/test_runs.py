"""Run-directory helpers: atomic writes."""

def test_files_written_atomically_get_the_mode_a_plain_open_gives(tmp_path):
    import os
    import stat

    from edgekd.runs import write_json

    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
