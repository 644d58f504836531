"""HumanEval/MBPP checking in two sandboxed processes: the candidate serves calls, the tests call it.

The candidate's code runs in its own sandbox and, once its module has run, serves calls: it reads a
function name and arguments from a pipe, calls the function and writes back the result as plain data
(sandbox_wire: built-in types only). The test code (HumanEval's `check`, MBPP's asserts, their imports and
the prompt's helpers) runs in a second sandbox that never loads candidate code: each entry point there is
a proxy that forwards its call through the grader (this process), which relays frames both ways with a
per-call timeout. So the candidate sees only the arguments it is called with, never the expected values,
the test source, the test process's verdict channel or its nonce; and what comes back is a fresh built-in
value, so an always-equal object or an int subclass cannot take part in a comparison.

The verdict: the test process ran to its end (its nonce reported, exit 0) and the candidate did not die
or stall in the middle of a call. Limits: each process gets the sample's SandboxLimits (timeout_s is the
whole program's wall clock) and every call has call_timeout_s.
"""
from __future__ import annotations

import ast
import builtins
import os
import selectors
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sandbox
import sandbox_wire

WIRE_SOURCE = Path(sandbox_wire.__file__).read_text(encoding="utf-8")
CALL_FAILED = "candidate_call_failed"

# Appended to the candidate's program: after its module has run, answer calls until the grader hangs up.
SERVER = '''

def __moe_serve(request_fd={req}, response_fd={resp}):
    wire = {{}}
    exec(compile({wire!r}, "sandbox_wire", "exec"), wire)
    namespace = globals()
    while True:
        try:
            frame = wire["read_frame"](request_fd)
        except OSError:
            return
        if frame is None:
            return
        try:
            name, args, kwargs = wire["decode"](frame)
            result = ("ok", namespace[name](*args, **kwargs))
        except KeyError as exc:
            result = ("raise", "NameError", "name %r is not defined" % (exc.args[0] if exc.args else "?"))
        except BaseException as exc:
            result = ("raise", type(exc).__name__, str(exc)[:2000])
        try:
            payload = wire["encode"](result)
        except wire["WireError"] as exc:
            payload = wire["encode"](("fail", "the result cannot cross: %s" % exc))
        wire["write_frame"](response_fd, payload)


__moe_serve()
'''

# Put in front of the test program: one proxy per entry point the tests call.
PROXIES = '''
def __moe_make_proxies(names, request_fd={req}, response_fd={resp}):
    import builtins
    wire = {{}}
    exec(compile({wire!r}, "sandbox_wire", "exec"), wire)

    class CandidateCallFailed(BaseException):
        """Not an Exception: a test's own `except Exception` cannot turn a failed call into a pass."""

    def proxy(name):
        def call(*args, **kwargs):
            try:
                wire["write_frame"](request_fd, wire["encode"]((name, args, kwargs)))
                frame = wire["read_frame"](response_fd)
                reply = wire["decode"](frame) if frame is not None else ("fail", "the candidate is gone")
            except (OSError, wire["WireError"]) as exc:
                raise CandidateCallFailed("%s(...): %s" % (name, exc)) from None
            if reply[0] == "ok":
                return reply[1]
            if reply[0] == "raise":
                kind = getattr(builtins, str(reply[1]), None)
                if isinstance(kind, type) and issubclass(kind, Exception):
                    raise kind(reply[2])
                raise RuntimeError("%s: %s" % (reply[1], reply[2]))
            raise CandidateCallFailed("%s(...): %s" % (name, reply[1]))
        call.__name__ = call.__qualname__ = name
        return call

    return {{name: proxy(name) for name in names}}


'''


@dataclass
class Relay:
    """What the grader saw between the two processes."""
    calls: int = 0
    failure: str | None = None  # why the candidate side broke the run (died or stalled mid-call)


