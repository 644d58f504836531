"""Run one pipeline step's CLI in a child process (base layer), for the smoke and distill orchestrators.

A step gets its own process group, so a timeout or Ctrl-C ends it with everything it started (vLLM
engine cores, torchrun workers) and nothing else. Its output is streamed to an optional echo stream and
log file, and the last lines are kept so the caller can quote the child's own error line.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO, Mapping, Sequence


class StepFailed(RuntimeError):
    """A step that exited non-zero or ran past its time; `tail` holds its last output lines."""

    def __init__(self, name: str, rc: int | None, timed_out: bool, tail: list[str]):
        self.name, self.rc, self.timed_out, self.tail = name, rc, timed_out, tail
        what = "did not finish in time" if timed_out else f"exited with {rc}"
        super().__init__(f"step {name} {what}: {' | '.join(error_lines(tail))}")


def error_lines(tail: Sequence[str], keep: int = 3) -> list[str]:
    """The child's own error lines (every CLI here prints one), else its last lines."""
    marked = [t.strip() for t in tail if any(w in t for w in ("error", "Error", "failed", "refused", "Traceback"))]
    shown = marked[-keep:] if marked else [t.strip() for t in tail][-keep:]
    return [s for s in shown if s] or ["(no output)"]


def run_step(name: str, cmd: Sequence, cwd: Path, timeout_s: float, env: Mapping[str, str] | None = None,
             echo: IO[str] | None = None, log_file: Path | None = None, tail_lines: int = 40) -> list[str]:
    """Run CMD to completion; return its last `tail_lines` lines, or raise StepFailed."""
    tail: collections.deque = collections.deque(maxlen=tail_lines)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    logf = open(log_file, "w", encoding="utf-8") if log_file is not None else None
    proc = subprocess.Popen([str(c) for c in cmd], env=None if env is None else dict(env), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill_group():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill_group)
    timer.start()
    try:
        for line in proc.stdout:
            if echo is not None:
                echo.write(line)
            if logf is not None:
                logf.write(line)
                logf.flush()
            tail.append(line.rstrip("\n"))
        rc = proc.wait()
    except KeyboardInterrupt:
        kill_group()
        proc.wait()
        raise
    finally:
        timer.cancel()
        if logf is not None:
            logf.close()
    if timed_out.is_set() or rc != 0:
        raise StepFailed(name, rc, timed_out.is_set(), list(tail))
    return list(tail)
