"""Adversarial programs through the sandbox: each is contained, scored wrong, and the next correct
program still passes. Kernel-level layers (namespaces, read-only mounts) are also checked directly with
ctypes calls that bypass the in-interpreter audit hook, where this machine's isolation has those layers."""
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import sandbox

LIMITS = sandbox.SandboxLimits(timeout_s=2.0, memory_mb=512, max_processes=4, max_output_bytes=1_000_000)
CORRECT = "a, b = map(int, input().split())\nprint(a + b)\n"
SECRET = "hf_sandboxTestSecretValue0123456789"


@pytest.fixture(scope="module")
def iso():
    return sandbox.detect_isolation()


def still_works(iso):
    r = sandbox.run_python(CORRECT, stdin="2 40\n", limits=LIMITS, isolation=iso)
    assert r.status == "ok" and r.stdout.strip() == "42", r


def tagged(prog: str) -> tuple:
    """(tag, program): the program first names its process `tag` (comm, inherited by every fork), so
    the test can find exactly this run's processes on the host while other sandboxes run beside it."""
    tag = "moe-t-" + os.urandom(4).hex()
    return tag, f"import ctypes as _c\n_c.CDLL(None).prctl(15, {tag.encode()!r}, 0, 0, 0)\n" + prog.replace("@TAG@", tag)


