"""The student's grid (per-group scales, zero-points) of every LoRA target: the ONE reader all consumers share.

Today the scales are recovered, as before, by re-running the build's recipe on the SOURCE weight
(`lora_quant.build_scales`) and checking that this reproduces the student's tensor bit for bit. What is
new is who does it: the targets are split over the ranks (rank r recovers targets r, r + world, ...),
each part is written once to `<cache>/grid-<key>/part-<r>-of-<world>.safetensors`, and every rank then
reads all parts. So the recipe's clip search runs once per target in total, never once per rank, and a
resumed run (same student, source, targets) reads the parts instead of searching again.

When the packed codes+scales store lands (quant/ptq_meta.py), `student_grid` reads the stored scales
instead and the search disappears; every caller (trainer, merge, tests) keeps calling this one function.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import atomic_io
import lora_quant
import opd_ckpt
import opd_data
import provenance


def grid_key(student: Path, source: Path, targets) -> str:
    return provenance.sha256_json({"student_meta": provenance.sha256_file(Path(student) / opd_data.PTQ_META),
                                   "source": str(Path(source).resolve()),
                                   "targets": [[t.name, list(t.shape), t.axis] for t in targets]})[:16]


def recover_one(target, src: opd_ckpt.RowReader, stu: opd_ckpt.RowReader) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales, zeros) of one target from its source weight, checked against the student's tensor."""
    n = target.shape[0]
    w = src.rows(target.name, target.shape, 0, n, torch.float32)
    s, z, dq = lora_quant.build_scales(w, target)
    student_w = stu.rows(target.name, target.shape, 0, n, torch.bfloat16)
    lora_quant.check_base_is_student(target, dq, student_w)
    grid = lora_quant.FixedGrid(s, z, target.axis, target.spec, target.shape)  # the training grid at B = 0, too
    lora_quant.check_base_is_student(target, grid.quantize_(w), student_w)
    return s, z


def _recover_part(student: Path, source: Path, targets: list, out: Path) -> int:
    """Recover and write one rank's share (runs in a spawned child, see student_grid)."""
    from safetensors.torch import save

    tensors = {}
    with contextlib.ExitStack() as stack:
        names = [t.name for t in targets]
        src = opd_ckpt.RowReader(source, names, stack)
        stu = opd_ckpt.RowReader(student, names, stack)
        for t in targets:
            s, z = recover_one(t, src, stu)
            tensors[f"{t.name}::scales"] = s.contiguous()
            if z is not None:
                tensors[f"{t.name}::zeros"] = z.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_io.write_bytes(out, save(tensors))
    return len(targets)


def target_to_json(t) -> dict:
    spec = {f.name: getattr(t.spec, f.name) for f in dataclasses.fields(t.spec)}  # scale_dtype is a name
    return {"name": t.name, "role": t.role, "shape": list(t.shape), "axis": t.axis, "spec": spec}


def target_from_json(d: dict):
    import moe_quant

    spec = dict(d["spec"], scale_dtype=str(d["spec"]["scale_dtype"]).removeprefix("torch."))
    return lora_quant.Target(d["name"], d["role"], tuple(d["shape"]), d["axis"], moe_quant.QuantSpec(**spec))


def _child_main() -> int:
    """`python opd_grid.py` with a JSON job on stdin: recover one rank's share (see student_grid)."""
    job = json.loads(sys.stdin.read())
    try:
        _recover_part(Path(job["student"]), Path(job["source"]), [target_from_json(t) for t in job["targets"]],
                      Path(job["out"]))
    except (opd_data.OpdInputError, lora_quant.LoraTargetError) as e:
        print(f"opd_grid: error: {e}", file=sys.stderr)
        return 2
    return 0


def _part(cache: Path, rank: int, world: int) -> Path:
    return cache / f"part-{rank}-of-{world}.safetensors"


def student_grid(student: Path, source: Path, targets, cache_dir: Path, rank: int = 0, world: int = 1,
                 barrier=lambda: None, log=lambda m: None) -> tuple[dict, dict]:
    """({target name: scales}, {target name: zeros or None}) for every target, identical on every rank."""
    from safetensors.torch import load_file

    cache = Path(cache_dir) / f"grid-{grid_key(student, source, targets)}"
    mine = _part(cache, rank, world)
    if not mine.is_file():
        # In a child process: the numba clip-search kernels change this process's floating-point state
        # (measured: the same training step then gives a loss 1e-3 apart), so a run that recovers the
        # grid and a resumed run that reads it would not reproduce each other's loss curve.
        job = {"student": str(student), "source": str(source), "out": str(mine),
               "targets": [target_to_json(t) for t in targets[rank::world]]}
        p = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=json.dumps(job), text=True,
                           capture_output=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        if p.returncode != 0:
            lines = p.stderr.strip().splitlines()
            raise opd_data.OpdInputError(lines[-1] if lines else f"grid recovery exited with {p.returncode}")
        log(f"opd: grid of {len(job['targets'])} targets recovered by rank {rank}, checked against the student")
    barrier()
    found = {}
    for r in range(world):
        found.update(load_file(str(_part(cache, r, world))))
    missing = [t.name for t in targets if f"{t.name}::scales" not in found]
    if missing:
        raise opd_data.OpdInputError(f"grid cache {cache} lacks {len(missing)} targets (first {missing[0]}); delete it")
    return ({t.name: found[f"{t.name}::scales"] for t in targets},
            {t.name: found.get(f"{t.name}::zeros") for t in targets})


if __name__ == "__main__":
    sys.exit(_child_main())
