"""The benchmark registry and row loading: one table of specs (from the family modules), rows from the
hub or a local file, seeded subsets, and the one grading entry point every runner uses.

Adding a benchmark = one BenchSpec in its family module's SPECS. Data-file problems fail at load with the
file, the line and the field named, never as a traceback halfway through an eval.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import bench_code
import bench_hle
import bench_math
import bench_mc
import bench_mm
import bench_grade
import sandbox
from bench_spec import COMMON_OPTIONS, BenchSpec, DataFileError, Source, missing_roles
from bench_grade import Graded

BENCHMARKS: dict = {spec.name: spec for family in (bench_mc, bench_math, bench_code, bench_hle, bench_mm)
                    for spec in family.SPECS}

GRADER_ERROR = "grader_error"
JUDGE_ERROR = "judge_error"


def default_source(spec: BenchSpec, options: dict) -> list:
    return [Source(None, options.get("dataset", spec.dataset), options.get("config", spec.config),
                   options.get("split", spec.split), options.get("revision", spec.dataset_revision))]


def read_located_rows(path: str | Path) -> list:
    """[(where, row)] of a local file in the dataset's own schema (.jsonl, .json list or {"rows": [...]},
    .parquet); `where` is "file:line" (jsonl) or "file row N", for error messages."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data_file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(_utf8_lines(path), start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}:{n}: not a JSON object ({err.msg} at column {err.colno})") from None
        return out
    if suffix == ".json":
        try:
            data = json.loads(_read_utf8(path))
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}:{err.lineno}: not JSON ({err.msg})") from None
        rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataFileError(f"{path}: expected a list of rows or {{\"rows\": [...]}}, got {type(data).__name__}")
        return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    raise ValueError(f"data_file {path}: unsupported suffix {suffix!r}; use .jsonl, .json or .parquet")


def _utf8_lines(path: Path) -> list:
    import eval_text

    try:
        return eval_text.utf8_lines(path)
    except eval_text.TextDecodeError as err:
        raise DataFileError(str(err)) from None


def _read_utf8(path: Path) -> str:
    import eval_text

    try:
        return eval_text.read_utf8(path)
    except eval_text.TextDecodeError as err:
        raise DataFileError(str(err)) from None


def read_rows(path: str | Path) -> list:
    """Rows of a local file (see read_located_rows)."""
    return [row for _where, row in read_located_rows(path)]


def hub_rows(source: Source, columns: set | None = None) -> list:
    """Rows from the Hugging Face hub (needs network or a warm HF cache). Only `columns` are kept, so
    image columns (HLE) are never decoded and big unused text fields never held."""
    if source.hub_files:
        # LCB: plain jsonl files, read line by line (rows are up to tens of MB; no arrow schema inference).
        from huggingface_hub import hf_hub_download

        rows = []
        for name in source.hub_files:
            path = hf_hub_download(source.dataset, name, repo_type="dataset", revision=source.revision)
            rows.extend(read_rows(path))
        return rows
    import datasets

    ds = datasets.load_dataset(source.dataset, source.config, split=source.split, revision=source.revision)
    if columns:
        ds = ds.select_columns([c for c in ds.column_names if c in columns])
    return [dict(row) for row in ds]


def select_subset(items: list, n: int | None, seed: int) -> list:
    """A seeded random subset of size n, kept in dataset order; nested (the n=50 subset contains n=20's)."""
    if n is None or n >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


def _check_options(spec: BenchSpec, options: dict) -> None:
    allowed = set(COMMON_OPTIONS) | set(spec.options)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{spec.name}: unknown option(s) {unknown}; this benchmark takes {sorted(allowed)}")


def make_samples(spec: BenchSpec, located_rows: list, source: Source, options: dict) -> list:
    """Samples of one dataset part; a bad row fails here, naming where it is and what is wrong."""
    out = []
    for index, (where, row) in enumerate(located_rows):
        if not isinstance(row, dict):
            raise DataFileError(f"{where}: {spec.name} row is a {type(row).__name__}, expected an object "
                                f"with fields {sorted({names[0] for names in spec.fields.values()})}")
        missing = missing_roles(spec, row)
        if missing:
            raise DataFileError(f"{where}: {spec.name} row lacks required field(s) {missing}")
        try:
            sample = spec.make_sample(spec, row, index, source, options)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise DataFileError(f"{where}: {spec.name}: {type(err).__name__}: {err}") from None
        if sample is not None:
            out.append(sample)
    return out


