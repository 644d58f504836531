"""First stage of a sandboxed run: lock the process down, then run the untrusted program in-process.

Runs as `python -I -B sandbox_launcher.py CONFIG.json` inside the child that `sandbox.py` starts (possibly
already inside fresh user/net/pid/mount namespaces made by `unshare`). It must stay importable with the
standard library only: the project's PYTHONPATH is not visible here (-I), and the untrusted program runs
in this same interpreter right after the lock-down, so every restriction below applies to it.

Order matters: mounts need privileges, so they come first; then the uid drop; then rlimits (after the
drop, so the program cannot raise them back); the audit hook last, because installing it cannot be undone.
"""
import ctypes
import json
import os
import resource
import runpy
import sys

MS_BIND = 0x1000
MS_REC = 0x4000
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (generic syscall table)
EXIT_SETUP_FAILED = 97

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_MUTATING_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.symlink", "os.link",
                        "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree",
                        "shutil.copyfile", "shutil.move", "os.mkfifo", "os.mknod"}
NETWORK_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                  "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                  "socket.getnameinfo"}


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def make_filesystem_read_only_except(workdir: str) -> None:
    """Whole tree read-only (recursively, every mount), the work dir alone writable.

    Needs a private mount namespace (unshare --mount) and CAP_SYS_ADMIN in it (real root, or a user
    namespace where we are root). The bind mount of the work dir onto itself makes it a mount of its own,
    so its read-only flag can be cleared again after the recursive pass.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    path = workdir.encode()
    _check(libc.mount(path, path, None, MS_BIND | MS_REC, None), f"bind-mount {workdir}")
    ro = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(ro), ctypes.sizeof(ro)),
           "mount_setattr(/, RDONLY, recursive)")
    rw = _MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)
    _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path, 0, ctypes.byref(rw), ctypes.sizeof(rw)),
           f"mount_setattr({workdir}, clear RDONLY)")


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(f"uid drop to {uid} did not hold (uid={os.getuid()}, euid={os.geteuid()})")


def apply_rlimits(limits: dict) -> None:
    names = {"cpu_s": resource.RLIMIT_CPU, "address_space_bytes": resource.RLIMIT_AS,
             "file_size_bytes": resource.RLIMIT_FSIZE, "processes": resource.RLIMIT_NPROC,
             "open_files": resource.RLIMIT_NOFILE, "core_bytes": resource.RLIMIT_CORE}
    for key, value in limits.items():
        resource.setrlimit(names[key], (int(value), int(value)))


def _inside(path, root: str) -> bool:
    if isinstance(path, int):
        return True  # an already-open fd: its opening was checked (or it is stdin/stdout/stderr)
    try:
        full = os.path.realpath(os.fsdecode(os.fspath(path)))  # relative paths resolve against the cwd
    except (TypeError, ValueError):
        return False
    return full == root or full.startswith(root + os.sep) or full in ("/dev/null", "/dev/zero")


def install_audit_hook(workdir: str, block_network: bool) -> None:
    """In-interpreter guard, the layer that exists even where namespaces do not.

    Refuses writes outside the work dir, reading other processes' environments, and (when asked)
    every socket connect/bind/name lookup. Python's own C-level code is bound by it; ctypes tricks are
    not, which is why the namespaces/mount/uid layers come first where the kernel allows them.
    """
    root = os.path.realpath(workdir)

    def hook(event, args):
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            name = os.path.realpath(os.fsdecode(path)) if isinstance(path, (str, bytes)) else ""
            if name.startswith("/proc") and name.endswith("environ"):
                raise PermissionError("sandbox: reading process environments is not allowed")
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                     (isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and not _inside(path, root):
                raise PermissionError(f"sandbox: writing outside the work dir is not allowed: {path!r}")
        elif event in PATH_MUTATING_EVENTS:
            for arg in args[:2]:
                if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg, root):
                    raise PermissionError(f"sandbox: {event} outside the work dir is not allowed: {arg!r}")
        elif block_network and event in NETWORK_EVENTS:
            raise PermissionError(f"sandbox: network access is not allowed ({event})")

    sys.addaudithook(hook)


def main(config_path: str) -> None:
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    os.unlink(config_path)  # the program has no business reading its own policy
    workdir = cfg["workdir"]
    try:
        if cfg.get("readonly_fs"):
            make_filesystem_read_only_except(workdir)
        if cfg.get("drop_to_uid") is not None:
            drop_privileges(int(cfg["drop_to_uid"]))
        apply_rlimits(cfg.get("rlimits", {}))
        os.chdir(workdir)
    except OSError as exc:
        sys.stderr.write(f"sandbox setup failed: {exc}\n")
        sys.stderr.flush()
        os._exit(EXIT_SETUP_FAILED)
    install_audit_hook(workdir, block_network=bool(cfg.get("block_network_hook", True)))
    program = os.path.join(workdir, cfg["program"])
    sys.argv = [program]
    sys.path.insert(0, workdir)
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1])
