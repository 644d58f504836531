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


def cgroup_v2_memory() -> Path | None:
    """This process's cgroup v2 directory when its memory controller is delegated to us (we may create
    a child and set its memory.max), else None."""
    root = Path("/sys/fs/cgroup")
    try:
        if "memory" not in (root / "cgroup.controllers").read_text().split():
            return None
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
    except (OSError, StopIteration):
        return None
    own = root / line[3:].lstrip("/")
    try:
        delegated = "memory" in (own / "cgroup.subtree_control").read_text().split()
    except OSError:
        return None
    return own if delegated and os.access(own, os.W_OK) else None


def mechanisms(strong: bool, seccomp: bool, workdir_mb: int, file_size_mb: int) -> list:
    """What bounds a run's memory on this host (strong = the bubblewrap tier), for the results."""
    out = ["rlimit_as_per_process", "rlimit_nproc", f"rlimit_fsize<={file_size_mb}MiB"]
    if not strong:
        return out + ["WEAK tier: host temp dir without a size bound, no seccomp filter"]
    out += [f"tmpfs_workdir<={workdir_mb}MiB", "ro_/dev(no /dev/shm)"]
    out.append("seccomp(memfd,SysV shm,SysV msg,POSIX mq: EPERM)" if seccomp else "NO seccomp (arch unsupported)")
    out.append("cgroup2 memory: delegated, unused" if cgroup_v2_memory() else "cgroup2 memory: not delegated")
    return out