def processes_named(tag: str) -> list:
    """Host processes whose name (comm) or command line carries `tag` (there should be none left)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_bytes()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = [line for line in (entry / "status").read_bytes().splitlines() if line.startswith(b"State:")]
        except OSError:
            continue
        if (tag.encode() in comm or tag.encode() in cmd) and not (state and b"Z" in state[0].split()[1]):
            alive.append((entry.name, comm.strip(), cmd[:120]))
    return alive


def test_correct_program_runs_and_reports_isolation(iso):
    r = sandbox.run_python(CORRECT, stdin="1 2\n", limits=LIMITS, isolation=iso)
    assert r.ok and r.stdout == "3\n" and r.returncode == 0
    assert iso.name in r.isolation
    print("isolation used:", r.isolation)


def test_program_errors_are_wrong_not_crashes(iso):
    r = sandbox.run_python("raise ValueError('boom')", limits=LIMITS, isolation=iso)
    assert r.status == "error" and "ValueError: boom" in r.stderr
    still_works(iso)


def test_infinite_loop_times_out_and_is_killed(iso):
    start = time.monotonic()
    tag, prog = tagged("while True:\n    pass\n")
    r = sandbox.run_python(prog, limits=LIMITS, isolation=iso)
    assert r.status == "timeout" and not r.ok
    assert time.monotonic() - start < LIMITS.timeout_s + 2.0
    assert processes_named(tag) == []
    still_works(iso)


def test_fork_bomb_is_contained(iso):
    bomb = ("import os, time\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        time.sleep(0.01)\n")
    start = time.monotonic()
    tag, bomb = tagged(bomb)
    r = sandbox.run_python(bomb, limits=LIMITS, isolation=iso)
    assert not r.ok and r.status in ("timeout", "error")
    assert time.monotonic() - start < LIMITS.timeout_s + 3.0
    time.sleep(0.2)
    assert processes_named(tag) == []
    still_works(iso)


def test_background_children_die_with_the_program(iso):
    prog = ("import os, time\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"  # try to escape the process group too
            "        time.sleep(60)\n"
            "        os._exit(0)\n"
            "print('parent done')\n")
    tag, prog = tagged(prog)
    r = sandbox.run_python(prog, limits=LIMITS, isolation=iso)
    assert "parent done" in r.stdout
    time.sleep(0.3)
    if "pidns" in iso.name:  # without a pid namespace a setsid() child can outlive its group
        assert processes_named(tag) == []
    still_works(iso)


@pytest.mark.parametrize("bomb", [
    "x = bytearray(4 * 1024 ** 3)\nprint('allocated')\n",
    "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 ** 2))\n",
], ids=["one-shot", "growing"])
def test_memory_bomb_is_contained(iso, bomb):
    r = sandbox.run_python(bomb, limits=LIMITS, isolation=iso)
    assert not r.ok and "allocated" not in r.stdout
    assert r.status in ("error", "timeout")
    still_works(iso)


def test_write_outside_workdir_is_refused(iso, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)  # so only the sandbox, not plain permissions, can stop the write
    target = outside / "pwned.txt"
    prog = (f"open({str(target)!r}, 'w').write('pwned')\n"
            "open('inside.txt', 'w').write('fine')\n")
    r = sandbox.run_python(prog, limits=LIMITS, isolation=iso)
    assert not r.ok and not target.exists()
    ok_inside = sandbox.run_python("open('inside.txt','w').write('x')\nprint(open('inside.txt').read())",
                                   limits=LIMITS, isolation=iso)
    assert ok_inside.ok and ok_inside.stdout.strip() == "x"
    still_works(iso)


def test_write_outside_via_raw_syscall_blocked_by_readonly_mounts(iso, tmp_path):
    if not iso.readonly_fs:
        pytest.skip(f"isolation {iso.name} has no read-only mount layer on this machine")
    outside = tmp_path / "outside_raw"
    outside.mkdir()
    outside.chmod(0o777)
    target = outside / "pwned.txt"
    prog = ("import ctypes, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            f"fd = libc.open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o666)\n"
            "print('fd', fd, ctypes.get_errno())\n"
            "if fd >= 0:\n"
            "    libc.write(fd, b'pwned', 5)\n"
            "    raise SystemExit(0)\n"
            "raise SystemExit(3)\n")
    r = sandbox.run_python(prog, limits=LIMITS, isolation=iso)
    assert r.returncode == 3 and not target.exists(), r
    still_works(iso)


@pytest.fixture()
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.setblocking(False)
    yield srv
    srv.close()


def _got_connection(srv) -> bool:
    readable, _, _ = select.select([srv], [], [], 0.2)
    return bool(readable)


def test_network_connect_is_refused(iso, listener):
    port = listener.getsockname()[1]
    prog = ("import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'exfiltrated')\nprint('connected')\n")
    r = sandbox.run_python(prog, limits=LIMITS, isolation=iso)
    assert not r.ok and "connected" not in r.stdout
    assert not _got_connection(listener)
    still_works(iso)


def test_network_raw_syscall_blocked_by_net_namespace(iso, listener):
    if "netns" not in iso.name:
        pytest.skip(f"isolation {iso.name} has no network namespace on this machine")
    port = listener.getsockname()[1]
    prog = ("import ctypes, socket, struct\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
            f"addr = struct.pack('!HH4s8x', socket.AF_INET, {port}, socket.inet_aton('127.0.0.1'))\n"
            "addr = struct.pack('=H', socket.AF_INET) + addr[2:]\n"
            "rc = libc.connect(fd, addr, len(addr))\n"
            "print('rc', rc, ctypes.get_errno())\n"
            "raise SystemExit(0 if rc == 0 else 3)\n")
    r = sandbox.run_python(prog, limits=LIMITS, isolation=iso)
    assert r.returncode == 3, r
    assert not _got_connection(listener)
    still_works(iso)


def test_secrets_do_not_reach_the_program(iso, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    # A process that really holds the secret in its environment block (os.environ edits in this process do
    # not show in /proc/<pid>/environ), as the grader's parent would.
    holder = subprocess.Popen(["sleep", "30"], env={**os.environ, "HF_TOKEN": SECRET})
    try:
        prog = ("import os, ctypes\n"
                "print(dict(os.environ))\n"
                f"for pid in ('self', '1', {str(holder.pid)!r}, {str(os.getpid())!r}):\n"
                "    try:\n"
                "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
                "    except Exception as e:\n"
                "        print('refused', pid, type(e).__name__)\n"
                "libc = ctypes.CDLL(None, use_errno=True)\n"
                f"fd = libc.open(b'/proc/{holder.pid}/environ', os.O_RDONLY)\n"
                "buf = ctypes.create_string_buffer(65536)\n"
                "n = libc.read(fd, buf, 65536) if fd >= 0 else -1\n"
                "print('raw', buf.raw[:max(n, 0)])\n")
        r = sandbox.run_python(prog, limits=LIMITS, isolation=iso)
        assert "HF_TOKEN" not in r.stdout.split("\n")[0]
        assert SECRET not in r.stdout and SECRET not in r.stderr
        assert SECRET.encode().hex() not in r.stdout
    finally:
        holder.kill()
        holder.wait()
    still_works(iso)


def test_huge_stdout_is_capped_quickly(iso):
    prog = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)\n"
    start = time.monotonic()
    r = sandbox.run_python(prog, limits=LIMITS, isolation=iso)
    assert r.status == "output_limit" and not r.ok
    assert len(r.stdout) <= LIMITS.max_output_bytes
    assert time.monotonic() - start < LIMITS.timeout_s + 1.0
    still_works(iso)


def test_workdir_is_removed_after_run(iso):
    r = sandbox.run_python("import os\nprint(os.getcwd())\nopen('junk.bin','wb').write(b'0' * 1000)\n",
                           limits=LIMITS, isolation=iso)
    assert r.ok
    assert not Path(r.stdout.strip()).exists()


def test_clean_environment_is_an_allow_list(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    env = sandbox.clean_environment("/tmp/x")
    assert SECRET not in env.values() and "HF_TOKEN" not in env
    assert env["HOME"] == "/tmp/x"


def test_limits_validate():
    with pytest.raises(ValueError, match="timeout_s"):
        sandbox.SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        sandbox.SandboxLimits(memory_mb=8)


@pytest.fixture(scope="module")
def no_namespace_iso(iso):
    """The last-resort configuration (machines where unshare is refused), forced here so it stays tested."""
    fallback = [c for c in sandbox.candidate_isolations(os.geteuid() == 0, (iso.python,)) if c.kind == "plain"][0]
    probe = sandbox.run_python("print('ok')", limits=LIMITS, isolation=fallback)
    assert probe.ok, probe
    return fallback


@pytest.mark.parametrize("name, prog", [
    ("network", "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\nprint('connected')\n"),
    ("dns", "import socket\nprint(socket.getaddrinfo('example.com', 80))\n"),
    ("write", "open('/tmp/moe_sbx_fallback_pwned', 'w').write('x')\nprint('connected')\n"),
    ("loop", "while True:\n    pass\n"),
    ("memory", "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 ** 2))\n"),
])
def test_fallback_without_namespaces_still_contains(no_namespace_iso, name, prog):
    r = sandbox.run_python(prog, limits=LIMITS, isolation=no_namespace_iso)
    assert not r.ok and "connected" not in r.stdout, r
    assert not Path("/tmp/moe_sbx_fallback_pwned").exists()
    assert "no namespaces" in r.isolation
    still_works(no_namespace_iso)


# ------------------------------------------------------------------ real isolation (issue 9: bubblewrap)

NOBODY = 65534
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # rmdir on this box's disk: ~3 ms each


@pytest.fixture()
def world_dir():
    """A scratch dir every user can enter (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="moe-sbx-test-", dir=SCRATCH)
    os.chmod(path, 0o755)
    yield Path(path)
    sandbox.remove_tree(path)


