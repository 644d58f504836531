"""The layering of docs/ARCHITECTURE.md, checked on the source: base <- quant <- eval <- distill.

Imports are read with the AST at every depth (a function-level `import x` counts like a top-level one),
so a cycle cannot hide behind a lazy import."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# The base layer lives in src/quant (the design card has three src dirs) and imports only itself.
BASE = {"atomic_io", "cache_paths", "embedded_model", "model_ref", "moefy", "provenance", "ptq_meta",
        "step_runner", "tool_config", "verified_cache"}
LAYER_OF_DIR = {"quant": 1, "eval": 2, "distill": 3}
MAX_LINES = 400


def modules() -> dict:
    """bare module name -> (layer, path)"""
    out = {}
    for path in sorted(SRC.glob("*/*.py")):
        layer = 0 if path.stem in BASE else LAYER_OF_DIR[path.parent.name]
        assert path.stem not in out, f"two modules named {path.stem}: {out[path.stem][1]} and {path}"
        out[path.stem] = (layer, path)
    return out


def imports_of(path: Path, known: dict) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module.split(".")[0]]
        else:
            continue
        found.update(n for n in names if n in known and n != path.stem)
    return found


def graph() -> dict:
    known = modules()
    return {m: imports_of(p, known) for m, (_, p) in known.items()}


def test_base_layer_modules_exist():
    known = modules()
    missing = {"atomic_io", "cache_paths", "model_ref", "provenance", "step_runner", "verified_cache"} - set(known)
    assert not missing
    assert all(known[m][1].parent.name == "quant" for m in BASE if m in known)


def test_no_import_points_up_a_layer():
    known, g = modules(), graph()
    names = {0: "base", 1: "quant", 2: "eval", 3: "distill"}
    bad = sorted(f"{m} ({names[known[m][0]]}) imports {d} ({names[known[d][0]]})"
                 for m, deps in g.items() for d in deps if known[d][0] > known[m][0])
    assert not bad, "\n".join(bad)


def test_no_module_cycles():
    g = graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_reader_sees_function_level_imports(tmp_path):
    """The check above could pass vacuously if lazy imports were missed: they are not."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import eval_run\n    from provenance import record\n")
    assert imports_of(f, {"eval_run": 0, "provenance": 0}) == {"eval_run", "provenance"}


def test_no_src_file_over_the_size_rule():
    long = sorted(f"{p.relative_to(ROOT)}: {n} lines" for p in SRC.glob("*/*.py")
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES)
    assert not long, "split along its seams:\n" + "\n".join(long)


def _code_lines(pattern: str) -> list:
    rx = re.compile(pattern)
    return sorted(f"{p.relative_to(ROOT)}:{i}" for p in SRC.glob("*/*.py")
                  for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                  if rx.search(line) and not line.lstrip().startswith("#"))


def test_one_cache_root_rule():
    hits = _code_lines(r"environ(\.get\(|\[)\s*[\"'](MOE_LOWBIT_CACHE|MOE_LOWBIT_SCRATCH|MOE_LOWBIT_MODELS|XDG_CACHE_HOME)")
    assert all(h.startswith("src/quant/cache_paths.py") for h in hits), hits


def test_one_model_resolver():
    hits = _code_lines(r"snapshot_download\(")
    assert all(h.startswith("src/quant/model_ref.py") for h in hits), hits
