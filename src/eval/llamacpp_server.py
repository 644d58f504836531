"""One llama-server process, owned for exactly as long as a `with` block: start on a loopback port, wait
for /health, read its metrics, and ALWAYS stop it (normal exit, exception, Ctrl-C, SIGTERM, interpreter
exit), with its whole process group, so no orphan server keeps a GPU or a port.

    cfg = ServerConfig(binary=Path(".../llama-server"), model=Path("m.gguf"))
    with LlamaServer(cfg) as server:
        server.base_url          # http://127.0.0.1:PORT
        server.metrics()         # Prometheus counters as a dict
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llamacpp_metrics import VramSampler, parse_prometheus

LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """llama-server could not be started or died; the message carries the tail of its log."""


class PortInUse(ServerError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    binary: Path
    model: Path
    mmproj: Path | None = None
    alias: str = "model"
    host: str = LOOPBACK
    port: int = 0  # 0 = a free port picked at start
    ctx_size: int = 4096  # total KV context, shared by the parallel slots
    parallel: int = 1
    threads: int | None = None
    n_gpu_layers: str | None = None  # None = llama-server's default (auto)
    n_cpu_moe: int | None = None  # keep the experts of the first N layers on the CPU
    override_tensor: tuple = ()  # PATTERN=BUFFER_TYPE, e.g. "exps=CPU"
    extra_args: tuple = ()
    startup_timeout_s: float = 600.0
    log_path: Path | None = None

    def __post_init__(self):
        if self.host not in (LOOPBACK, "localhost", "::1"):
            raise ValueError(f"host {self.host!r}: llama-server is only started on loopback (127.0.0.1); "
                             "put a proxy in front of it to expose it")
        if not 0 <= int(self.port) < 65536:
            raise ValueError(f"port must be 0 (free port) or 1..65535, got {self.port}")
        if self.parallel < 1 or self.ctx_size < 64:
            raise ValueError(f"need parallel >= 1 and ctx_size >= 64, got {self.parallel}, {self.ctx_size}")
        for item in self.override_tensor:
            if "=" not in item:
                raise ValueError(f"override_tensor {item!r} must be PATTERN=BUFFER_TYPE, e.g. exps=CPU")


def server_command(cfg: ServerConfig, port: int) -> list[str]:
    """The llama-server argv for `cfg` on `port` (pure, so tests can check it without a binary)."""
    cmd = [str(cfg.binary), "-m", str(cfg.model), "--host", cfg.host, "--port", str(port),
           "-c", str(cfg.ctx_size), "-np", str(cfg.parallel), "-a", cfg.alias, "--metrics", "--no-webui"]
    if cfg.mmproj is not None:
        cmd += ["--mmproj", str(cfg.mmproj)]
    if cfg.threads:
        cmd += ["-t", str(cfg.threads)]
    if cfg.n_gpu_layers is not None:
        cmd += ["-ngl", str(cfg.n_gpu_layers)]
    if cfg.n_cpu_moe is not None:
        cmd += ["--n-cpu-moe", str(cfg.n_cpu_moe)]
    for item in cfg.override_tensor:
        cmd += ["--override-tensor", item]
    return cmd + list(cfg.extra_args)


def port_is_free(host: str, port: int) -> bool:
    """No one listens on it. SO_REUSEADDR as llama-server itself binds: connections of a server that just
    died linger in TIME_WAIT for a minute, and they must not make a restart on the same port fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: Path | None, n_lines: int = 25) -> str:
    if path is None or not Path(path).is_file():
        return "(no log)"
    lines = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(lines[-n_lines:])


