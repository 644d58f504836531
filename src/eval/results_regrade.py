"""Re-grade a finished run from its stored generations, with no engine, and print what changed.

A results dir is trusted input: a resumed run reuses every stored verdict written under the current
grader fingerprint, so a hand-edited row would survive it. This is the audit: every stored generation of
<tag>.jsonl is graded again by today's graders (the same code a fresh run uses), <tag>.json and .jsonl are
rewritten, and each verdict that differs from the stored one is listed.

    bash pipelines/eval.sh --regrade TAG [--results-dir results/vllm_eval]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import eval_run
from eval_config import EvalConfig
from eval_grading import default_grade_fn


def config_of_run(results_dir: Path, tag: str) -> EvalConfig:
    """The EvalConfig a finished run recorded in its <tag>.json (provenance.eval_config)."""
    path = Path(results_dir) / f"{tag}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--regrade {tag}: {path} does not exist (a finished run writes it)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"--regrade {tag}: cannot read {path}: {err}") from None
    recorded = (doc.get("provenance") or {}).get("eval_config") if isinstance(doc, dict) else None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: no provenance.eval_config, so how the run was configured is unknown")
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    values = {k: v for k, v in recorded.items() if k in names}
    values.update(results_dir=str(results_dir), tag=tag, progress=False,
                  benchmarks=tuple(values.get("benchmarks") or ()))
    return EvalConfig(**values)


def stored_records(path: Path) -> dict:
    out = {}
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()[1:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            out[rec["id"]] = rec
    return out


def verdict_changes(before: dict, after: dict) -> list:
    """[(id, bench, field, old, new)] for every stored verdict the re-grade contradicts."""
    changes = []
    for sid, new in after.items():
        old = before.get(sid)
        if old is None:
            continue
        for key in ("correct", "official_correct"):
            if bool(old.get(key)) != bool(new.get(key)):
                changes.append((sid, new.get("bench"), key, bool(old.get(key)), bool(new.get(key))))
    return changes


def regrade_run(results_dir: Path, tag: str, grade_fn: Callable = default_grade_fn,
                argv: Sequence[str] | None = None) -> tuple:
    """(new results doc, old results doc, changes). Rewrites <tag>.json and <tag>.jsonl."""
    cfg = config_of_run(results_dir, tag)
    json_path, jsonl_path = cfg.results_paths()
    old_doc = json.loads(json_path.read_text(encoding="utf-8"))
    before = stored_records(jsonl_path)
    doc = eval_run.run_eval(cfg, argv=argv, grade_fn=grade_fn, regrade_all=True)
    return doc, old_doc, verdict_changes(before, stored_records(jsonl_path))


def format_changes(tag: str, doc: dict, old_doc: dict, changes: list) -> str:
    lines = [f"regrade {tag}: {doc['resumed']['regraded']} stored generation(s) graded again, "
             f"{len(changes)} verdict(s) changed"]
    for bench, block in doc["benchmarks"].items():
        old = (old_doc.get("benchmarks") or {}).get(bench) or {}
        lines.append(f"  {bench:<10} acc {old.get('acc', float('nan')):6.1f} -> {block['acc']:6.1f}   "
                     f"acc_official {old.get('acc_official') or float('nan'):6.1f} -> {block.get('acc_official') or float('nan'):6.1f}")
    for sid, _bench, key, old, new in changes:
        lines.append(f"  {sid}: {key} {old} -> {new}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vllm_eval8 --regrade", description=__doc__.split("\n\n")[0])
    ap.add_argument("--regrade", required=True, metavar="TAG", help="the finished run to re-grade")
    ap.add_argument("--results-dir", default=EvalConfig.results_dir, help="where <TAG>.json/.jsonl are")
    args, _ignored = ap.parse_known_args(argv)  # the recipe's generation flags do not matter here
    try:
        doc, old_doc, changes = regrade_run(Path(args.results_dir), args.regrade,
                                            argv=[sys.argv[0], *(argv or [])])
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"vllm_eval8: {err}", file=sys.stderr)
        return 2
    print(format_changes(args.regrade, doc, old_doc, changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