def load_samples(bench: str, n: int | None = None, data_file: str | None = None, seed: int = 0,
                 **options) -> list:
    """Samples of one benchmark: from `data_file` when given (offline), else from the hub.

    n=None uses the spec's default_n (None = all rows); for benchmarks with parts (MMMLU locales, AIME
    years) n counts per part. The subset is a deterministic function of (rows, n, seed).
    """
    if bench not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {bench!r}; known: {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[bench]
    _check_options(spec, options)
    if n is not None and n <= 0:
        raise ValueError(f"n must be a positive count or None (spec default), got {n}")
    n = spec.default_n if n is None else n
    opts = {**options, "_seed": seed}
    samples = []
    for source in (spec.sources or default_source)(spec, options):
        if data_file:
            path = str(data_file).replace("{part}", source.part or "")
            located = read_located_rows(path)
            opts["_data_dir"] = str(Path(path).resolve().parent)  # relative image paths resolve from here
        else:
            opts.pop("_data_dir", None)
            rows = hub_rows(source, {c for names in spec.fields.values() for c in names})
            located = [(f"{source.dataset}:{source.config or '-'}:{source.split} row {i}", r) for i, r in enumerate(rows)]
        part = make_samples(spec, located, source, opts)
        if spec.n_is_per_part:
            part = select_subset(part, n, seed)
        samples.extend(part)
    if not spec.n_is_per_part:
        samples = select_subset(samples, n, seed)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{bench}: sample ids are not unique (e.g. {dup}); the data has duplicate id columns")
    return samples


def source_info(bench: str, data_file: str | None = None, **options) -> dict:
    """What load_samples reads, for provenance: hub ids/configs/revisions, or local files with sha256."""
    import provenance

    spec = BENCHMARKS[bench]
    _check_options(spec, options)
    out = []
    for source in (spec.sources or default_source)(spec, options):
        if data_file:
            path = str(data_file).replace("{part}", source.part or "")
            out.append({"part": source.part, "data_file": path, "sha256": provenance.sha256_file(Path(path))})
        else:
            out.append({"part": source.part, "dataset": source.dataset, "config": source.config,
                        "split": source.split, "revision": source.revision or "latest",
                        "files": list(source.hub_files) or None})
    return {"bench": bench, "sources": out, "options": {k: v for k, v in options.items()}}


# ------------------------------------------------------------------------------------------- grading
def _guarded(grade, sample, output) -> Graded:
    """One grader call; an exception becomes a grader_error verdict (its own category, never 'wrong')."""
    try:
        if not isinstance(output, str):
            return bench_grade.no_answer(error=f"output is {type(output).__name__}, not str")
        return grade(sample, output)
    except Exception as exc:  # one bad sample must not stop a whole eval; it is counted, not hidden
        return Graded(None, False, False, {"status": GRADER_ERROR,
                                           "error": f"grader crashed: {type(exc).__name__}: {str(exc)[:300]}"})


def grade_status(graded: Graded) -> str:
    """ok | grader_error | judge_error, from a verdict's detail."""
    detail = graded.detail or {}
    if detail.get("status") == GRADER_ERROR:
        return GRADER_ERROR
    if detail.get("judge_error"):
        return JUDGE_ERROR
    return "ok"


def grade_output(sample, output: str) -> Graded:
    """Robust verdict of one output (the spec's grader). Never raises: a crash is a grader_error verdict."""
    return _guarded(lambda s, o: BENCHMARKS[s.bench].grade(s, o), sample, output)


def grade_official(sample, output: str) -> Graded | None:
    """The benchmark's official verdict, or None when the spec's grader is itself the official rule."""
    spec = BENCHMARKS.get(sample.bench)
    if spec is None or spec.official.grade is None:
        return None
    return _guarded(spec.official.grade, sample, output)


def grade_both(sample, output: str) -> tuple:
    """(robust, official or None): what the grading pool computes per sample."""
    return grade_output(sample, output), grade_official(sample, output)


def grading_environment(benches, allow_weak_sandbox: bool = False) -> dict:
    """Call once before an eval: raises if a code benchmark is asked for and no sandbox can run here
    (rather than scoring every program wrong), and returns what to record in the results (the sandbox's
    isolation tier, and whether a weak tier was allowed)."""
    out = {"math_verify": _math_verify_version()}
    if any(BENCHMARKS[b].needs_sandbox for b in benches):
        iso = sandbox.detect_isolation(allow_weak=bool(allow_weak_sandbox))
        out["sandbox"] = iso.describe()
        out["sandbox_kind"] = iso.kind
        out["sandbox_strong"] = iso.strong
        out["allow_weak_sandbox"] = bool(allow_weak_sandbox)
    return out


def _math_verify_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("math-verify")
    except metadata.PackageNotFoundError:
        return None  # graders fall back to sympy; detail["method"] says so per sample


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="bench8_loaders",
                                 description="List the benchmarks, or load one and print its first prompts "
                                             "(a quick check that a data file or hub id is readable).")
    ap.add_argument("bench", nargs="?", help=f"one of {sorted(BENCHMARKS)}; omit to list them")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--data-file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.bench:
        for spec in BENCHMARKS.values():
            print(f"{spec.name:10s} {spec.dataset}:{spec.config or '-'}:{spec.split}  n={spec.default_n or 'all'}  "
                  f"official={spec.official.name}  {spec.description}")
        return
    for s in load_samples(args.bench, n=args.n, data_file=args.data_file, seed=args.seed):
        print(json.dumps({"id": s.id, "group": s.group, "prompt": s.messages[-1]["content"][:400]}, ensure_ascii=False))


if __name__ == "__main__":
    main()
