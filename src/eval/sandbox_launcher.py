"""The test runner inside a sandboxed run: lock the process down, run the program, then report.

Runs as `python -I -B launcher.pyc CONFIG` (CONFIG: the hex of marshal.dumps(dict); the .pyc compiled from
this file by the sandbox's own interpreter, once per grader, sandbox_exec.compile_for) inside the child that `sandbox.py` starts
(inside bubblewrap, or in a weak tier inside `unshare` or nothing). Standard library only: the
project's PYTHONPATH is not visible here (-I), and the untrusted program runs in this same interpreter
right after the lock-down, so every restriction below applies to it.

The report channel: the harness hands in two pipes. The launcher writes b"R" to the report pipe before
the program starts (so the harness can tell a sandbox that never came up from a program that failed),
and, only after the program ran to its end without raising, reads the per-run nonce from the nonce pipe
and writes it to the report pipe. The nonce is in no file, argv or environment variable and enters this
process's memory only after the last statement of the program (its last assertion) has run, so exiting
early in any way -- sys.exit(0), os._exit(0), atexit, an excepthook, exit() in a __main__ block -- leaves
no nonce behind and the run counts as failed, whatever its exit code.

Order of the weak-tier steps matters: mounts need privileges, so they come first; then the uid drop;
then rlimits (after the drop, so the program cannot raise them back); the audit hook last, because
installing it cannot be undone.

Every run pays this file's start-up twice over for HumanEval/MBPP (candidate and tests), so it imports
only modules an interpreter started with -S has already loaded, plus resource: posix rather than os (os
pulls in stat, posixpath and _collections_abc, ~1 ms of a cold start), marshal instead of json for the
config (json pulls in re and _json, ~10-40 ms here), and the program is compiled and executed directly
instead of through runpy (importlib + pkgutil). Harness modules the program relies on (the wire format of
sandbox_calls) arrive precompiled and are loaded under their names before it runs (`preload`).
"""
import marshal
import posix
import resource
import sys

MS_BIND = 0x1000
MS_REC = 0x4000
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (generic syscall table)
EXIT_SETUP_FAILED = 97
STARTED = b"R"

WRITE_FLAGS = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_APPEND | posix.O_TRUNC
PATH_MUTATING_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.symlink", "os.link",
                        "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree",
                        "shutil.copyfile", "shutil.move", "os.mkfifo", "os.mknod"}
NETWORK_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                  "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                  "socket.getnameinfo"}