def run_grader_as_nobody(stage: Path, grader_script: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run `grader_script` (stdlib only; `sandbox` importable) as an unprivileged grader: uid 65534 via
    setpriv when this test runs as root (CI), else as the current (already non-root) user."""
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("no /usr/bin/python3 for the unprivileged grader")
    modules = ("sandbox.py", "sandbox_exec.py", "sandbox_launcher.py", "sandbox_memory.py")
    for name in modules:
        shutil.copyfile(Path(sandbox.__file__).with_name(name), stage / name)
    (stage / "grader.py").write_text(f"import sys\nsys.path.insert(0, {str(stage)!r})\n" + grader_script)
    for name in (*modules, "grader.py"):
        (stage / name).chmod(0o644)
    prefix = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"] if os.geteuid() == 0 else []
    env = {"PATH": "/usr/bin:/bin", "HOME": str(stage / "home")}
    return subprocess.run([*prefix, python, "-I", str(stage / "grader.py")], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(stage))


ESCAPE_PROGRAM = r'''
import ctypes, json, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def rec(key, rc):
    out[key] = [rc, ctypes.get_errno()]
MS_REMOUNT, MS_BIND = 32, 4096
points = [line.split()[4] for line in open("/proc/self/mountinfo")]
home_mount = max((p for p in points if HOME == p or HOME.startswith(p.rstrip("/") + "/")), key=len)
class Attr(ctypes.Structure):
    _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64), ("prop", ctypes.c_uint64), ("fd", ctypes.c_uint64)]
clear_ro = Attr(0, 1, 0, 0)  # mount_setattr without AT_RECURSIVE: clear MOUNT_ATTR_RDONLY on one mount
for target in dict.fromkeys(("/", "/usr", home_mount)):
    rec("remount " + target, libc.mount(b"none", target.encode(), None, MS_REMOUNT | MS_BIND, None))
    rec("mount_setattr " + target,
        libc.syscall(442, -100, target.encode(), 0, ctypes.byref(clear_ro), ctypes.sizeof(clear_ro)))
rec("unshare user+mount", libc.unshare(0x10000000 | 0x00020000))
rec("remount / after unshare", libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None))
fd = libc.open((HOME + "/pwned").encode(), os.O_WRONLY | os.O_CREAT, 0o644)
rec("write home", fd)
if fd >= 0:
    libc.write(fd, b"pwned", 5)
for key, name in (("unix path", SOCK.encode()), ("unix abstract", b"\0" + ABSTRACT.encode())):
    s = libc.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
    addr = struct.pack("=H", socket.AF_UNIX) + name
    rec("connect " + key, libc.connect(s, addr, len(addr)))
print(json.dumps(out))
'''


def test_non_root_grader_cannot_be_escaped(world_dir):
    """As uid 65534: remounting read-only mounts writable (directly, or in a nested user namespace) fails,
    the grading user's home stays unwritten, and unix sockets on the host (by path and abstract) are
    unreachable. The old launcher lost all three: the program was root in its own user namespace."""
    home = world_dir / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    sock_path, abstract = str(world_dir / "grader.sock"), "moe-sbx-test-" + os.urandom(4).hex()
    servers = []
    for addr in (sock_path, "\0" + abstract):
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(addr)
        srv.listen(5)
        srv.setblocking(False)
        servers.append(srv)
    os.chmod(sock_path, 0o777)  # only the sandbox, not permissions, may stop the connect
    try:
        program = f"HOME, SOCK, ABSTRACT = {str(home)!r}, {sock_path!r}, {abstract!r}\n" + ESCAPE_PROGRAM
        grader = ("import json, os, socket, sandbox\n"
                  "control = socket.socket(socket.AF_UNIX)\n"  # the grading user itself can reach the socket
                  f"control.connect({sock_path!r})\n"
                  "control.close()\n"
                  "iso = sandbox.detect_isolation()\n"
                  f"r = sandbox.run_python({program!r}, limits=sandbox.SandboxLimits(timeout_s=20), isolation=iso)\n"
                  "print(json.dumps({'uid': os.getuid(), 'iso': r.isolation, 'status': r.status, "
                  "'stdout': r.stdout, 'stderr': r.stderr[-2000:]}))\n")
        proc = run_grader_as_nobody(world_dir, grader)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["uid"] != 0 and report["status"] == "ok", report
        assert report["iso"].startswith("bwrap"), report
        attempts = json.loads(report["stdout"])
        assert attempts and all(rc < 0 for rc, _ in attempts.values()), attempts
        assert not (home / "pwned").exists()
        servers[0].accept()[0].close()  # the grader's own control connection, outside the sandbox
        for srv in servers:
            readable, _, _ = select.select([srv], [], [], 0.2)
            assert not readable, "a sandboxed program reached a unix socket on the host"
    finally:
        for srv in servers:
            srv.close()


def test_memory_budget_is_per_run_not_per_process(iso):
    """4 children x 400 MiB under a 512 MiB budget: refused (the old per-process limit held 1.6 GiB)."""
    prog = ("import os, time\n"
            "kids = []\n"
            "for _ in range(4):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        continue\n"
            "    if pid == 0:\n"
            "        try:\n"
            "            block = bytearray(400 << 20)\n"
            "            block[::4096] = b'x' * len(range(0, len(block), 4096))\n"
            "        except MemoryError:\n"
            "            os._exit(3)\n"
            "        time.sleep(1.0)\n"
            "        os._exit(0)\n"
            "    kids.append(pid)\n"
            "held = sum(os.waitpid(k, 0)[1] == 0 for k in kids)\n"
            "print('held', held)\n")
    limits = sandbox.SandboxLimits(timeout_s=10, memory_mb=512)
    r = sandbox.run_python(prog, limits=limits, isolation=iso)
    assert r.ok, r
    held = int(r.stdout.split()[-1])
    assert held * 400 <= limits.memory_mb, r.stdout
    assert limits.max_processes * limits.process_memory_mb() + limits.workdir_mb <= limits.memory_mb


def test_workdir_cannot_exceed_its_size(iso):
    prog = ("import os\n"
            "written = 0\n"
            "try:\n"
            "    for i in range(64):\n"
            "        with open(f'f{i}.bin', 'wb') as f:\n"
            "            f.write(b'0' * (1 << 20))\n"
            "        written += 1\n"
            "except OSError as exc:\n"
            "    print('refused', exc.errno)\n"
            "print('written', written)\n")
    limits = sandbox.SandboxLimits(timeout_s=10, workdir_mb=8)
    r = sandbox.run_python(prog, limits=limits, isolation=iso)
    assert r.ok and "refused" in r.stdout, r
    assert int(r.stdout.split()[-1]) <= limits.workdir_mb


def test_grader_sigkill_leaves_no_sandboxed_process(iso, world_dir):
    """The program, its children, a setsid() child and a double-forked daemon all die with the grader."""
    tag, prog = tagged("import os, subprocess, sys, time\n"
                       "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '@TAG@'])\n"
                       "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '@TAG@'],\n"
                       "                 start_new_session=True)\n"
                       "if os.fork() == 0:\n"
                       "    os.setsid()\n"
                       "    if os.fork() == 0:\n"
                       "        time.sleep(60)\n"
                       "    os._exit(0)\n"
                       "time.sleep(60)\n")
    grader = world_dir / "grader.py"
    grader.write_text("import sys\n"
                      f"sys.path.insert(0, {str(Path(sandbox.__file__).parent)!r})\n"
                      "import sandbox\n"
                      f"sandbox.run_python({prog!r}, limits=sandbox.SandboxLimits(timeout_s=60, max_processes=6), "
                      f"isolation=sandbox.{iso!r})\n")
    proc = subprocess.Popen([sys.executable, str(grader)])
    try:
        deadline = time.monotonic() + 20
        while len(processes_named(tag)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(processes_named(tag)) >= 4, processes_named(tag)  # launcher, 2 children, the daemon
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while processes_named(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_named(tag) == []


DEEP_TREE = ("import ctypes, os\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"  # raw calls: the weak tier's audit hook would stop at PATH_MAX
             "for _ in range(3000):\n"
             "    assert libc.mkdir(b'd', 0o755) == 0 and libc.chdir(b'd') == 0\n"
             "libc.chmod(b'.', 0)\n"
             "print('deep')\n")


def test_deep_tree_is_cleaned_up_without_recursion_error(iso, no_namespace_iso, world_dir, monkeypatch):
    if SCRATCH:
        monkeypatch.setattr(tempfile, "tempdir", SCRATCH)  # where the weak tier makes its work dir
    for isolation in (iso, no_namespace_iso):
        before = set(Path(tempfile.gettempdir()).glob("moe-sbx-*"))
        r = sandbox.run_python(DEEP_TREE, limits=LIMITS, isolation=isolation)
        assert r.ok and r.stdout.strip() == "deep", r
        assert set(Path(tempfile.gettempdir()).glob("moe-sbx-*")) - before - {world_dir} == set()
    # the remover on its own: deeper than the recursion limit, PATH_MAX and 1024 open files
    fd = os.open(world_dir, os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    sandbox.remove_tree(str(world_dir))
    assert not world_dir.exists()


def test_code_refuses_to_run_without_real_isolation(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    sandbox.detect_isolation.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="bubblewrap.*--allow-weak-sandbox"):
            sandbox.detect_isolation()
        with pytest.raises(RuntimeError, match="no real sandbox"):
            sandbox.run_python("print(1)", limits=LIMITS)
        weak = sandbox.detect_isolation(allow_weak=True)
        assert not weak.strong and weak.describe().startswith("WEAK SANDBOX")
        r = sandbox.run_python("print(1)", limits=sandbox.SandboxLimits(allow_weak_sandbox=True))
        assert r.ok and r.isolation.startswith("WEAK SANDBOX")
    finally:
        sandbox.detect_isolation.cache_clear()


def test_limits_split_the_budget():
    limits = sandbox.SandboxLimits(memory_mb=2048, max_processes=4, workdir_mb=64)
    assert limits.process_memory_mb() == 496
    assert limits.rlimits(extra_tasks=1)["processes"] == 5
    with pytest.raises(ValueError, match="max_processes"):
        sandbox.SandboxLimits(memory_mb=512, max_processes=16)
    with pytest.raises(ValueError, match="workdir_mb"):
        sandbox.SandboxLimits(memory_mb=512, workdir_mb=512)


# ------------------------------------------------------------- memory the kernel holds for the program
# Each tries to hold 3x a 512 MiB budget outside the program's address space; the last line prints only
# when it got there. All must be refused or killed, the grader must live on, and the sample is wrong
# with the reason in its detail.
KERNEL_MEMORY = {
    "memfd": ("import os\nfds = []\nchunk = b'x' * (1 << 20)\nfor _ in range(48):\n"
              "    fds.append(os.memfd_create('m'))\n    for _ in range(32):\n        os.write(fds[-1], chunk)\n"
              "print('held', 48 * 32)\n", "PermissionError"),
    "SysV shm": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n"
                 "for _ in range(24):\n    sid = libc.shmget(0, 64 << 20, 0o1600)\n"
                 "    if sid < 0:\n        raise OSError(ctypes.get_errno(), 'shmget refused')\n"
                 "    addr = libc.shmat(sid, None, 0)\n    ctypes.memset(addr, 1, 64 << 20)\n"
                 "    libc.shmdt(ctypes.c_void_p(addr))\nprint('held', 24 * 64)\n", "shmget refused"),
    "POSIX shm": ("from multiprocessing import shared_memory\n"
                  "m = shared_memory.SharedMemory(create=True, size=1536 << 20)\n"
                  "m.buf[:] = b'x' * (1536 << 20)\nprint('held', 1536)\n", "Error"),
    "/dev/shm file": ("chunk = b'x' * (1 << 20)\nwith open('/dev/shm/fill', 'wb') as f:\n"
                      "    for _ in range(1536):\n        f.write(chunk)\nprint('held', 1536)\n", "Error"),
}


@pytest.mark.parametrize("name", sorted(KERNEL_MEMORY))
def test_kernel_held_memory_cannot_pass_the_budget(iso, name):
    import bench_grade

    program, reason = KERNEL_MEMORY[name]
    limits = sandbox.SandboxLimits(timeout_s=20.0, memory_mb=512)
    tests = [{"input": "", "output": "held 1536\n", "testtype": "stdin"}]
    graded = bench_grade.grade_code_tests(tests, None, f"```python\n{program}```", limits)
    assert graded.correct is False and graded.detail["passed"] == 0, graded.detail
    assert reason in graded.detail["error"], graded.detail
    still_works(iso)  # the grader lives on


@pytest.mark.parametrize("name", ["memfd", "SysV shm"])
def test_without_the_seccomp_filter_the_same_programs_hold_3x_the_budget(iso, name):
    """Control: rlimits and the read-only /dev alone let these through, so the test above can fail."""
    import dataclasses

    import bench_grade

    limits = sandbox.SandboxLimits(timeout_s=20.0, memory_mb=512)
    tests = [{"input": "", "output": "held 1536\n", "testtype": "stdin"}]
    bare = dataclasses.replace(iso, seccomp=False)
    graded = bench_grade.grade_code_tests(tests, None, f"```python\n{KERNEL_MEMORY[name][0]}```", limits, isolation=bare)
    assert graded.correct, graded.detail


def test_seccomp_filter_jumps_land_on_deny_or_allow():
    import struct

    import sandbox_memory as sm

    for machine in sm.DENIED:
        prog = sm.seccomp_filter(machine)
        insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
        assert insns[-1] == (0x06, 0, 0, 0x00050000 | 1) and insns[-2] == (0x06, 0, 0, 0x7FFF0000)
        jumps = [(i, code, jt, jf) for i, (code, jt, jf, _k) in enumerate(insns) if code in (0x15, 0x35)]
        denied = {k for code, _jt, _jf, k in insns if code == 0x15} - {sm.AUDIT_ARCH[machine]}
        assert denied == set(sm.DENIED[machine].values())
        for i, code, jt, jf in jumps:
            assert i + 1 + jt < len(insns) and i + 1 + jf < len(insns)
            if jt:  # every taken syscall match goes to the final EPERM
                assert i + 1 + jt == len(insns) - 1


def test_memory_mechanisms_are_recorded(iso):
    assert "seccomp" in iso.describe()
    import sandbox_memory

    assert any("seccomp(" in m for m in sandbox_memory.mechanisms(True, True, 64, 32))
    assert not any("seccomp(" in m for m in sandbox_memory.mechanisms(False, False, 64, 32))


def test_kernel_held_memory_is_refused_under_an_unprivileged_grader(world_dir):
    programs = {name: prog for name, (prog, _reason) in KERNEL_MEMORY.items()}
    grader = ("import json, os, sandbox\n"
              f"programs = json.loads({json.dumps(programs)!r})\n"
              "limits = sandbox.SandboxLimits(timeout_s=20.0, memory_mb=512)\n"
              "out = {'uid': os.getuid()}\n"
              "for name, prog in programs.items():\n"
              "    r = sandbox.run_python(prog, limits=limits)\n"
              "    out[name] = [r.status, 'held' in r.stdout, r.isolation[:5]]\n"
              "print(json.dumps(out))\n")
    proc = run_grader_as_nobody(world_dir, grader, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report.pop("uid") != 0
    assert all(status != "ok" and not held and iso == "bwrap" for status, held, iso in report.values()), report
