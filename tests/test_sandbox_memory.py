"""The memory bound's host side: which mechanisms this host offers (cgroup v2 first, in the issue's order),
the cgroup path of a run (held until the host has moved it in), and the launcher compiled once per grader."""
import dataclasses
import shutil
import subprocess

import pytest

import sandbox
import sandbox_memory as sm

V1_MOUNTINFO = ("25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n"
                "26 25 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
                "27 26 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
                "28 26 0:25 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
V2_MOUNTINFO = "25 30 0:22 / /sys rw - sysfs sysfs rw\n26 25 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"


def test_cgroup_fs_type_reads_the_mount_at_sys_fs_cgroup():
    assert sm.cgroup_fs_type(V1_MOUNTINFO) == "tmpfs"  # v1: a tmpfs of per-controller mounts (unified is elsewhere)
    assert sm.cgroup_fs_type(V2_MOUNTINFO) == "cgroup2"
    assert sm.cgroup_fs_type("") == ""


def test_this_hosts_cgroup_type_agrees_with_stat():
    """probe_cgroup's reading of /proc/self/mountinfo against `stat -f` on the mount itself."""
    if shutil.which("stat") is None:
        pytest.skip("no stat(1)")
    kind = subprocess.run(["stat", "-fc", "%T", sm.CGROUP_ROOT], capture_output=True, text=True).stdout.strip()
    facts = sm.probe_cgroup({})
    assert {"cgroup2fs": "cgroup2"}.get(kind, kind) == facts.fs_type, (kind, facts)
    parent, why = sm.cgroup_decision(facts)
    if facts.fs_type != "cgroup2":  # e.g. this repo's CI box: cgroup v1, so the v2 path cannot run here
        assert parent is None and "cgroup v1" in why
        assert any(m.startswith("cgroup2 memory: not used (") for m in sm.mechanisms(True, True, 64, 32))


def _dir(path, controllers=("memory", "pids"), subtree=(), writable=True, procs=False):
    return sm.CgroupDir(path, tuple(controllers), tuple(subtree), writable, procs)


@pytest.mark.parametrize("facts, expected", [
    # a cgroup v1 host: never, whatever the dirs say
    (sm.CgroupFacts("tmpfs", (_dir("/sys/fs/cgroup/x", subtree=("memory",)),)), None),
    # delegated: memory already enabled for the children
    (sm.CgroupFacts("cgroup2", (_dir("/cg/own", subtree=("memory",), procs=True),)), "/cg/own"),
    # the configured dir comes first
    (sm.CgroupFacts("cgroup2", (_dir("/cg/conf", subtree=("memory",)), _dir("/cg/own", subtree=("memory",)))), "/cg/conf"),
    # not writable: the next one
    (sm.CgroupFacts("cgroup2", (_dir("/cg/conf", subtree=("memory",), writable=False),
                                _dir("/cg/own", subtree=("memory",)))), "/cg/own"),
    # available and empty: it can be enabled
    (sm.CgroupFacts("cgroup2", (_dir("/cg/empty"),)), "/cg/empty"),
    # available but processes sit in it: v2's no-internal-process rule forbids enabling it
    (sm.CgroupFacts("cgroup2", (_dir("/cg/own", procs=True),)), None),
    # no memory controller reaches it
    (sm.CgroupFacts("cgroup2", (_dir("/cg/own", controllers=("pids",)),)), None),
    (sm.CgroupFacts("cgroup2", ()), None),
])
def test_cgroup_decision(facts, expected):
    parent, why = sm.cgroup_decision(facts)
    assert parent == expected, why
    assert why


def test_mechanisms_say_which_bound_is_active():
    used = sm.mechanisms(True, True, 64, 32, "/cg/own")
    assert any(m.startswith("cgroup2 memory.max=memory_mb per run") and "/cg/own" in m for m in used)
    assert any(m.startswith("seccomp(") for m in used) and "tmpfs_workdir<=64MiB" in used
    weak = sm.mechanisms(False, False, 64, 32, None)
    assert not any("cgroup2 memory.max" in m or m.startswith("seccomp(") for m in weak)


def test_candidates_try_the_cgroup_first_then_without():
    isos = sandbox.candidate_isolations(True, ("/usr/bin/python3",), bwrap="/usr/bin/bwrap", cgroup_parent="/cg/own")
    strong = [i for i in isos if i.strong]
    assert [i.cgroup_parent for i in strong] == ["/cg/own", ""]
    assert "cgroup2(" in strong[0].describe() and "cgroup2(" not in strong[1].describe()
    assert all(i.cgroup_parent == "" for i in sandbox.candidate_isolations(True, ("/usr/bin/python3",),
                                                                            bwrap="/usr/bin/bwrap", cgroup_parent=""))


@pytest.fixture(scope="module")
def iso():
    return sandbox.detect_isolation()


def test_a_run_enters_its_cgroup_before_the_program_starts(iso, tmp_path, monkeypatch):
    """The host path of a cgroup run, with a plain dir standing in for cgroupfs (this host may have no
    cgroup v2): the run's files are written, every process of the sandbox is moved, then it is released."""
    moved = []
    real_enter = sm.enter_cgroup
    monkeypatch.setattr(sm, "enter_cgroup", lambda run, pids: (moved.append((run, list(pids))), real_enter(run, pids)))
    limits = sandbox.SandboxLimits(timeout_s=10, memory_mb=512)
    result = sandbox.run_python("print('ran')", limits=limits, isolation=dataclasses.replace(iso, cgroup_parent=str(tmp_path)))
    assert result.ok and result.completed and result.stdout == "ran\n", result
    assert "cgroup2(memory.max per run" in result.isolation
    (run, pids), = moved
    assert run.parent == tmp_path and (run / "memory.max").read_text() == str(512 << 20)
    assert len(pids) >= 2 and (run / "cgroup.procs").read_text() == str(pids[-1])


def test_a_run_that_cannot_enter_its_cgroup_never_starts_the_program(iso, tmp_path, monkeypatch):
    def refuse(run, pids):
        raise PermissionError("cgroup.procs: permission denied")

    monkeypatch.setattr(sm, "enter_cgroup", refuse)
    marker = "program-ran-" + tmp_path.name
    result = sandbox.run_python(f"print({marker!r})", limits=sandbox.SandboxLimits(timeout_s=10, memory_mb=512),
                                isolation=dataclasses.replace(iso, cgroup_parent=str(tmp_path)))
    assert result.status == "sandbox_error" and not result.completed and marker not in result.stdout
    assert "could not place the run in its cgroup" in result.stderr


def test_launcher_is_compiled_by_the_sandbox_interpreter(iso):
    magic = subprocess.run([iso.python, "-I", "-S", "-c", "import sys, importlib.util as u; "
                            "sys.stdout.buffer.write(u.MAGIC_NUMBER)"], capture_output=True).stdout
    pyc = sandbox.harness_pyc(iso.python, ("sandbox_wire",))
    assert pyc["launcher"][:4] == magic and pyc["sandbox_wire"][:4] == magic


def test_launcher_start_up_stays_light(iso):
    """What a -S program finds loaded: the launcher adds resource and, when asked, the wire format, but not
    os (stat, posixpath, _collections_abc) nor anything json/runpy pull in."""
    program = "import sys\nprint(' '.join(sorted(sys.modules)))\n"
    plain = sandbox.run_python(program, isolation=iso, site=False)
    wired = sandbox.run_python(program, isolation=iso, site=False, preload=("sandbox_wire",))
    assert plain.completed and wired.completed, (plain, wired)
    loaded, with_wire = set(plain.stdout.split()), set(wired.stdout.split())
    assert "resource" in loaded and not loaded & {"os", "posixpath", "json", "runpy", "importlib.util"}
    assert "sandbox_wire" not in loaded and "sandbox_wire" in with_wire