class LlamaServer:
    """Context manager around one llama-server process (its own process group)."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.command: list[str] = []
        self.startup_s: float | None = None
        self.vram: VramSampler | None = None
        self._log_file = None
        self._old_handlers: dict = {}
        self._log_path = cfg.log_path

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "LlamaServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def start(self) -> None:
        cfg = self.cfg
        if not Path(cfg.binary).is_file():
            raise ServerError(f"llama-server binary {cfg.binary} not found; build it with pipelines/install_llamacpp.sh "
                              "or pass --llama-cpp PREFIX")
        if not Path(cfg.model).is_file():
            raise ServerError(f"model {cfg.model} not found (a .gguf file; pack one with pipelines/pack_gguf.sh)")
        if cfg.mmproj is not None and not Path(cfg.mmproj).is_file():
            raise ServerError(f"mmproj {cfg.mmproj} not found")
        if cfg.port:
            if not port_is_free(cfg.host, cfg.port):
                raise PortInUse(f"port {cfg.port} on {cfg.host} is already in use (another server?); stop it, "
                                "pick another --port, or pass --port 0 for a free one")
            self.port = cfg.port
        else:
            self.port = free_port(cfg.host)
        self.command = server_command(cfg, self.port)
        if self._log_path is None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_file = open(self._log_path, "ab")
        self._install_handlers()
        t0 = time.perf_counter()
        # start_new_session: the server leads its own process group, so stop() can kill the group and a
        # Ctrl-C in the terminal reaches us (we stop it) rather than racing it.
        self.proc = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with(os.getpid()))
        if VramSampler.available():
            self.vram = VramSampler(self.proc.pid)
            self.vram.start()
        self._wait_healthy(t0)
        self.startup_s = time.perf_counter() - t0

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.cfg.startup_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                log = tail(self._log_path)
                hint = ""
                if "bind" in log.lower() or "address already in use" in log.lower():
                    hint = f" (port {self.port} was taken between picking it and binding; retry)"
                raise ServerError(f"llama-server exited with code {code} during startup{hint}; log tail:\n{log}")
            status = self.health()
            if status == "ok":
                return
            if time.perf_counter() > deadline:
                raise ServerError(f"llama-server not healthy after {self.cfg.startup_timeout_s:.0f}s "
                                  f"(last /health: {status}); log tail:\n{tail(self._log_path)}")
            time.sleep(0.25)

    def health(self) -> str:
        """'ok', 'loading', or an error string (never raises)."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                body = json.loads(r.read().decode() or "{}")
                return str(body.get("status", "ok"))
        except urllib.error.HTTPError as err:
            return "loading" if err.code == 503 else f"HTTP {err.code}"
        except (urllib.error.URLError, OSError, ValueError) as err:
            return f"unreachable ({getattr(err, 'reason', err)})"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after grace_s). Idempotent."""
        code = None
        if self.vram is not None:
            self.vram.stop()
        if self.proc is not None:
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(timeout=30)
            else:
                self._signal_group(signal.SIGKILL)  # children of a dead leader, if any
            code = self.proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._restore_handlers()
        return code

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # ------------------------------------------- stop on Ctrl-C / SIGTERM / exit
    def _install_handlers(self) -> None:
        atexit.register(self.stop)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(sig)
            self._old_handlers[sig] = previous

            def handler(signum, frame, previous=previous):
                self.stop()
                if callable(previous) and previous not in (signal.SIG_IGN, signal.SIG_DFL):
                    previous(signum, frame)
                elif signum == signal.SIGINT:
                    raise KeyboardInterrupt
                else:
                    raise SystemExit(128 + signum)

            signal.signal(sig, handler)

    def _restore_handlers(self) -> None:
        atexit.unregister(self.stop)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._old_handlers.items():
            signal.signal(sig, previous)
        self._old_handlers = {}

    # ------------------------------------------------------------- measurements
    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=30) as r:
            return parse_prometheus(r.read().decode())

    def version(self) -> str | None:
        try:
            out = subprocess.run([str(self.cfg.binary), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        lines = [line for line in (out.stdout + out.stderr).splitlines() if "version" in line.lower()]
        return lines[0].strip() if lines else None

    def probe(self, prompt: str, n_predict: int = 64) -> dict:
        """One fixed single-stream /completion request; its `timings` (prefill/decode tok/s) as given."""
        body = json.dumps({"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "cache_prompt": False,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(self.base_url + "/completion", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read().decode()).get("timings", {})

    @property
    def log_path(self) -> Path | None:
        return self._log_path


def _die_with(parent_pid: int):
    """preexec_fn: on Linux the server gets SIGKILL when the process that started it dies, also when that
    process is SIGKILLed itself (which no handler sees): a killed eval leaves no server holding a GPU or a
    port. Elsewhere a no-op (the signal handlers and atexit still stop it on every catchable exit)."""
    def arm():
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)
    return arm


def find_binary(prefix: Path | None, name: str = "llama-server") -> Path:
    """bin/NAME under a llama.cpp install prefix (or its build/bin)."""
    if prefix is None:
        raise ServerError("no llama.cpp prefix: pass --llama-cpp PREFIX or set LLAMA_CPP "
                          "(bash pipelines/install_llamacpp.sh prints it)")
    for cand in (Path(prefix) / "bin" / name, Path(prefix) / "build" / "bin" / name):
        if cand.is_file():
            return cand
    raise ServerError(f"{name} not found under {prefix}/bin or {prefix}/build/bin")


def default_prefix(root: Path) -> Path:
    """The cached llama.cpp build: $LLAMA_CPP, else what install_llamacpp.sh prints (building it if needed)."""
    if os.environ.get("LLAMA_CPP"):
        return Path(os.environ["LLAMA_CPP"])
    out = subprocess.run(["bash", str(root / "pipelines" / "install_llamacpp.sh")], capture_output=True, text=True)
    if out.returncode != 0:
        raise ServerError(f"pipelines/install_llamacpp.sh failed:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def split_passthrough(items: Sequence[str] | None) -> tuple:
    """--server-arg values: each may hold several shell-style words."""
    import shlex

    out: list[str] = []
    for item in items or ():
        out += shlex.split(item)
    return tuple(out)
