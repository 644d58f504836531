"""Adversarial programs through the sandbox: each is contained, scored wrong, and the next correct
program still passes. Kernel-level layers (namespaces, read-only mounts) are also checked directly with
ctypes calls that bypass the in-interpreter audit hook, where this machine's isolation has those layers."""
import os
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

import sandbox

LIMITS = sandbox.SandboxLimits(timeout_s=2.0, memory_mb=512, max_processes=16, max_output_bytes=1_000_000)
CORRECT = "a, b = map(int, input().split())\nprint(a + b)\n"
SECRET = "hf_sandboxTestSecretValue0123456789"


@pytest.fixture(scope="module")
def iso():
    return sandbox.detect_isolation()


def still_works(iso):
    r = sandbox.run_python(CORRECT, stdin="2 40\n", limits=LIMITS, isolation=iso)
    assert r.status == "ok" and r.stdout.strip() == "42", r


def sandbox_processes_alive() -> list:
    """Launcher processes of this test process's sandboxes still running (there should be none)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"moe-sbx-" in cmd and b"_launcher.py" in cmd:
            alive.append((entry.name, cmd[:120]))
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
    r = sandbox.run_python("while True:\n    pass\n", limits=LIMITS, isolation=iso)
    assert r.status == "timeout" and not r.ok
    assert time.monotonic() - start < LIMITS.timeout_s + 2.0
    assert sandbox_processes_alive() == []
    still_works(iso)


def test_fork_bomb_is_contained(iso):
    bomb = ("import os, time\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        time.sleep(0.01)\n")
    start = time.monotonic()
    r = sandbox.run_python(bomb, limits=LIMITS, isolation=iso)
    assert not r.ok and r.status in ("timeout", "error")
    assert time.monotonic() - start < LIMITS.timeout_s + 3.0
    time.sleep(0.2)
    assert sandbox_processes_alive() == []
    still_works(iso)


def test_background_children_die_with_the_program(iso):
    prog = ("import os, time\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"  # try to escape the process group too
            "        time.sleep(60)\n"
            "        os._exit(0)\n"
            "print('parent done')\n")
    r = sandbox.run_python(prog, limits=LIMITS, isolation=iso)
    assert "parent done" in r.stdout
    time.sleep(0.3)
    if "pidns" in iso.name:  # without a pid namespace a setsid() child can outlive its group
        assert sandbox_processes_alive() == []
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
    fallback = [c for c in sandbox.candidate_isolations(os.geteuid() == 0, (iso.python,)) if not c.unshare_args][0]
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
