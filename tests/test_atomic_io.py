"""atomic_io: a reader sees the old file or the whole new one; a failed write leaves no trace."""
import json
import os

import pytest

import atomic_io


def test_write_json_round_trips_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "doc.json"
    atomic_io.write_json(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text().endswith("\n")
    assert [p.name for p in target.parent.iterdir()] == ["doc.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "doc.json"
    atomic_io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_io.writing(target, "w", encoding="utf-8") as f:
            f.write('{"v": 2, "torn')
            raise RuntimeError("killed half-way")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["doc.json"]


def test_unserialisable_value_fails_before_touching_the_target(tmp_path):
    target = tmp_path / "doc.json"
    atomic_io.write_text(target, "old")
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        atomic_io.write_json(target, circular)
    assert target.read_text() == "old"


def test_concurrent_writers_use_distinct_temp_names(tmp_path):
    target = tmp_path / "doc.bin"
    with atomic_io.writing(target) as a, atomic_io.writing(target) as b:
        assert a.name != b.name
        a.write(b"first")
        b.write(b"second")
    assert target.read_bytes() in (b"first", b"second")
    assert sorted(os.listdir(tmp_path)) == ["doc.bin"]
