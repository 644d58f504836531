"""Run model-written Python where it cannot hurt the grader, the machine or the secrets on it.

Real isolation is bubblewrap (Debian: `apt-get install bubblewrap`), run as an unprivileged user: a root
grader first drops to a throwaway uid, so the program is never the machine's root (root is exempt from
RLIMIT_NPROC) and bubblewrap builds a user namespace owned by that uid. Inside: every namespace
unshared (no network, not even the host's unix sockets; its own pids; its own mounts), all
capabilities dropped and no nested user namespaces (so no mount can be made writable again), a root
filesystem of read-only binds of what Python needs (/usr and the merged-/usr links, the linker cache),
the only writable place a size-limited tmpfs work dir, a new session, SIGKILL when the grader dies.

Memory and processes are bounded per run, not per process: the program may hold at most
`max_processes` tasks, each with an address space of (memory_mb - workdir_mb) / max_processes, so the
whole run, work dir included, fits in memory_mb. Where the host delegates a cgroup v2 memory controller
(sandbox_memory.cgroup_decision), each run also gets its own cgroup with memory.max = memory_mb, which
counts what rlimits cannot see; the launcher holds the program until the host has moved the run in.

Weak tiers (the old `unshare` launcher, or rlimits and an audit hook alone) are used only when asked
for with allow_weak_sandbox, and every result they produce says WEAK SANDBOX in its isolation.
"""
from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import sandbox_memory
from sandbox_exec import (BWRAP_HARNESS, BWRAP_WORKDIR, bwrap_command, collect, compile_for, launcher_argument, memfd,
                          read_available, remove_tree, stop_bwrap, stop_group, wait_child_pid)

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
# Trusted modules a program may ask to find loaded (run_python's `preload`), by the name it imports.
HARNESS_MODULES = {"sandbox_wire": Path(__file__).with_name("sandbox_wire.py")}
LAUNCHER_SETUP_FAILED = 97
STARTED = b"R"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
THROWAWAY_UID_RANGE = (200_000, 900_000)  # root only: a fresh uid per run, so NPROC counts this run alone
PROBE_MARK = "sandbox-probe-ok"
MIN_PROCESS_MB = 48  # a Python interpreter with the grading prelude and one thread needs ~24 MiB of address space
WEAK_LABEL = "WEAK SANDBOX (allow_weak_sandbox; a hostile program can escape it): "
NO_REAL_SANDBOX_HINT = ("install bubblewrap (`apt-get install bubblewrap`) on a kernel that allows unprivileged "
                        "user namespaces, or pass --allow-weak-sandbox to grade code under the weak tiers "
                        "(recorded as WEAK SANDBOX in every result)")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. timeout_s is wall clock for one run (one test); CPU seconds follow from it.
    memory_mb is the budget of the whole run: every process's address space plus the work dir."""
    timeout_s: float = 6.0
    memory_mb: int = 2048
    max_processes: int = 4  # tasks (processes and threads) the program may have, itself included
    workdir_mb: int = 64
    file_size_mb: int = 32
    max_open_files: int = 256
    max_output_bytes: int = 1_000_000
    allow_weak_sandbox: bool = False

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_processes < 1:
            raise ValueError(f"SandboxLimits.max_processes must be >= 1, got {self.max_processes}")
        if not 1 <= self.workdir_mb < self.memory_mb:
            raise ValueError(f"SandboxLimits.workdir_mb={self.workdir_mb} must be >= 1 and below "
                             f"memory_mb={self.memory_mb} (the work dir is part of the run's memory budget)")
        if self.process_memory_mb() < MIN_PROCESS_MB:
            raise ValueError(f"SandboxLimits.memory_mb={self.memory_mb} leaves {self.process_memory_mb()} MiB per "
                             f"process for max_processes={self.max_processes} after a {self.workdir_mb} MiB work "
                             f"dir; a Python interpreter needs >= {MIN_PROCESS_MB}: raise memory_mb or lower "
                             "max_processes")

    def process_memory_mb(self) -> int:
        """Address space of one process: the processes together and the work dir fit in memory_mb."""
        return (self.memory_mb - self.workdir_mb) // self.max_processes

    def rlimits(self, extra_tasks: int = 0) -> dict:
        """extra_tasks: tasks of the sandbox tool counted by RLIMIT_NPROC beside the program's own."""
        return {"cpu_s": int(self.timeout_s) + 2,
                "address_space_bytes": self.process_memory_mb() << 20,
                "file_size_bytes": self.file_size_mb << 20,
                "processes": self.max_processes + extra_tasks,
                "open_files": self.max_open_files,
                "core_bytes": 0}


