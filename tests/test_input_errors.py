"""Bad input files are one line naming the file and line: invalid UTF-8 in a data, replay or prompts file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench_registry
import backend_replay
import eval_text
import opd_data

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "bench"


def _with_bad_line(src: Path, dst: Path, line_no: int) -> Path:
    lines = src.read_bytes().split(b"\n")
    lines[line_no - 1] = lines[line_no - 1].replace(b"the", b"th\xff", 1) if b"the" in lines[line_no - 1] \
        else lines[line_no - 1][:10] + b"\xc3\x28" + lines[line_no - 1][10:]
    dst.write_bytes(b"\n".join(lines))
    return dst


def test_utf8_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "ok"}\n{"c": "h\xe9llo"}\n')
    with pytest.raises(eval_text.TextDecodeError, match=rf"^{path}:3: not valid UTF-8 \(byte 0xe9 at column 9"):
        eval_text.read_utf8(path)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"a": "\u2028"}\nz\n', encoding="utf-8")  # U+2028 inside a string is not a line break
    assert eval_text.utf8_lines(ok) == ['{"a": "\u2028"}', "z"]


def test_a_data_file_with_invalid_utf8_is_named_by_line(tmp_path):
    bad = _with_bad_line(FIX / "gpqa_diamond.jsonl", tmp_path / "gpqa.jsonl", 2)
    with pytest.raises(bench_registry.DataFileError, match=rf"^{bad}:2: not valid UTF-8"):
        bench_registry.load_samples("gpqa", data_file=str(bad))


def test_a_replay_file_with_invalid_utf8_is_one_line_from_the_cli(tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_bytes(json.dumps({"id": "gpqa/x", "output": "A", "finish_reason": "stop"}).encode() + b"\n"
                       + b'{"id": "gpqa/y", "output": "\xff", "finish_reason": "stop"}\n')
    with pytest.raises(eval_text.TextDecodeError, match=rf"{replay}:2: not valid UTF-8"):
        backend_replay.ReplayBackend(replay)
    proc = subprocess.run([sys.executable, "-m", "vllm_eval8", "--model", "m", "--tag", "t", "--backend", "replay",
                           "--replay-file", str(replay), "--benchmarks", "gpqa",
                           "--data-file", f"gpqa={FIX / 'gpqa_diamond.jsonl'}", "--results-dir", str(tmp_path / "r"),
                           "--grade-workers", "0", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{replay}:2: not valid UTF-8" in proc.stderr


def test_a_prompts_file_with_invalid_utf8_is_named_by_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "\xfe"}\n')
    with pytest.raises(opd_data.OpdInputError, match=rf"^{prompts}:2: not valid UTF-8"):
        opd_data.load_prompts(str(prompts))
