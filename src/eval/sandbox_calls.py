"""HumanEval/MBPP checking in two sandboxed processes: the candidate serves calls, the tests call it.

The candidate's code runs in its own sandbox and, once its module has run, serves calls: it reads a
function name and arguments from a pipe, calls the function and writes back the result as plain data
(sandbox_wire: built-in types only). The test code (HumanEval's `check`, MBPP's asserts, their imports and
the prompt's helpers) runs in a second sandbox that never loads candidate code: each entry point there is
a proxy that sends its call down one pipe and reads the answer from another, with a per-call timeout. So
the candidate sees only the arguments it is called with, never the expected values, the test source, the
test process's verdict channel or its nonce; and what comes back is a fresh built-in value, so an
always-equal object or an int subclass cannot take part in a comparison.

The verdict (bench_grade.grade_code_program): the test process ran to its end (its nonce reported, exit 0),
and the candidate process was not cut by its own limits. A candidate that dies or stalls during a call
makes that call raise in the test process (end of file, or no answer within call_timeout_s), so the tests
fail. Limits: each process gets the sample's SandboxLimits (timeout_s is each program's wall clock).
"""
from __future__ import annotations

import ast
import builtins
import os
import threading

import sandbox

WIRE = "sandbox_wire"  # loaded by the launcher in both processes, precompiled (sandbox.HARNESS_MODULES)
CALL_FAILED = "candidate_call_failed"

# Appended to the candidate's program: after its module has run, answer calls until the tests hang up.
SERVER = '''

def __moe_serve(request_fd={req}, response_fd={resp}):
    import sandbox_wire as wire
    namespace = globals()
    while True:
        try:
            frame = wire.read_frame(request_fd)
        except OSError:
            return
        if frame is None:
            return
        try:
            name, args, kwargs = wire.decode(frame)
            if name not in namespace:
                raise NameError("name %r is not defined" % name)
            result = ("ok", namespace[name](*args, **kwargs))
        except BaseException as exc:
            result = ("raise", type(exc).__name__, str(exc)[:2000])
        try:
            payload = wire.encode(result)
        except wire.WireError as exc:
            payload = wire.encode(("fail", "the result cannot cross: %s" % exc))
        wire.write_frame(response_fd, payload)


__moe_serve()
'''

# Put in front of the test program: one proxy per entry point the tests call.
PROXIES = '''
def __moe_make_proxies(names, request_fd={req}, response_fd={resp}, call_timeout_s={call_timeout_s!r}):
    import builtins, posix, select, time
    import sandbox_wire as wire

    class CandidateCallFailed(BaseException):
        """Not an Exception: a test's own `except Exception` cannot turn a failed call into a pass."""

    def read_by(name, n, deadline):
        data = bytearray()
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([response_fd], [], [], left)[0]:
                raise CandidateCallFailed("%s(...): no answer within %g s" % (name, call_timeout_s))
            chunk = posix.read(response_fd, min(n - len(data), 1 << 20))
            if not chunk:
                raise CandidateCallFailed("%s(...): the candidate process died during the call" % name)
            data += chunk
        return bytes(data)

    def proxy(name):
        def call(*args, **kwargs):
            deadline = time.monotonic() + call_timeout_s
            try:
                wire.write_frame(request_fd, wire.encode((name, args, kwargs)))
                size = int.from_bytes(read_by(name, 4, deadline), "big")
                if size > wire.MAX_FRAME:
                    raise wire.WireError("an answer of %d bytes" % size)
                reply = wire.decode(read_by(name, size, deadline))
            except (OSError, wire.WireError) as exc:
                raise CandidateCallFailed("%s(...): %s" % (name, exc)) from None
            if type(reply) is not tuple or not reply:
                raise CandidateCallFailed("%s(...): not an answer" % name)
            if reply[0] == "ok" and len(reply) == 2:
                return reply[1]
            if reply[0] == "raise" and len(reply) == 3:
                kind = getattr(builtins, str(reply[1]), None)
                if isinstance(kind, type) and issubclass(kind, Exception):
                    raise kind(reply[2])
                raise RuntimeError("%s: %s" % (reply[1], reply[2]))
            raise CandidateCallFailed("%s(...): %s" % (name, reply[-1]))
        call.__name__ = call.__qualname__ = name
        return call

    return {{name: proxy(name) for name in names}}


'''


