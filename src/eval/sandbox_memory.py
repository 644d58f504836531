"""The memory bound of a sandboxed run, and the record of which mechanisms enforce it here.

RLIMIT_AS bounds what each process maps; RLIMIT_NPROC how many processes there are; the work dir is a
size-limited tmpfs and /dev (so /dev/shm) is read-only; RLIMIT_FSIZE caps each file. What none of these
sees is memory that lives in the kernel on the program's behalf: memfd files (each up to RLIMIT_FSIZE, one
per open fd), SysV shared memory (attach, fill, detach, repeat) and SysV / POSIX message queues. The
bubblewrap tier closes those with a seccomp filter (bwrap --seccomp) that makes the syscalls creating them
fail with EPERM. The filter is classic BPF built here with struct, no library needed.

What stays outside the bound: pipe and socket buffers, at most a few hundred KiB per open fd (RLIMIT_NOFILE
fds per process); that slack is stated in docs/EVAL_PROTOCOL.md. A cgroup v2 memory controller would
count all of it; `cgroup_v2_memory()` reports whether one is delegated to us, and results say so.
"""
from __future__ import annotations

import os
import platform
import struct
import time
from dataclasses import dataclass
from pathlib import Path

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
# Syscalls that create kernel-held memory outside RLIMIT_AS, per architecture.
DENIED = {
    "x86_64": {"memfd_create": 319, "memfd_secret": 447, "shmget": 29, "shmat": 30, "msgget": 68, "mq_open": 240},
    "aarch64": {"memfd_create": 279, "memfd_secret": 447, "shmget": 194, "shmat": 196, "msgget": 186, "mq_open": 180},
}
EPERM = 1
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_OFFSET_NR, _OFFSET_ARCH = 0, 4


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def seccomp_filter(machine: str) -> bytes:
    """A seccomp BPF program: the DENIED syscalls (and, on x86_64, every x32 syscall and every syscall of
    another architecture, so a 32-bit entry cannot reach them by other numbers) return EPERM; all else runs."""
    numbers = sorted(DENIED[machine].values())
    deny = _insn(_RET_K, 0, 0, _RET_ERRNO | EPERM)
    body = [_insn(_LD_W_ABS, 0, 0, _OFFSET_NR)]
    tail = len(numbers)  # instructions between the x32 check and the ALLOW
    if machine == "x86_64":
        body.append(_insn(_JGE_K, tail + 1, 0, X32_SYSCALL_BIT))  # -> deny
    for i, nr in enumerate(numbers):
        body.append(_insn(_JEQ_K, len(numbers) - i, 0, nr))  # -> deny
    body.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    arch_check = [_insn(_LD_W_ABS, 0, 0, _OFFSET_ARCH),
                  _insn(_JEQ_K, 0, len(body), AUDIT_ARCH[machine])]  # foreign arch -> deny
    return b"".join(arch_check + body + [deny])


def host_machine() -> str | None:
    machine = platform.machine()
    return machine if machine in DENIED else None


CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_ENV = "MOE_LOWBIT_SANDBOX_CGROUP"  # a delegated cgroup v2 dir, e.g. made by `systemd-run -p Delegate=yes`


@dataclass(frozen=True)
class CgroupDir:
    """One place a run's cgroup could be made under, as probed: path, its cgroup.controllers and
    cgroup.subtree_control, whether we may write there, whether processes sit in it (then cgroup v2's
    no-internal-process rule forbids enabling controllers for its children)."""
    path: str
    controllers: tuple = ()
    subtree_control: tuple = ()
    writable: bool = False
    has_procs: bool = True


@dataclass(frozen=True)
class CgroupFacts:
    """What this host says about cgroup v2: the file system type mounted at /sys/fs/cgroup ("cgroup2" for a
    unified hierarchy; "tmpfs" on a cgroup v1 host) and the candidate dirs, in the order to try them."""
    fs_type: str
    candidates: tuple = ()


def cgroup_fs_type(mountinfo: str, mount_point: str = CGROUP_ROOT) -> str:
    """The type of the file system mounted at mount_point, from /proc/self/mountinfo text ("" if none)."""
    found = ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == mount_point and " - " in line:
            found = line.split(" - ", 1)[1].split()[0]  # the last mount there is the one seen
    return found


def cgroup_decision(facts: CgroupFacts) -> tuple:
    """(dir each run's cgroup is made under, or None; why). Pure: a dir qualifies when it is on cgroup v2,
    writable, and its children can get a memory controller (already in its subtree_control, or available
    and enableable because no process sits in it)."""
    if facts.fs_type != "cgroup2":
        return None, f"no cgroup v2 hierarchy at {CGROUP_ROOT} ({facts.fs_type or 'not mounted'}: cgroup v1 or none)"
    why = []
    for c in facts.candidates:
        if not c.writable:
            why.append(f"{c.path}: not writable by this grader")
        elif "memory" in c.subtree_control:
            return c.path, f"{c.path}: memory controller delegated"
        elif "memory" not in c.controllers:
            why.append(f"{c.path}: no memory controller available")
        elif c.has_procs:
            why.append(f"{c.path}: holds processes, so its children cannot get a memory controller")
        else:
            return c.path, f"{c.path}: memory controller available and enabled for its children"
    return None, "; ".join(why) or "no delegated cgroup found"