@dataclass(frozen=True)
class Isolation:
    """One way of starting the child; `describe()` is what results record.
    kind: bwrap (real isolation) | unshare | plain (weak tiers, opt-in only)."""
    name: str
    kind: str = "plain"
    unshare_args: tuple = ()
    readonly_fs: bool = False
    drop_uid: bool = False
    python: str = field(default_factory=lambda: os.path.realpath(sys.executable))
    tool: str = ""  # the bwrap binary, for kind == "bwrap"
    seccomp: bool = False  # bwrap only: install sandbox_memory's filter (no memfd / SysV shm / msg queues)
    cgroup_parent: str = ""  # bwrap only: each run gets its own cgroup v2 (memory.max = memory_mb) under this dir

    @property
    def strong(self) -> bool:
        return self.kind == "bwrap"

    def describe(self) -> str:
        name = self.name + ("+seccomp(no memfd/SysV shm/msg queues)" if self.strong and self.seccomp else "") + \
            (f"+cgroup2(memory.max per run, under {self.cgroup_parent})" if self.strong and self.cgroup_parent else "")
        text = f"{name} (python={self.python})"
        return text if self.strong else WEAK_LABEL + text


@dataclass(frozen=True)
class RunResult:
    status: str  # ok | error | timeout | output_limit | sandbox_error
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: str
    completed: bool = False  # the launcher's epilogue reported this run's nonce: the program ran to its end

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------------------- tiers

def candidate_isolations(is_root: bool, pythons: tuple, bwrap: str | None = None, cgroup_parent: str | None = None) -> list:
    """Strongest first: bubblewrap for each interpreter (in a cgroup v2 per run where the host delegates a
    memory controller, sandbox_memory.cgroup_decision; then without), then the weak tiers."""
    bwrap = bwrap if bwrap is not None else (shutil.which("bwrap") or "")
    strong = "bwrap(userns+netns+pidns+mountns+ipcns, ro binds, tmpfs workdir, no caps" + \
             (", throwaway uid" if is_root else "") + ")+aggregate rlimits"
    ns = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")
    user = () if is_root else ("--user", "--map-root-user")
    who = "+uid-drop" if is_root else "+userns"
    seccomp = sandbox_memory.host_machine() is not None
    cgroup_parent = sandbox_memory.cgroup_v2_memory() if cgroup_parent is None else cgroup_parent
    out = [Isolation(strong, "bwrap", readonly_fs=True, drop_uid=is_root, python=py, tool=bwrap, seccomp=seccomp,
                     cgroup_parent=parent)
           for py in pythons for parent in dict.fromkeys((cgroup_parent or "", ""))] if bwrap else []
    for py in pythons:
        out.append(Isolation(f"netns+pidns+mountns(ro-fs){who}+rlimits+audit-hook", "unshare", ("unshare", *user, *ns),
                             readonly_fs=True, drop_uid=is_root, python=py))
        out.append(Isolation(f"netns{who}+rlimits+audit-hook", "unshare", ("unshare", *user, "--net"),
                             drop_uid=is_root, python=py))
        out.append(Isolation(("uid-drop+" if is_root else "") + "rlimits+audit-hook(no namespaces)", "plain",
                             drop_uid=is_root, python=py))
    return out


