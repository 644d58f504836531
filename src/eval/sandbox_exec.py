"""The host side of one sandboxed run: the bubblewrap command line, collecting the program's output,
stopping the whole run, and removing what a weak tier left on disk. Standard library only, no policy:
`sandbox.py` decides what runs where and with which limits."""
from __future__ import annotations

import json
import marshal
import os
import selectors
import signal
import subprocess
import time

BWRAP_WORKDIR = "/sandbox"
BWRAP_HARNESS = "/harness"


def root_links() -> list:
    """bwrap args recreating the host's top-level merged-/usr links (/bin -> usr/bin ...) or binding the
    real dirs where the host has no merged /usr."""
    args = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{name}"
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            args += ["--ro-bind", host, host]
    return args


def python_binds(python: str) -> list:
    """The interpreter's prefix, when it lives outside /usr (pyenv, conda)."""
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    return [] if prefix == "/usr" or prefix.startswith("/usr/") else ["--ro-bind", prefix, prefix]


def bwrap_command(tool: str, python: str, workdir_bytes: int, environment: dict, files: dict, entry: str,
                  launcher_config: dict, info_fd: int, seccomp_fd: int | None = None, site: bool = True) -> list:
    """The full bwrap argv. Order matters: every mount, then the read-only remounts of / and /dev.
    files: {path inside: fd of a memfd}, each bound read-only (the program, the compiled launcher, ...);
    entry: the file Python runs (the launcher). seccomp_fd: a compiled seccomp BPF program
    (sandbox_memory) bwrap installs before the program runs."""
    args = [tool, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox", "--info-fd", str(info_fd),
            *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
            "--ro-bind", "/usr", "/usr", *root_links(), *python_binds(python)]
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(workdir_bytes), "--tmpfs", BWRAP_WORKDIR, "--symlink", BWRAP_WORKDIR, "/tmp"]
    for path, fd in files.items():
        args += ["--ro-bind-data", str(fd), path]
    args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", BWRAP_WORKDIR, "--clearenv"]
    for key, value in environment.items():
        args += ["--setenv", key, value]
    return args + ["--", python, "-I", "-B", *(() if site else ("-S",)), entry, launcher_argument(launcher_config)]


# Run once per interpreter by that interpreter: its own bytecode and magic number, which may differ from
# the grader's (a venv's 3.12 grading with /usr/bin/python3.11 in the sandbox).
COMPILE_PYC = """import marshal, sys
from importlib.util import MAGIC_NUMBER
sources = marshal.loads(sys.stdin.buffer.read())
sys.stdout.buffer.write(marshal.dumps({name: MAGIC_NUMBER + bytes(12) + marshal.dumps(compile(text, path, "exec",
    dont_inherit=True)) for name, (path, text) in sources.items()}))
"""
PYC_HEADER_BYTES = 16


def compile_for(python: str, sources: dict, timeout_s: float = 60.0) -> dict:
    """{name: (path it will have, source)} -> {name: .pyc bytes} compiled by `python` itself. Saves every
    sandboxed process the compile of the harness (~2-3 ms of a cold interpreter's start-up each)."""
    done = subprocess.run([python, "-I", "-S", "-B", "-c", COMPILE_PYC], input=marshal.dumps(sources),
                          capture_output=True, timeout=timeout_s, env={"PATH": "/usr/bin:/bin"}, cwd="/")
    if done.returncode != 0:
        raise RuntimeError(f"{python} could not compile the sandbox harness: "
                           f"{done.stderr.decode(errors='replace').strip()[-300:]}")
    return marshal.loads(done.stdout)


def launcher_argument(config: dict) -> str:
    """The launcher's config as it reads it: marshal (a builtin module, no import cost there), in hex."""
    return marshal.dumps(config).hex()


def memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)  # close-on-exec; pass_fds hands it to the one child that needs it
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# ------------------------------------------------------------------------------------- running