def _read_words(path: Path) -> tuple:
    try:
        return tuple(path.read_text().split())
    except OSError:
        return ()


def probe_cgroup(environ: dict | None = None) -> CgroupFacts:
    """Read this host's cgroup facts: the configured dir (MOE_LOWBIT_SANDBOX_CGROUP) first, then this
    process's own cgroup."""
    environ = os.environ if environ is None else environ
    try:
        fs_type = cgroup_fs_type(Path("/proc/self/mountinfo").read_text())
    except OSError:
        fs_type = ""
    paths = [environ[CGROUP_ENV]] if environ.get(CGROUP_ENV) else []
    try:
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
        paths.append(str(Path(CGROUP_ROOT, line[3:].lstrip("/"))))
    except (OSError, StopIteration):
        pass
    candidates = []
    for path in dict.fromkeys(paths):
        d = Path(path)
        candidates.append(CgroupDir(path, _read_words(d / "cgroup.controllers"), _read_words(d / "cgroup.subtree_control"),
                                    os.access(d, os.W_OK) and os.access(d / "cgroup.subtree_control", os.W_OK),
                                    bool(_read_words(d / "cgroup.procs"))))
    return CgroupFacts(fs_type, tuple(candidates))


def cgroup_v2_memory() -> str | None:
    """The dir under which each sandboxed run gets its own cgroup v2 with memory.max, when this host
    delegates a memory controller to us; else None."""
    return cgroup_decision(probe_cgroup())[0]


def make_run_cgroup(parent: str, memory_bytes: int, tasks: int, name: str) -> Path:
    """A fresh cgroup `name` under parent for one run: memory.max (everything the kernel holds for the run
    counts: anonymous memory, tmpfs and memfd pages, shm, pipe and socket buffers), no swap, the whole
    group OOM-killed together, and pids.max where the pids controller is on."""
    base = Path(parent)
    enabled = _read_words(base / "cgroup.subtree_control")
    wanted = [c for c in ("memory", "pids") if c not in enabled and c in _read_words(base / "cgroup.controllers")]
    if wanted:
        (base / "cgroup.subtree_control").write_text(" ".join("+" + c for c in wanted))
    run = base / name
    run.mkdir()
    try:
        (run / "memory.max").write_text(str(memory_bytes))
        for control, value in (("memory.swap.max", "0"), ("memory.oom.group", "1"), ("pids.max", str(tasks))):
            if (run / control).exists():
                (run / control).write_text(value)
    except OSError:
        remove_run_cgroup(run, grace_s=0)
        raise
    return run


def enter_cgroup(run: Path, pids) -> None:
    """Move each pid into the run's cgroup (one write per pid: the kernel takes one at a time)."""
    for pid in pids:
        (run / "cgroup.procs").write_text(str(pid))


def remove_run_cgroup(run: Path, grace_s: float = 2.0) -> None:
    """rmdir once its processes are gone (a killed process takes a moment to leave it)."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            run.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= deadline:
                return  # left for the host to reap; its memory.max still bounds whatever is in it
            time.sleep(0.01)


def descendants(pid: int) -> list:
    """Every process below pid, from /proc (ppid fields), parents before children."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def mechanisms(strong: bool, seccomp: bool, workdir_mb: int, file_size_mb: int, cgroup_parent: str | None = None) -> list:
    """What bounds a run's memory on this host (strong = the bubblewrap tier), for the results.
    cgroup_parent: the isolation's (Isolation.cgroup_parent); when None, why cgroup v2 is not used here."""
    out = ["rlimit_as_per_process", "rlimit_nproc", f"rlimit_fsize<={file_size_mb}MiB"]
    if not strong:
        return out + ["WEAK tier: host temp dir without a size bound, no seccomp filter"]
    out += [f"tmpfs_workdir<={workdir_mb}MiB", "ro_/dev(no /dev/shm)"]
    out.append("seccomp(memfd,SysV shm,SysV msg,POSIX mq: EPERM)" if seccomp else "NO seccomp (arch unsupported)")
    if cgroup_parent:
        out.append(f"cgroup2 memory.max=memory_mb per run, swap 0, oom.group (under {cgroup_parent})")
    else:
        parent, why = cgroup_decision(probe_cgroup())
        out.append(f"cgroup2 memory: not used ({why if not parent else f'{parent} found, but a run there failed'})")
    return out
