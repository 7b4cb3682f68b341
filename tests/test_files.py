"""One atomic writer: the target appears whole or not at all, and nothing is left beside it."""

import os
import stat

import pytest

from mitdenoise.files import write_atomically, write_text_atomically


def test_a_write_replaces_the_target_whole_with_a_new_file_s_permissions(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    write_text_atomically(target, "new")
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_a_failing_writer_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_fail(temp):
        temp.write_bytes(b"half")
        raise KeyboardInterrupt  # a signal mid-write, not only an error

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_a_missing_folder_is_file_not_found_and_a_long_name_still_fits(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text_atomically(tmp_path / "nowhere" / "out.txt", "x")
    long = tmp_path / ("é" * 120 + ".txt")  # 244 bytes: the temporary name must be shortened
    write_text_atomically(long, "x")
    assert long.read_text() == "x" and len(os.listdir(tmp_path)) == 1
