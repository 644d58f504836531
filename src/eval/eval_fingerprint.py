"""The grader fingerprint: one hash of everything that turns a stored generation into a verdict.

It is the source text of the extractors, graders, official cascades, grading pool, sandbox modules and
benchmark specs, plus the math-verify version. A resumed run reuses a stored verdict only under the same
fingerprint; any edit to that code (a grader fix, say) re-grades every stored generation on the next run.
Whitespace and comments count too: a false "changed" costs a re-grade, a false "unchanged" would cost a
wrong verdict.
"""
from __future__ import annotations

import hashlib
import importlib.util
from importlib import metadata

GRADING_MODULES = ("bench_extract", "bench_grade", "bench_cascades", "eval_grading", "sandbox", "sandbox_exec",
                   "sandbox_launcher", "sandbox_wire", "sandbox_calls", "sandbox_memory", "bench_spec",
                   "bench_registry", "bench_mc", "bench_math", "bench_code", "bench_hle", "bench_mm")


def module_source(name: str) -> bytes:
    """The bytes of a module's source file, found without importing it; b"" for a module that is absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return b""
    with open(spec.origin, "rb") as f:
        return f.read()


def grader_fingerprint(modules: tuple = GRADING_MODULES) -> str:
    digest = hashlib.sha256()
    for name in modules:
        source = module_source(name)
        digest.update(f"{name}\0{len(source)}\0".encode())
        digest.update(source)
    try:
        digest.update(("math-verify " + metadata.version("math-verify")).encode())
    except metadata.PackageNotFoundError:
        digest.update(b"math-verify absent")
    return digest.hexdigest()[:16]