def make_filesystem_read_only_except(workdir: str) -> None:
    """Weak tier only (bubblewrap builds its own read-only root): whole tree read-only, the work dir
    alone writable. Needs a private mount namespace and CAP_SYS_ADMIN in it."""
    import ctypes  # here, not at the top: ~10 ms of every bubblewrap run's start-up otherwise

    class _MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    def _check(result: int, what: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {posix.strerror(errno)}")

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
    posix.setgroups([])
    posix.setgid(uid)
    posix.setuid(uid)
    if posix.getuid() != uid or posix.geteuid() != uid:
        raise OSError(f"uid drop to {uid} did not hold (uid={posix.getuid()}, euid={posix.geteuid()})")


def apply_rlimits(limits: dict) -> None:
    names = {"cpu_s": resource.RLIMIT_CPU, "address_space_bytes": resource.RLIMIT_AS,
             "file_size_bytes": resource.RLIMIT_FSIZE, "processes": resource.RLIMIT_NPROC,
             "open_files": resource.RLIMIT_NOFILE, "core_bytes": resource.RLIMIT_CORE}
    for key, value in limits.items():
        resource.setrlimit(names[key], (int(value), int(value)))


def close_fds_except(keep: set) -> None:
    """Nothing the sandbox tool or the harness left open reaches the program but stdio and our pipes."""
    for name in posix.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                posix.close(fd)
            except OSError:
                pass  # the fd of the listdir itself, already gone


def _inside(path, root: str, os) -> bool:
    """os: the os module, imported by install_audit_hook (weak tiers only; the launcher itself uses posix)."""
    if isinstance(path, int):
        return True  # an already-open fd: its opening was checked (or it is stdin/stdout/stderr)
    try:
        full = os.path.realpath(os.fsdecode(os.fspath(path)))  # relative paths resolve against the cwd
    except (TypeError, ValueError):
        return False
    return full == root or full.startswith(root + os.sep) or full in ("/dev/null", "/dev/zero")


def install_audit_hook(workdir: str) -> None:
    """Weak tiers only: an in-interpreter guard refusing writes outside the work dir, reading other
    processes' environments and every socket connect/bind/name lookup. ctypes and gc tricks get past
    it, which is why bubblewrap is the default and these tiers need allow_weak_sandbox."""
    import os

    root = os.path.realpath(workdir)

    def hook(event, args):
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            name = os.path.realpath(os.fsdecode(path)) if isinstance(path, (str, bytes)) else ""
            if name.startswith("/proc") and name.endswith("environ"):
                raise PermissionError("sandbox: reading process environments is not allowed")
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                     (isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and not _inside(path, root, os):
                raise PermissionError(f"sandbox: writing outside the work dir is not allowed: {path!r}")
        elif event in PATH_MUTATING_EVENTS:
            for arg in args[:2]:
                if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg, root, os):
                    raise PermissionError(f"sandbox: {event} outside the work dir is not allowed: {arg!r}")
        elif event in NETWORK_EVENTS:
            raise PermissionError(f"sandbox: network access is not allowed ({event})")

    sys.addaudithook(hook)


def _print_program_traceback(exc: BaseException, program: str) -> None:
    """The traceback as `python program.py` would print it: frames from the launcher and runpy cut."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != program:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb or exc.__traceback__)


def exit_status(exc: SystemExit) -> int:
    """What the interpreter would exit with for this SystemExit (None -> 0, int -> itself, else 1)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    try:
        print(code, file=sys.stderr)
    except Exception:  # a program-made object whose __str__ raises
        pass
    return 1


def preload(modules: dict) -> None:
    """Trusted harness modules, each executed into a fresh module registered as sys.modules[name] before
    the program runs: a .pyc compiled by this interpreter (bubblewrap tier) or a source file (weak tiers)."""
    for name, path in modules.items():
        with open(path, "rb") as f:
            data = f.read()
        code = marshal.loads(data[16:]) if path.endswith(".pyc") else compile(data, path, "exec", dont_inherit=True)
        module = type(sys)(name)
        module.__file__ = path
        exec(code, module.__dict__)
        sys.modules[name] = module


def run_program(program: str, run_name: str, workdir: str) -> int | None:
    """Run the program to its end. None = it returned normally; else the exit status it asked for."""
    sys.argv = [program]
    sys.path.insert(0, workdir)
    module = type(sys)(run_name)  # as runpy.run_path does: a fresh module, in sys.modules while it runs
    module.__file__, module.__cached__ = program, None
    previous = sys.modules.get(run_name)
    sys.modules[run_name] = module
    try:
        with open(program, "rb") as f:
            code = compile(f.read(), program, "exec", dont_inherit=True)
        exec(code, module.__dict__)
    except SystemExit as exc:
        return exit_status(exc)
    except BaseException as exc:  # noqa: BLE001 -- the program's failure, reported like the interpreter does
        _print_program_traceback(exc, program)
        return 1
    finally:
        if previous is not None:
            sys.modules[run_name] = previous
    return None


def main(argv: list) -> None:
    cfg = marshal.loads(bytes.fromhex(argv[1]))
    workdir, nonce_fd, report_fd = cfg["workdir"], int(cfg["nonce_fd"]), int(cfg["report_fd"])
    # The epilogue's tools, taken before the program can rebind them in the os module.
    read, write, close, flush_out, flush_err = posix.read, posix.write, posix.close, sys.stdout.flush, sys.stderr.flush
    try:
        if cfg.get("readonly_fs"):
            make_filesystem_read_only_except(workdir)
        if cfg.get("drop_to_uid") is not None:
            drop_privileges(int(cfg["drop_to_uid"]))
        apply_rlimits(cfg.get("rlimits", {}))
        posix.chdir(workdir)
        hold_fd = cfg.get("hold_fd")
        close_fds_except({0, 1, 2, nonce_fd, report_fd, *map(int, cfg.get("keep_fds", ())),
                          *(() if hold_fd is None else (int(hold_fd),))})
        posix.set_inheritable(nonce_fd, False)
        posix.set_inheritable(report_fd, False)
        if hold_fd is not None:  # the host moves this run into its own cgroup first; nothing runs until then
            released = read(int(hold_fd), 1)
            close(int(hold_fd))
            if released != b"G":
                raise OSError("the host did not release the run (its cgroup could not be entered)")
        preload(cfg.get("preload", {}))
        write(report_fd, STARTED)
    except OSError as exc:
        sys.stderr.write(f"sandbox setup failed: {exc}\n")
        sys.stderr.flush()
        posix._exit(EXIT_SETUP_FAILED)
    if cfg.get("audit_hook"):
        install_audit_hook(workdir)
    status = run_program(cfg["program"], cfg.get("run_name", "__main__"), workdir)
    if status is None:  # the epilogue: the program's last statement has run
        for flush in (flush_out, flush_err):
            try:
                flush()
            except Exception:  # a closed or replaced stream is the program's business
                pass
        try:
            write(report_fd, read(nonce_fd, 256))
        except OSError:
            pass  # the program closed or stuffed our pipes: no nonce, the run counts as failed
        status = 0
    for fd in (report_fd, nonce_fd):
        try:
            close(fd)
        except OSError:
            pass
    sys.exit(status)


if __name__ == "__main__":
    main(sys.argv)