def sandbox_pythons() -> tuple:
    """Interpreters to try. A dropped uid cannot enter /root, so a venv under /root falls back to the
    system python; untrusted programs only get the standard library either way (-I)."""
    env = os.environ.get("MOE_LOWBIT_SANDBOX_PYTHON")
    found = [env] if env else []
    found += [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    return tuple(dict.fromkeys(os.path.realpath(p) for p in found if p and os.path.exists(p)))


@functools.lru_cache(maxsize=2)
def detect_isolation(allow_weak: bool = False) -> Isolation:
    """The strongest isolation that actually runs a program here (memoised: a fact about this machine).
    Without allow_weak, raises unless bubblewrap works: code benchmarks refuse to run unisolated."""
    probe_limits = SandboxLimits(timeout_s=10, memory_mb=512, max_processes=2)
    failures = []
    candidates = candidate_isolations(os.geteuid() == 0, sandbox_pythons())
    if not any(c.strong for c in candidates):
        failures.append("bubblewrap: `bwrap` is not on PATH")
    for iso in candidates:
        if not (iso.strong or allow_weak):
            continue
        if iso.unshare_args and shutil.which(iso.unshare_args[0]) is None:
            failures.append(f"{iso.name}: unshare not installed")
            continue
        result = run_python(f"print({PROBE_MARK!r})", limits=probe_limits, isolation=iso)
        if result.ok and result.completed and result.stdout.strip() == PROBE_MARK:
            return iso
        failures.append(f"{iso.describe()}: {result.status} {result.stderr.strip()[-300:]}")
    what = "no sandbox configuration can run Python here" if allow_weak else \
        "no real sandbox for model-written code here (code benchmarks refuse to run without one): " + NO_REAL_SANDBOX_HINT
    raise RuntimeError(what + "; tried:\n  " + "\n  ".join(failures))


def isolation_for(limits: SandboxLimits) -> Isolation:
    """The isolation a run under these limits gets: real, or a weak tier when the limits allow one."""
    return detect_isolation(allow_weak=limits.allow_weak_sandbox)


def clean_environment(workdir: str) -> dict:
    """Allow-list, not deny-list: nothing from the grader's environment is inherited."""
    return {"PATH": SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------- running

@functools.lru_cache(maxsize=8)
def harness_pyc(python: str, modules: tuple = ()) -> dict:
    """The launcher and the named HARNESS_MODULES compiled by the sandbox's interpreter, once per grader
    process (memoised: the files do not change under a running grader): {"launcher" | name: .pyc bytes}."""
    sources = {"launcher": (f"{BWRAP_HARNESS}/launcher.py", LAUNCHER.read_text(encoding="utf-8"))}
    sources.update({name: (f"{BWRAP_HARNESS}/{name}.py", HARNESS_MODULES[name].read_text(encoding="utf-8"))
                    for name in modules})
    return compile_for(python, sources)


def _status(killed, rc, started: bool) -> str:
    if killed:
        return killed
    if not started:
        return "sandbox_error"
    if rc == 0:
        return "ok"
    if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout"
    return "error"


def _throwaway_uid() -> int:
    return secrets.randbelow(THROWAWAY_UID_RANGE[1] - THROWAWAY_UID_RANGE[0]) + THROWAWAY_UID_RANGE[0]


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               isolation: Isolation | None = None, run_name: str = "__main__", hand_fds: tuple = (),
               cancel_fd: int | None = None, site: bool = True, preload: tuple = ()) -> RunResult:
    """Run `source` as a Python program under `isolation` (probed from the limits when None).

    run_name is the program's __name__ (HumanEval-style test programs run as a module, not __main__, as
    the official harness execs them). Never raises for anything the program does; a sandbox that cannot
    even start is status="sandbox_error" (scored wrong by callers, and visible in their detail).
    hand_fds: fds the program keeps open at the same numbers (pipes to another process); this call owns
    and closes them. cancel_fd: the run stops early (status "cancelled") once this fd is readable.
    site=False starts Python with -S (no site-packages, ~15 ms less): for trusted test code only.
    preload: names from HARNESS_MODULES the launcher loads (sys.modules[name]) before the program runs.
    """
    iso = isolation or isolation_for(limits)
    start = time.monotonic()
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    report_r, report_w = os.pipe()
    stdin_fd = memfd("stdin", stdin.encode("utf-8", "surrogatepass"))
    owned = [nonce_r, report_w, stdin_fd, *hand_fds]
    workdir = info_r = hold_w = cgroup = None
    uid = _throwaway_uid() if iso.drop_uid else None
    try:
        program = source.encode("utf-8", "surrogatepass")
        if iso.strong:
            try:
                pyc = harness_pyc(iso.python, tuple(preload))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                return RunResult("sandbox_error", None, "", f"could not start sandbox: {exc}",
                                 time.monotonic() - start, iso.describe())
            files = {f"{BWRAP_HARNESS}/main.py": memfd("main.py", program),
                     f"{BWRAP_HARNESS}/launcher.pyc": memfd("launcher.pyc", pyc["launcher"])}
            files.update({f"{BWRAP_HARNESS}/{name}.pyc": memfd(name, pyc[name]) for name in preload})
            owned += list(files.values())
            machine = sandbox_memory.host_machine() if iso.seccomp else None
            seccomp_fd = memfd("seccomp", sandbox_memory.seccomp_filter(machine)) if machine else None
            owned += [seccomp_fd] if seccomp_fd is not None else []
            config = {"workdir": BWRAP_WORKDIR, "program": f"{BWRAP_HARNESS}/main.py", "run_name": run_name,
                      "nonce_fd": nonce_r, "report_fd": report_w, "rlimits": limits.rlimits(extra_tasks=1),
                      "keep_fds": list(hand_fds), "preload": {name: f"{BWRAP_HARNESS}/{name}.pyc" for name in preload}}
            if iso.cgroup_parent:  # the launcher waits on hold_r until the host has moved the run in
                hold_r, hold_w = os.pipe()
                owned.append(hold_r)
                config["hold_fd"] = hold_r
                try:
                    cgroup = sandbox_memory.make_run_cgroup(iso.cgroup_parent, limits.memory_mb << 20,
                                                            limits.max_processes + 2, f"moe-run-{secrets.token_hex(8)}")
                except OSError as exc:
                    return RunResult("sandbox_error", None, "", f"could not make the run's cgroup: {exc}",
                                     time.monotonic() - start, iso.describe())
            info_r, info_w = os.pipe()
            owned.append(info_w)
            cmd = bwrap_command(iso.tool, iso.python, limits.workdir_mb << 20, clean_environment(BWRAP_WORKDIR),
                                files, f"{BWRAP_HARNESS}/launcher.pyc", config, info_w, seccomp_fd, site)
            stop = functools.partial(stop_bwrap, info_fd=info_r)
            popen_kw = {"cwd": "/", "env": {"PATH": SAFE_PATH}}
            if uid is not None:  # bwrap itself runs as the throwaway uid: the sandbox is never real root
                popen_kw.update(user=uid, group=uid, extra_groups=[])
        else:
            workdir = tempfile.mkdtemp(prefix="moe-sbx-")
            Path(workdir, "main.py").write_bytes(program)
            shutil.copyfile(LAUNCHER, Path(workdir, "_launcher.py"))
            for name in preload:
                shutil.copyfile(HARNESS_MODULES[name], Path(workdir, f"_{name}.py"))
            config = {"workdir": workdir, "program": str(Path(workdir, "main.py")), "run_name": run_name,
                      "nonce_fd": nonce_r, "report_fd": report_w, "readonly_fs": iso.readonly_fs,
                      "drop_to_uid": uid, "rlimits": limits.rlimits(), "audit_hook": True,
                      "keep_fds": list(hand_fds), "preload": {name: str(Path(workdir, f"_{name}.py")) for name in preload}}
            if uid is not None:
                os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o755 if uid is not None else 0o700)
            cmd = [*iso.unshare_args, *(["--"] if iso.unshare_args else []), iso.python, "-I", "-B",
                   *(() if site else ("-S",)),
                   str(Path(workdir, "_launcher.py")), launcher_argument(config)]
            popen_kw = {"cwd": workdir, "env": clean_environment(workdir)}
            stop = stop_group
        try:
            proc = subprocess.Popen(cmd, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True, pass_fds=tuple(owned), **popen_kw)
        except OSError as exc:
            return RunResult("sandbox_error", None, "", f"could not start sandbox: {exc}",
                             time.monotonic() - start, iso.describe())
        for fd in owned:  # the child has them now; the report pipe reaches EOF when the sandbox is gone
            os.close(fd)
        owned = []
        if hold_w is not None:
            try:
                child = wait_child_pid(info_r, limits.timeout_s)
                sandbox_memory.enter_cgroup(cgroup, [proc.pid, child, *sandbox_memory.descendants(child)])
                stop = functools.partial(stop_bwrap, info_fd=info_r, child_pid=child)
                os.write(hold_w, b"G")
            except OSError as exc:
                stop(proc)
                return RunResult("sandbox_error", None, "", f"could not place the run in its cgroup: {exc}",
                                 time.monotonic() - start, iso.describe())
            except BaseException:  # interrupted: the held run goes too
                stop(proc)
                raise
            finally:
                os.close(hold_w)
                hold_w = None
        try:
            out, err, killed = collect(proc, limits.timeout_s, limits.max_output_bytes, stop, cancel_fd)
        except BaseException:  # interrupted (a grading budget, Ctrl-C): nothing of the run may outlive us
            stop(proc)
            raise
        report = read_available(report_r)
        rc = proc.returncode
        started = report.startswith(STARTED)
        if rc == LAUNCHER_SETUP_FAILED and "sandbox setup failed" in err:
            started = False
        return RunResult(_status(killed, rc, started), rc, out, err, time.monotonic() - start, iso.describe(),
                         completed=started and nonce in report)
    finally:
        for fd in owned + [report_r] + [fd for fd in (info_r, hold_w) if fd is not None]:
            os.close(fd)
        if workdir is not None:
            remove_tree(workdir)
        if cgroup is not None:
            sandbox_memory.remove_run_cgroup(cgroup)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Show which isolation the code sandbox uses on this machine, "
                                             "or run a Python file through it.")
    ap.add_argument("program", nargs="?", help="a .py file to run sandboxed (stdin is passed through)")
    ap.add_argument("--timeout", type=float, default=SandboxLimits.timeout_s)
    ap.add_argument("--allow-weak-sandbox", action="store_true",
                    help="fall back to the weak tiers (rlimits + audit hook) where bubblewrap cannot run")
    args = ap.parse_args(argv)
    try:
        iso = detect_isolation(allow_weak=args.allow_weak_sandbox)
    except RuntimeError as exc:
        sys.exit(f"sandbox: {exc}")
    print(f"isolation: {iso.describe()}", file=sys.stderr)
    if args.program:
        result = run_python(Path(args.program).read_text(), stdin="" if sys.stdin.isatty() else sys.stdin.read(),
                            limits=SandboxLimits(timeout_s=args.timeout, allow_weak_sandbox=args.allow_weak_sandbox),
                            isolation=iso)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        print(f"status: {result.status} rc={result.returncode} completed={result.completed} "
              f"wall={result.wall_s:.2f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