def _is_stub(node) -> bool:
    """A prompt's function with nothing but a docstring, pass / ... and imports (HumanEval/115 imports math
    above its docstring): what the candidate writes."""
    body = [b for b in node.body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
    return all(isinstance(b, (ast.Pass, ast.Import, ast.ImportFrom)) for b in body)


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


def _loaded_names(trees) -> set:
    return {node.id for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Name)}


def prefix_for_tests(prefix_source: str, names, test_source: str) -> str:
    """The prefix as the test process runs it: without the stubs of `names` (their proxies replace them)
    and without the imports nothing left uses (a HumanEval prompt's `from typing import List`, there for
    the stubs' annotations, is most of the test process's start-up). Dropped lines become blank lines, so
    tracebacks keep their line numbers; a prefix with two statements on one line is kept as it is."""
    try:
        tree = ast.parse(prefix_source)
    except SyntaxError:
        return prefix_source  # the test process reports it, as before
    body = tree.body
    spans = [(min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]), n.end_lineno) for n in body]
    if any(prev[1] >= nxt[0] for prev, nxt in zip(spans, spans[1:])):
        return prefix_source
    stubs = {i for i, n in enumerate(body)
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in names and _is_stub(n)}
    imports = {i for i, n in enumerate(body) if isinstance(n, (ast.Import, ast.ImportFrom))}
    used = _loaded_names([n for i, n in enumerate(body) if i not in stubs | imports] + [ast.parse(test_source)])

    def unused(node) -> bool:
        if isinstance(node, ast.ImportFrom) and (node.module == "__future__" or any(a.name == "*" for a in node.names)):
            return False
        return not any((a.asname or a.name).split(".")[0] in used for a in node.names)

    drop = stubs | {i for i in imports if unused(body[i])}
    lines = prefix_source.splitlines(keepends=True)
    for i in drop:
        start, end = spans[i]
        lines[start - 1:end] = ["\n"] * (end - start + 1)
    return "".join(lines)


def run_checked(candidate_program: str, test_prefix: str, test_body: str, names: list, limits: sandbox.SandboxLimits,
                isolation: sandbox.Isolation | None = None, run_name: str = "__moe_program__",
                call_timeout_s: float | None = None) -> tuple:
    """(test RunResult, candidate RunResult): the two processes run side by side, joined by two pipes
    (test -> candidate calls, candidate -> test answers); the candidate is stopped when the tests end."""
    iso = isolation or sandbox.isolation_for(limits)
    call_timeout_s = float(call_timeout_s or limits.timeout_s)
    calls_r, calls_w = os.pipe()      # test -> candidate
    answers_r, answers_w = os.pipe()  # candidate -> test
    cancel_r, cancel_w = os.pipe()    # closing cancel_w stops the candidate once the tests are done
    test_source = (PROXIES.format(req=calls_w, resp=answers_r, call_timeout_s=call_timeout_s)
                   + prefix_for_tests(test_prefix, names, test_body) + "\n\n"
                   + f"globals().update(__moe_make_proxies({list(names)!r}))\n"
                   + "del __moe_make_proxies\n\n" + test_body)
    cand_source = candidate_program + SERVER.format(req=calls_r, resp=answers_w)
    results = {}

    def serve():
        results["cand"] = sandbox.run_python(cand_source, limits=limits, isolation=iso, run_name=run_name,
                                             hand_fds=(calls_r, answers_w), cancel_fd=cancel_r, site=False,
                                             preload=(WIRE,))

    candidate = threading.Thread(target=serve, daemon=True)
    try:
        candidate.start()
        test = sandbox.run_python(test_source, limits=limits, isolation=iso, hand_fds=(calls_w, answers_r),
                                  site=False, preload=(WIRE,))
    finally:
        os.close(cancel_w)
        candidate.join()
        os.close(cancel_r)
    return test, results.get("cand")