def _is_stub(node) -> bool:
    """A prompt's function with nothing but a docstring (or pass / ...): what the candidate writes."""
    body = [b for b in node.body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
    return all(isinstance(b, ast.Pass) for b in body)


def _bound_names(tree, keep_stubs: bool) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not (keep_stubs and _is_stub(node)):
                out.add(node.name)
        elif isinstance(node, ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            out.add(node.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
    return out


def entry_points(test_source: str, prefix_source: str = "") -> list:
    """The candidate's names the tests use: not built in, not bound by the test code, and not bound by the
    prefix except as a stub (HumanEval's prompt declares the entry point with a docstring only). Helpers
    the prompt implements (HumanEval/32's poly) stay trusted code in the test process."""
    tests = ast.parse(test_source)
    bound = set(dir(builtins)) | _bound_names(tests, False) | _bound_names(ast.parse(prefix_source), True)
    used = []
    for node in ast.walk(tests):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound \
                and node.id not in used:
            used.append(node.id)
    return used


def _wait(fd: int, events: int, deadline: float) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, events)
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError


def _read_exact(fd: int, n: int, deadline: float) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        _wait(fd, selectors.EVENT_READ, deadline)
        try:
            chunk = os.read(fd, min(n - len(data), 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            if not data:
                return None
            raise sandbox_wire.WireError("frame cut short")
        data += chunk
    return bytes(data)


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        _wait(fd, selectors.EVENT_WRITE, deadline)
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            continue


def _pump(src: int, dst: int, deadline: float) -> bool:
    """Move one frame from src to dst before the deadline (TimeoutError past it); False at end of file.
    Frames are relayed as bytes: only the test process decodes them."""
    head = _read_exact(src, 4, deadline)
    if head is None:
        return False
    (n,) = sandbox_wire._LEN.unpack(head)
    if n > sandbox_wire.MAX_FRAME:
        raise sandbox_wire.WireError(f"frame of {n} bytes is over the {sandbox_wire.MAX_FRAME} limit")
    body = _read_exact(src, n, deadline) if n else b""
    if body is None:
        raise sandbox_wire.WireError("frame cut short")
    _write_all(dst, head + body, deadline)
    return True


def relay(test_req: int, test_resp: int, cand_req: int, cand_resp: int, call_timeout_s: float,
          test_done: threading.Event, deadline: float) -> Relay:
    """Forward each of the test's calls to the candidate and its answer back, until the test ends."""
    state = Relay()
    for fd in (test_req, test_resp, cand_req, cand_resp):
        os.set_blocking(fd, False)
    while not test_done.is_set() and time.monotonic() < deadline:
        try:
            _wait(test_req, selectors.EVENT_READ, min(deadline, time.monotonic() + 0.05))
        except TimeoutError:
            continue
        call_deadline = min(deadline, time.monotonic() + call_timeout_s)
        try:
            if not _pump(test_req, cand_req, call_deadline):
                return state  # the test process closed its side: it is ending
        except TimeoutError:
            state.failure = f"the candidate did not take a call within {call_timeout_s:g} s"
            return state
        except (OSError, sandbox_wire.WireError):
            return state  # the test process broke its own frame: its run fails on its own
        state.calls += 1
        try:
            if not _pump(cand_resp, test_resp, call_deadline):
                state.failure = "the candidate process died during a call"
                return state
        except TimeoutError:
            state.failure = f"a call took longer than {call_timeout_s:g} s"
            return state
        except (OSError, sandbox_wire.WireError) as exc:
            state.failure = f"the candidate broke the call protocol: {exc}"
            return state
    return state


def run_checked(candidate_program: str, test_prefix: str, test_body: str, names: list, limits: sandbox.SandboxLimits,
                isolation: sandbox.Isolation | None = None, run_name: str = "__moe_program__",
                call_timeout_s: float | None = None) -> tuple:
    """(test RunResult, candidate RunResult, Relay): the two processes run side by side."""
    iso = isolation or sandbox.isolation_for(limits)
    call_timeout_s = call_timeout_s or limits.timeout_s
    test_req_r, test_req_w = os.pipe()    # test -> grader
    test_resp_r, test_resp_w = os.pipe()  # grader -> test
    cand_req_r, cand_req_w = os.pipe()    # grader -> candidate
    cand_resp_r, cand_resp_w = os.pipe()  # candidate -> grader
    test_source = (PROXIES.format(req=test_req_w, resp=test_resp_r, wire=WIRE_SOURCE) + test_prefix + "\n\n"
                   + f"globals().update(__moe_make_proxies({list(names)!r}))\ndel __moe_make_proxies\n\n" + test_body)
    cand_source = candidate_program + SERVER.format(req=cand_req_r, resp=cand_resp_w, wire=WIRE_SOURCE)
    results, test_done = {}, threading.Event()
    cancel_r, cancel_w = os.pipe()  # closing cancel_w stops whichever sandbox is still running

    def run(key, source, fds, name, site, done=None):
        try:
            results[key] = sandbox.run_python(source, limits=limits, isolation=iso, run_name=name,
                                              hand_fds=fds, cancel_fd=cancel_r, site=site)
        finally:
            if done is not None:
                done.set()

    threads = [threading.Thread(target=run, args=("cand", cand_source, (cand_req_r, cand_resp_w), run_name, True),
                                daemon=True),
               threading.Thread(target=run, args=("test", test_source, (test_req_w, test_resp_r), "__main__", False,
                                                  test_done), daemon=True)]
    parent_fds = [test_req_r, test_resp_w, cand_req_w, cand_resp_r, cancel_r]
    try:
        for t in threads:
            t.start()
        state = relay(test_req_r, test_resp_w, cand_req_w, cand_resp_r, call_timeout_s, test_done,
                      time.monotonic() + limits.timeout_s + 5.0)
        if state.failure:
            os.close(cancel_w)  # the test waits on an answer that will not come
            cancel_w = None
        threads[1].join()
    finally:
        if cancel_w is not None:
            os.close(cancel_w)  # the tests are done: the candidate is stopped, not waited for
        for t in threads:
            t.join()
        for fd in parent_fds:
            os.close(fd)
    return results.get("test"), results.get("cand"), state