def remove_tree(path: str) -> None:
    """rm -rf without recursion and with one open fd (a program can leave a tree deeper than Python's
    recursion limit, than PATH_MAX and than the open-files limit); unreadable dirs are made readable."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW

    def open_dir(name, parent=None):
        try:
            return os.open(name, flags, dir_fd=parent)
        except PermissionError:
            os.chmod(name, 0o700, dir_fd=parent)
            return os.open(name, flags, dir_fd=parent)

    try:
        fd = open_dir(path)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(path)
        return
    names, pending = [], [None]  # the path below `path` by name; per level, subdirs still to remove
    try:
        while True:
            if pending[-1] is None:
                subdirs = []
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                        else:
                            os.unlink(entry.name, dir_fd=fd)
                pending[-1] = subdirs
            if pending[-1]:
                child = pending[-1].pop()
                down = open_dir(child, fd)
                os.close(fd)
                fd = down
                names.append(child)
                pending.append(None)
                continue
            pending.pop()
            if not names:
                break
            up = os.open("..", flags & ~os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def kill_group(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
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


def stop_group(proc: subprocess.Popen) -> None:
    kill_group(proc)
    proc.wait()
    kill_group(proc, grace_s=2.0)


def stop_bwrap(proc: subprocess.Popen, info_fd: int, child_pid: int | None = None) -> None:
    """SIGKILL the sandbox's pid 1 first: the kernel then kills everything in its pid namespace, and
    bwrap (our child) exits only once that pid 1 is reaped, so when this returns nothing of the run is
    left. (Killing bwrap first would return while the namespace is still being torn down.)"""
    child = child_pid
    if child is None:
        try:
            child = json.loads(read_available(info_fd).decode() or "{}").get("child-pid")
        except ValueError:
            child = None
    if child and proc.poll() is None:
        try:
            os.kill(int(child), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
    stop_group(proc)


def collect(proc: subprocess.Popen, timeout_s: float, max_output_bytes: int, stop, cancel_fd: int | None = None) -> tuple:
    """Read both pipes until EOF, the deadline, the output cap or `cancel_fd` becoming readable (the
    caller closed its write end: another process of the same check is done), then stop(proc);
    returns (stdout, stderr, why_killed)."""
    deadline = time.monotonic() + timeout_s
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    if cancel_fd is not None:
        sel.register(cancel_fd, selectors.EVENT_READ, "cancel")
    killed = None
    exited_at = None
    while len(sel.get_map()) > (cancel_fd is not None):
        now = time.monotonic()
        if now >= deadline:
            killed = "timeout"
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 0.2:
            break  # the program is gone; a leftover grandchild holding the pipe gets killed below
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            if key.data == "cancel":
                killed = "cancelled"
                break
            chunk = key.fileobj.read(65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = buffers[key.fileobj]
            buf += chunk[: max(0, max_output_bytes + 1 - len(buf))]
            if len(buf) > max_output_bytes:
                killed = "output_limit"
                break
        if killed:
            break
    sel.close()
    stop(proc)
    out, err = (bytes(buffers[s][: max_output_bytes]).decode("utf-8", "replace")
                for s in (proc.stdout, proc.stderr))
    return out, err, killed


def wait_child_pid(info_fd: int, timeout_s: float) -> int:
    """The sandbox's pid 1 (host pid) from bwrap's --info-fd, waiting for bwrap to write it."""
    deadline, data = time.monotonic() + timeout_s, b""
    while True:
        try:
            return int(json.loads(data.decode())["child-pid"])
        except (ValueError, KeyError):
            pass
        left = deadline - time.monotonic()
        if left <= 0 or not _readable(info_fd, left):
            raise OSError(f"bwrap reported no child pid within {timeout_s:g} s")
        chunk = os.read(info_fd, 4096)
        if not chunk:
            raise OSError("bwrap exited before reporting its child pid")
        data += chunk


def _readable(fd: int, timeout_s: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(timeout_s))


def read_available(fd: int, limit: int = 1 << 16) -> bytes:
    os.set_blocking(fd, False)
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)
