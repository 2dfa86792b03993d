"""The write path's output rule (ravl_pipeline/io/files.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ravl_pipeline.io.files import (OutputPathError, atomic_dir, check_output, input_problem, output_problem,
                                    write_bytes_atomic)


def test_the_rule_refuses_links_special_files_folders_and_inputs(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("input")
    (tmp_path / "link").symlink_to(tmp_path / "data.txt")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "in.json").write_text("{}")
    inputs = [("--data", tmp_path / "data.txt"), ("--findings", tmp_path / "folder" / "in.json")]
    assert "symbolic link" in output_problem(tmp_path / "link")
    assert "named pipe" in output_problem(tmp_path / "pipe")
    assert "device" in output_problem("/dev/null")
    assert "names a folder" in output_problem(f"{tmp_path}/new/")
    assert "is a directory" in output_problem(tmp_path / "folder")
    assert "--data" in output_problem(tmp_path / "sub" / ".." / "data.txt", inputs=inputs)
    assert "holds what --findings reads" in output_problem(tmp_path / "folder", folder=True, inputs=inputs)
    assert "written by --out" in output_problem(tmp_path / "ck" / "h.json", outputs=[("--out", tmp_path / "ck", True)])
    assert output_problem(tmp_path / "new.json", inputs=inputs) is None
    with pytest.raises(OutputPathError, match="^--history .*pipe: is a named pipe"):
        check_output(tmp_path / "pipe", "--history")


def test_the_write_path_never_replaces_a_special_file_nor_writes_through_a_link(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OutputPathError, match="named pipe"):
        write_bytes_atomic(tmp_path / "pipe", b"x")
    assert input_problem(tmp_path / "pipe") == "is a named pipe, expected a regular file"
    (tmp_path / "cached").write_text("kept")
    (tmp_path / "out.json").symlink_to(tmp_path / "cached")  # as a DVC symlink cache leaves an output
    write_bytes_atomic(tmp_path / "out.json", b"new")
    assert not (tmp_path / "out.json").is_symlink() and (tmp_path / "out.json").read_bytes() == b"new"
    assert (tmp_path / "cached").read_text() == "kept"
    (tmp_path / "ck").symlink_to(tmp_path)
    with pytest.raises(OutputPathError, match="symbolic link"):
        with atomic_dir(tmp_path / "ck"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cached", "ck", "out.json", "pipe"]
