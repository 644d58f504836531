"""Run model-written Python where it cannot hurt the grader, the machine or the secrets on it.

Layers, strongest first; `detect_isolation()` probes which of them this kernel allows and every result
names the one that was used:
  1. `unshare` namespaces: a fresh network namespace (no interfaces up: nothing to connect to), a pid
     namespace (the whole tree dies with the program; /proc shows only the sandbox), a mount namespace
     in which every mount is read-only except the run's temp dir. As a non-root user this needs a user
     namespace (`unshare -r`); as root the program additionally drops to a throwaway uid, because the
     kernel does not apply RLIMIT_NPROC to root (a fork bomb would otherwise be bounded only by time).
  2. Always: rlimits (CPU seconds, address space, file size, processes, open files, no core dumps), a
     new session so the whole process group is killed on timeout, an environment built from a short
     allow-list (HF_TOKEN and friends never reach the child), stdout/stderr capped, a fresh temp dir
     removed afterwards, and an audit hook in the child's interpreter that refuses sockets, writes
     outside the temp dir and reading /proc/*/environ (the only network barrier where namespaces are
     not allowed).
"""
from __future__ import annotations

import functools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
LAUNCHER_SETUP_FAILED = 97
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
THROWAWAY_UID_RANGE = (200_000, 900_000)  # root only: a fresh uid per run, so NPROC counts this run alone
PROBE_MARK = "sandbox-probe-ok"


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. timeout_s is wall clock for one run (one test); CPU seconds follow from it."""
    timeout_s: float = 6.0
    memory_mb: int = 2048
    file_size_mb: int = 32
    max_processes: int = 32
    max_open_files: int = 256
    max_output_bytes: int = 1_000_000

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError(f"SandboxLimits.memory_mb={self.memory_mb} is too small for a Python interpreter; use >= 64")

    def rlimits(self) -> dict:
        return {"cpu_s": math.ceil(self.timeout_s) + 1,
                "address_space_bytes": self.memory_mb << 20,
                "file_size_bytes": self.file_size_mb << 20,
                "processes": self.max_processes,
                "open_files": self.max_open_files,
                "core_bytes": 0}


@dataclass(frozen=True)
class Isolation:
    """One way of starting the child; `name` is what results record."""
    name: str
    unshare_args: tuple = ()
    readonly_fs: bool = False
    drop_uid: bool = False
    python: str = field(default_factory=lambda: os.path.realpath(sys.executable))

    def describe(self) -> str:
        return f"{self.name} (python={self.python})"


@dataclass(frozen=True)
class RunResult:
    status: str  # ok | error | timeout | output_limit | sandbox_error
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def candidate_isolations(is_root: bool, pythons: tuple) -> list:
    """Strongest first. `unshare` flags differ for root (no user namespace needed, uid dropped instead)."""
    ns = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")
    user = () if is_root else ("--user", "--map-root-user")
    out = []
    for py in pythons:
        out.append(Isolation("netns+pidns+mountns(ro-fs)" + ("+uid-drop" if is_root else "+userns") + "+rlimits+audit-hook",
                             ("unshare", *user, *ns), readonly_fs=True, drop_uid=is_root, python=py))
        out.append(Isolation("netns" + ("+uid-drop" if is_root else "+userns") + "+rlimits+audit-hook",
                             ("unshare", *user, "--net"), drop_uid=is_root, python=py))
        out.append(Isolation(("uid-drop+" if is_root else "") + "rlimits+audit-hook(no namespaces)",
                             (), drop_uid=is_root, python=py))
    return out


def sandbox_pythons() -> tuple:
    """Interpreters to try. The dropped uid cannot enter /root, so a venv under /root falls back to the
    system python; untrusted programs only get the standard library either way (-I)."""
    env = os.environ.get("MOE_LOWBIT_SANDBOX_PYTHON")
    found = [env] if env else []
    found += [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    return tuple(dict.fromkeys(p for p in found if p and os.path.exists(p)))


@functools.lru_cache(maxsize=1)
def detect_isolation() -> Isolation:
    """The strongest isolation that actually runs a program here (memoised: a fact about this machine)."""
    probe_limits = SandboxLimits(timeout_s=10, memory_mb=512)
    failures = []
    for iso in candidate_isolations(os.geteuid() == 0, sandbox_pythons()):
        if iso.unshare_args and shutil.which(iso.unshare_args[0]) is None:
            failures.append(f"{iso.name}: unshare not installed")
            continue
        result = run_python(f"print({PROBE_MARK!r})", limits=probe_limits, isolation=iso)
        if result.ok and result.stdout.strip() == PROBE_MARK:
            return iso
        failures.append(f"{iso.describe()}: {result.status} {result.stderr.strip()[-200:]}")
    raise RuntimeError("no sandbox configuration can run Python here; tried:\n  " + "\n  ".join(failures))


def clean_environment(workdir: str) -> dict:
    """Allow-list, not deny-list: nothing from the grader's environment is inherited."""
    return {"PATH": SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _remove_tree(path: str) -> None:
    def retry_writable(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=retry_writable)


def _kill_group(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
    """SIGKILL the whole process group; with grace_s, keep at it until the group is gone (a killed
    process with a large address space takes a moment to exit on a loaded machine)."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)


def _collect(proc: subprocess.Popen, limits: SandboxLimits) -> tuple:
    """Read both pipes until EOF, the deadline or the output cap; returns (stdout, stderr, why_killed)."""
    deadline = time.monotonic() + limits.timeout_s
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    killed = None
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            killed = "timeout"
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 0.2:
            break  # the program is gone; a leftover grandchild holding the pipe gets killed below
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            chunk = key.fileobj.read(65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = buffers[key.fileobj]
            buf += chunk[: max(0, limits.max_output_bytes + 1 - len(buf))]
            if len(buf) > limits.max_output_bytes:
                killed = "output_limit"
                break
        if killed:
            break
    sel.close()
    _kill_group(proc)
    proc.wait()
    _kill_group(proc, grace_s=2.0)
    out, err = (bytes(buffers[s][: limits.max_output_bytes]).decode("utf-8", "replace")
                for s in (proc.stdout, proc.stderr))
    return out, err, killed


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               isolation: Isolation | None = None) -> RunResult:
    """Run `source` as a Python program in a fresh temp dir under `isolation` (probed when None).

    Never raises for anything the program does; a program that cannot even be started is
    status="sandbox_error" (scored wrong by callers, and visible in their detail).
    """
    iso = isolation or detect_isolation()
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="moe-sbx-")
    try:
        uid = secrets.randbelow(THROWAWAY_UID_RANGE[1] - THROWAWAY_UID_RANGE[0]) + THROWAWAY_UID_RANGE[0] \
            if iso.drop_uid else None
        Path(workdir, "main.py").write_text(source, encoding="utf-8", errors="surrogatepass")
        shutil.copyfile(LAUNCHER, Path(workdir, "_launcher.py"))
        config = {"workdir": workdir, "program": "main.py", "readonly_fs": iso.readonly_fs,
                  "drop_to_uid": uid, "rlimits": limits.rlimits(), "block_network_hook": True}
        Path(workdir, "_config.json").write_text(json.dumps(config), encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o755 if uid is not None else 0o700)
        cmd = [*iso.unshare_args, "--", iso.python, "-I", "-B", str(Path(workdir, "_launcher.py")),
               str(Path(workdir, "_config.json"))] if iso.unshare_args else \
              [iso.python, "-I", "-B", str(Path(workdir, "_launcher.py")), str(Path(workdir, "_config.json"))]
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8", "surrogatepass"))
            stdin_file.seek(0)
            try:
                proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        cwd=workdir, env=clean_environment(workdir), start_new_session=True,
                                        close_fds=True)
            except OSError as exc:
                return RunResult("sandbox_error", None, "", f"could not start sandbox: {exc}",
                                 time.monotonic() - start, iso.describe())
            out, err, killed = _collect(proc, limits)
        rc = proc.returncode
        if killed:
            status = killed
        elif rc == LAUNCHER_SETUP_FAILED and "sandbox setup failed" in err:
            status = "sandbox_error"
        elif rc == 0:
            status = "ok"
        elif rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            status = "timeout"
        else:
            status = "error"
        return RunResult(status, rc, out, err, time.monotonic() - start, iso.describe())
    finally:
        _remove_tree(workdir)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Show which isolation the code sandbox uses on this machine, "
                                             "or run a Python file through it.")
    ap.add_argument("program", nargs="?", help="a .py file to run sandboxed (stdin is passed through)")
    ap.add_argument("--timeout", type=float, default=SandboxLimits.timeout_s)
    args = ap.parse_args(argv)
    iso = detect_isolation()
    print(f"isolation: {iso.describe()}", file=sys.stderr)
    if args.program:
        result = run_python(Path(args.program).read_text(), stdin="" if sys.stdin.isatty() else sys.stdin.read(),
                            limits=SandboxLimits(timeout_s=args.timeout), isolation=iso)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        print(f"status: {result.status} rc={result.returncode} wall={result.wall_s:.2f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
