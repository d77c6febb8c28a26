"""Atomic writes (a failure never leaves a torn file or a temp file) and table rendering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from rcomp import reports
from rcomp.reports import (
    atomic_output,
    render_markdown_table,
    render_table,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


class Boom(Exception):
    pass


def only(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_write_text_and_bytes(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert only(target) == ["out.txt"]


def test_permissions_follow_the_umask_not_mkstemp(tmp_path):
    target = write_text_atomic(tmp_path / "r.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_json_format(tmp_path):
    @dataclass
    class Row:
        b: int
        a: float

    target = write_json_atomic(tmp_path / "r.json", {"z": 1, "a": [Row(1, 0.5)], "p": tmp_path})
    text = target.read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "z": 1,')  # indent 2, key order kept
    assert json.loads(text) == {"z": 1, "a": [{"b": 1, "a": 0.5}], "p": str(tmp_path)}


def test_unserializable_json_leaves_old_file(tmp_path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert only(target) == ["r.json"]


def test_failure_mid_write_keeps_previous_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    write_bytes_atomic(target, b"old")

    def failing_fsync(fd):
        raise Boom("disk full")

    monkeypatch.setattr(reports.os, "fsync", failing_fsync)
    with pytest.raises(Boom):
        write_bytes_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert only(target) == ["model.onnx"]


def test_atomic_output_commits_only_on_success(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".onnx" and not tmp.exists()
            tmp.write_bytes(b"half")
            raise Boom
    assert target.read_bytes() == b"old" and only(target) == ["model.onnx"]
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and only(target) == ["model.onnx"]


def test_atomic_output_refuses_a_block_that_wrote_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_output(tmp_path / "x.bin"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_reports_module_does_not_import_torch():
    code = "import sys, rcomp.reports; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


ROWS = [
    {"profile": "jetson", "mops": 24.0, "ok": "yes"},
    {"profile": "automotive-ecu", "mops": 12.5, "ok": None},
]


def test_render_table_aligns_text_left_numbers_right():
    assert render_table(ROWS).splitlines() == [
        "profile         mops  ok",
        "--------------  ----  ---",
        "jetson            24  yes",
        "automotive-ecu  12.5  -",
    ]


def test_render_table_list_rows_and_header_labels():
    text = render_table([[1, "a|b"], [22, "c"]], ["n", "name"])
    assert text.splitlines()[2] == " 1  a|b"
    labelled = render_table(ROWS, {"profile": "Profile", "mops": "MOps"})
    assert labelled.splitlines()[0] == "Profile         MOps"
    with pytest.raises(ValueError):
        render_table([[1, 2]], ["only-one"])


def test_render_markdown_table():
    md = render_markdown_table([[1, "a|b"]], ["n", "name"])
    assert md.splitlines() == ["| n | name |", "|---:|---|", "| 1 | a\\|b |"]
    assert render_markdown_table([], ["a", "b"]).splitlines()[1] == "|---|---|"
