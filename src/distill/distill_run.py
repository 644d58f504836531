"""The OPD pipeline end to end: gen -> score -> train -> merge -> eval, OPD next to an off-policy baseline.

Each step is its module's own CLI in a subprocess (an engine's memory goes back when its step ends; a
failing step is named with its own message):

  student-build  quant_save.py (only when OPD_STUDENT is empty: the teacher with the recipe in the env)
  gen-student    opd_gen.py --model STUDENT          (on-policy rollouts)
  gen-teacher    opd_gen.py --model TEACHER          (off-policy baseline: the teacher's own samples)
  score-*        opd_score.py --teacher TEACHER      (top-k + rest at every completion token)
  train-opd      torchrun opd_train_fsdp.py --loss reverse_kl  on the student's rollouts
  train-offpol   torchrun opd_train_fsdp.py --loss forward_kl  on the teacher's rollouts, SAME token budget
  merge-*        merge_adapter.py                    (same names, shapes, footprint as the student)
  eval-*         python -m vllm_eval8                (student before / OPD / off-policy on the same samples)
  fidelity       moe_eval.py on held-out text (never a training prompt): KL(teacher || each) with intervals

It writes results/opd/<tag>.json (every number of the table, read back from the steps' own JSON files,
plus provenance) and prints the table, then `DISTILL OK` only if every number in it exists.

    python -m distill_run [--smoke] [--help]      (pipelines/distill.sh sources configs/opd.env and calls this)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import atomic_io
import cache_paths
import distill_steps
import provenance
import ptq_meta
import quant_config
import step_runner
import tool_config
from distill_steps import eval_cmd, gen_cmd, score_cmd, train_cmd
from tool_config import option

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "moe-lowbit/opd-run/1"
HOST_ENV = ("OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")


def host_env_defaults(device: str) -> dict:
    """Environment defaults for the steps' processes (a set value always wins). On CPU: one OpenMP thread
    per process (on a shared 2-core box two threads per process ran a forward 3.6x SLOWER than one, spinning
    barriers on an oversubscribed CPU; torchrun already gives each of its 2 ranks one), and vLLM in one
    process instead of three (engine core + worker each re-import torch/vLLM: ~75 s of every vLLM start)."""
    out = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    if device == "cpu":
        out.update(OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return out


class DistillError(RuntimeError):
    def __init__(self, message: str, step: str, code: int = 1):
        super().__init__(message)
        self.step, self.code = step, code


@dataclass(frozen=True)
class DistillConfig:
    """Every knob (tool_config: flag --F, env OPD_F, recipe key F). Defaults equal configs/opd.env (a test
    keeps them equal): the offline smoke on the embedded fixture; docs/OPD.md explains each choice."""

    teacher: str = option("embedded:smollm2-moe", "BF16 teacher = the student's source (dir, hub id, embedded:NAME)")
    student: str = option("", "a quant_save output; empty: built from the teacher with the recipe below", path=True)
    tag: str = option("opd_smoke", "run name: results/opd/<tag>.json")
    work: str = option("", "work dir (default $MOE_LOWBIT_SCRATCH/opd/<tag>)", path=True)
    results_dir: str = option("results", "results root", path=True)
    prompts: str = option("configs/data/opd/smoke_prompts.jsonl", "training prompts JSONL (never eval text)", path=True)
    n: int = option(2, "rollouts per prompt")
    temperature: float = option(1.0, "rollout temperature (sample the student's own distribution)")
    max_new_tokens: int = option(64, "rollout budget")
    finished_only: bool = option(False, "train only on rollouts that ended by themselves")
    k: int = option(20, "teacher top-k per token (+ one rest bucket)")
    loss: str = option("reverse_kl", "on-policy objective")
    offpolicy_loss: str = option("forward_kl", "off-policy baseline objective (teacher samples)")
    lora_roles: str = option("routed_expert", "tensor roles that get LoRA adapters")
    rank: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha")
    lr: float = option(1e-2, "learning rate")
    batch_seqs: int = option(4, "sequences per optimizer step")
    micro_seqs: int = option(2, "sequences per forward per rank")
    token_budget: int = option(6000, "training tokens per arm (the same for OPD and off-policy)")
    nproc: int = option(2, "torchrun processes")
    device: str = option("cpu", "cpu | cuda")
    seed: int = option(0, "seed of sampling and training")
    expert_bits: float = option(3.0, "student recipe (no OPD_STUDENT): routed expert bits")
    linear_bits: float = option(4.0, "student recipe: other linears' bits")
    group: int = option(128, "student recipe: group size")
    clip_steps: int = option(8, "student recipe: clip search steps")
    clip_lo: float = option(0.65, "student recipe: lowest clip ratio")
    method: str = option("clip", "student recipe: rounding method (clip, rtn, gptq, wclip, awq; gptq/wclip/awq calibrate)")
    grid: str = option("sym", "student recipe: code grid (sym, full, asym, gguf:TYPE, gguf:K: llama.cpp's K types by bits)")
    role_bits: str = option("", "student recipe: ROLE=BITS overrides, e.g. embed=8,lm_head=8")
    calib: str = option("pydoc-topics", "student recipe: named calibration text of a calibrated method (offline)")
    calib_tokens: int = option(8192, "student recipe: calibration tokens")
    calib_ctx: int = option(512, "student recipe: calibration window length")
    benchmarks: str = option("mmlu_pro,math500", "evaluation benchmarks (same samples for every arm)")
    data_files: str = option("mmlu_pro=configs/data/smoke/mmlu_pro_easy.jsonl,math500=configs/data/smoke/math500_easy.jsonl",
                             "BENCH=PATH,... offline evaluation files")
    eval_n: str = option("12", "samples per benchmark")
    eval_max_new_tokens: int = option(48, "evaluation generation budget")
    fidelity_text: str = option("configs/data/smoke/fidelity.txt", "held-out text for KL", path=True)
    fidelity_ctx: int = option(64, "fidelity window length")
    fidelity_tokens: int = option(4096, "fidelity tokens")
    step_timeout_s: int = option(1800, "seconds one step may run")
    tensor_parallel_size: int = option(1, "vLLM steps (gen, score, eval): GPUs one engine spans")
    engine_arg: str = option("", "vLLM engine arguments for gen/score, 'KEY=VALUE KEY=VALUE'")
    enforce_eager: str = option("auto", "auto: CUDA graphs on a GPU, eager on CPU | on | off")
    score_backend: str = option("auto", "auto: vllm on a GPU (TP over all cards), hf on CPU | vllm | hf")
    shard_frozen: str = option("auto", "auto: shard the frozen weights on a GPU, replicate on CPU | on | off")
    cpu_offload: bool = option(False, "FSDP2 CPU offload of parameters and optimizer state (the 122B on 4x80 GB)")
    train_python: str = option("", "interpreter of the train venv (FSDP2; default: $MOE_LOWBIT_TRAIN_VENV's, "
                                   "else this one)")
    eval_python: str = option("", "interpreter of the eval venv (vLLM; default: this one)")
    gpu_gib: float = option(80.0, "memory of one GPU, for --dry-run's plan")


TOOL = tool_config.Tool("distill_run", "OPD_", DistillConfig, (__doc__ or "").split("\n\n")[0])
SMOKE = {"teacher": "embedded:smollm2-moe", "student": "", "device": "cpu", "nproc": 2}  # what --smoke pins
RECIPE = REPO_ROOT / "configs" / "opd.env"


# -------------------------------------------------------------------------------------------- steps
def run_step(name: str, cmd: list, log_dir: Path, timeout_s: float) -> None:
    """One CLI (step_runner): output to a log file, the child's error line to the error message."""
    print(f"[distill] {name}: {' '.join(str(c) for c in cmd)}", file=sys.stderr, flush=True)
    log = log_dir / f"{name}.log"
    try:
        step_runner.run_step(name, cmd, REPO_ROOT, timeout_s, log_file=log, tail_lines=30)
    except step_runner.StepFailed as e:
        what = f"ran past {timeout_s:.0f} s" if e.timed_out else f"exited with {e.rc}"
        raise DistillError(f"{what}: {' | '.join(step_runner.error_lines(e.tail))} (log: {log})", name) from None


def resolve_model(spec: str, step: str) -> Path:
    import model_ref

    try:
        return model_ref.resolve(spec, log=lambda m: print(m, file=sys.stderr))
    except model_ref.ModelRefError as e:
        raise DistillError(str(e), step, 2) from None


def read_json(path: Path, step: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"wrote no readable JSON at {path}: {e}", step) from None


# -------------------------------------------------------------------------------------------- table
def paired_kl_delta(before: dict, after: dict, z: float) -> dict:
    import fidelity_math

    d = [a - b for a, b in zip(after["per_window"]["kl"], before["per_window"]["kl"])]
    iv = fidelity_math.interval_over_windows(d, z)
    return {"delta": iv.mean, "interval": [iv.lo, iv.hi]}


def build_summary(cfg, paths: dict, timings: dict, student_dir: Path, teacher_dir: Path, host: dict) -> dict:
    import results_compare

    fid = read_json(paths["fidelity"], "fidelity")
    by_dir = {str(Path(s["dir"]).resolve()): s for s in fid["students"]}
    z = fid["config"]["z"]
    arms = {}
    docs = {k: read_json(paths[f"eval_{k}"], f"eval-{k}") for k in ("before", "opd", "offpolicy")}
    for arm, model_dir in (("before", student_dir), ("opd", paths["merged_opd"]), ("offpolicy", paths["merged_offpolicy"])):
        f = by_dir[str(Path(model_dir).resolve())]
        meta = read_json(ptq_meta.meta_path(model_dir), "merge")
        arms[arm] = {"dir": str(model_dir), "kl_mean": f["kl_mean"], "kl_interval": f["kl_mean_interval"],
                     "top1": f["top1_agree"], "ppl": f["ppl_student"],
                     "footprint_packed_bytes": meta["footprint"]["total"]["packed_bytes"],
                     "accuracy": {b: v["acc"] for b, v in docs[arm]["benchmarks"].items()}}
        if arm != "before":
            f_before = by_dir[str(student_dir.resolve())]
            train = read_json(paths[f"run_{arm}"] / "train_log.json", f"train-{arm}")
            merge = read_json(Path(model_dir) / "_opd_merge.json", f"merge-{arm}")
            arms[arm].update(
                kl_delta_vs_before=paired_kl_delta(f_before, f, z),
                kl_intervals_disjoint=(f["kl_mean_interval"][1] < f_before["kl_mean_interval"][0]),
                accuracy_vs_before=results_compare.compare_results(docs["before"], docs[arm]),
                tokens_trained=train["tokens_trained"], steps=train["steps"], loss_first=train["losses"][0],
                loss_last=train["losses"][-1], wall_s_per_step=train["wall_s_per_step_median"],
                train_tokens_per_s=train["tokens_per_s"], world_size=train["world_size"],
                loss=train["config"]["loss"], footprint_unchanged=merge["same_footprint"],
                layout_unchanged=merge["same_names_shapes_dtypes_shards"], tensors_changed=merge["tensors"]["changed"])
    fp_before = arms["before"]["footprint_packed_bytes"]
    return {"schema": SCHEMA, "tag": cfg.tag, "teacher": str(teacher_dir), "student": str(student_dir),
            "host": host, 
            "config": asdict(cfg), "fidelity": {"text": fid["text"], "file": str(paths["fidelity"]),
                                                "teacher_ppl": fid["students"][0]["ppl_teacher"]},
            "arms": arms, "footprint_same_all": all(a["footprint_packed_bytes"] == fp_before for a in arms.values()),
            "files": {k: str(v) for k, v in paths.items()}, "timings_s": timings,
            "provenance": provenance.record()}


def fmt_iv(iv) -> str:
    return "n/a" if iv is None or iv[0] is None else f"[{iv[0]:.4f}, {iv[1]:.4f}]"


def format_table(s: dict) -> str:
    a = s["arms"]
    lines = [f"DISTILL {s['tag']}  teacher={s['teacher']}",
             f"  held-out fidelity text: {s['fidelity']['text'].get('path', s['fidelity']['text'])} "
             f"({s['fidelity']['text']['n_windows']} windows x {s['fidelity']['text']['ctx']}; not a training prompt)",
             f"{'arm':<10} {'KL(T||S)':>9} {'95% interval':>20} {'dKL vs before (paired)':>32} {'disjoint':>8} "
             f"{'top1':>6} {'footprint B':>12} {'tokens':>7} {'s/step':>7}"]
    for arm in ("before", "opd", "offpolicy"):
        r = a[arm]
        d = r.get("kl_delta_vs_before")
        dtxt = "-" if d is None else f"{d['delta']:+.4f} {fmt_iv(d['interval'])}"
        lines.append(f"{arm:<10} {r['kl_mean']:>9.4f} {fmt_iv(r['kl_interval']):>20} {dtxt:>32} "
                     f"{str(r.get('kl_intervals_disjoint', '-')):>8} {r['top1']:>6.3f} {r['footprint_packed_bytes']:>12.0f} "
                     f"{r.get('tokens_trained', '-'):>7} "
                     f"{'-' if r.get('wall_s_per_step') is None else format(r['wall_s_per_step'], '.2f'):>7}")
    lines.append(f"{'accuracy':<10} " + "  ".join(f"{b}: before {a['before']['accuracy'][b]:.1f}" for b in a["before"]["accuracy"]))
    for arm in ("opd", "offpolicy"):
        for b, c in a[arm]["accuracy_vs_before"]["benchmarks"].items():
            lines.append(f"  {arm:<9} {b:<9} n={c['n']:<4} {c['acc_a']:.1f} -> {c['acc_b']:.1f}  delta {c['delta']:+.1f} "
                         f"paired 95% CI [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]  McNemar p={c['p_mcnemar']:.3g}")
    h = s.get("host") or {}
    load = "" if not h else (f"  (load average {h['loadavg_start'][0]:.1f} at start, {h['loadavg_end'][0]:.1f} at end, "
                             f"{h['cpus']} CPUs)")
    lines.append(f"footprint unchanged by both merges: {s['footprint_same_all']}   wall time: "
                 f"{s['timings_s'].get('total', 0):.0f} s{load}")
    return "\n".join(lines)


def all_finite(s: dict) -> bool:
    nums = []
    for r in s["arms"].values():
        nums += [r["kl_mean"], *r["kl_interval"], r["top1"], *r["accuracy"].values()]
        if "kl_delta_vs_before" in r:
            nums += [r["kl_delta_vs_before"]["delta"], *r["kl_delta_vs_before"]["interval"], r["tokens_trained"]]
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in nums)


# ---------------------------------------------------------------------------------------------- run
def run(cfg: DistillConfig, fresh: bool) -> dict:
    t_all = time.perf_counter()
    timings: dict = {}
    # the box the wall times were measured on: a shared CPU box's load decides them more than the code
    host = {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
            "env": {k: os.environ.get(k) for k in HOST_ENV}}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        return out

    teacher_dir = timed("resolve", lambda: resolve_model(cfg.teacher, "resolve"))
    work = Path(cfg.work or cache_paths.scratch_root() / "opd" / cfg.tag)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    logs, results = work / "logs", REPO_ROOT / cfg.results_dir
    T = cfg.step_timeout_s
    if cfg.student:
        student_dir = resolve_model(cfg.student, "resolve")
    else:
        student_dir = work / "student"
        student = quant_config.QuantConfig(model=str(teacher_dir), out=str(student_dir), expert_bits=cfg.expert_bits,
                                           linear_bits=cfg.linear_bits, group=cfg.group, clip_steps=cfg.clip_steps,
                                           clip_lo=cfg.clip_lo, method=cfg.method, grid=cfg.grid,
                                           role_bits=cfg.role_bits, calib_tokens=cfg.calib_tokens,
                                           calib_ctx=cfg.calib_ctx, progress=False,
                                           **({"calib": cfg.calib} if cfg.method in ("gptq", "wclip", "awq") else {}))
        timed("student-build", lambda: run_step("student-build", [
            sys.executable, REPO_ROOT / "src/quant/quant_save.py", *quant_config.argv(student)], logs, T))
    paths = {"roll_student": work / "rollouts_student.jsonl", "roll_teacher": work / "rollouts_teacher.jsonl",
             "scores_student": work / "scores_student", "scores_teacher": work / "scores_teacher",
             "run_opd": work / "run_opd", "run_offpolicy": work / "run_offpolicy",
             "merged_opd": work / "merged_opd", "merged_offpolicy": work / "merged_offpolicy",
             "fidelity": results / "opd" / f"{cfg.tag}_fidelity.json"}
    for arm in ("before", "opd", "offpolicy"):
        paths[f"eval_{arm}"] = results / "vllm_eval" / f"{cfg.tag}_{arm}.json"
    timed("gen-student", lambda: run_step("gen-student", gen_cmd(cfg, student_dir, paths["roll_student"]), logs, T))
    timed("gen-teacher", lambda: run_step("gen-teacher", gen_cmd(cfg, teacher_dir, paths["roll_teacher"]), logs, T))
    for who in ("student", "teacher"):
        timed(f"score-{who}", lambda who=who: run_step(f"score-{who}", score_cmd(
            cfg, teacher_dir, student_dir, paths[f"roll_{who}"], paths[f"scores_{who}"]), logs, T))
    for arm, scores, loss in (("opd", "scores_student", cfg.loss), ("offpolicy", "scores_teacher", cfg.offpolicy_loss)):
        timed(f"train-{arm}", lambda arm=arm, scores=scores, loss=loss: run_step(
            f"train-{arm}", train_cmd(cfg, student_dir, paths[scores], paths[f"run_{arm}"], loss), logs, T))
        timed(f"merge-{arm}", lambda arm=arm: run_step(f"merge-{arm}", [
            sys.executable, REPO_ROOT / "src/distill/merge_adapter.py", "--run", paths[f"run_{arm}"],
            "--out", paths[f"merged_{arm}"], "--force"], logs, T))
    for arm, model in (("before", student_dir), ("opd", paths["merged_opd"]), ("offpolicy", paths["merged_offpolicy"])):
        timed(f"eval-{arm}", lambda arm=arm, model=model: run_step(
            f"eval-{arm}", eval_cmd(cfg, model, f"{cfg.tag}_{arm}", results, None), logs, T))
    fid_text = Path(cfg.fidelity_text)
    fid_text = fid_text if fid_text.is_absolute() else REPO_ROOT / fid_text
    timed("fidelity", lambda: run_step("fidelity", [
        sys.executable, REPO_ROOT / "src/eval/moe_eval.py", "--teacher", teacher_dir, "--student", student_dir,
        "--student", paths["merged_opd"], "--student", paths["merged_offpolicy"], "--out", paths["fidelity"],
        "--ctx", cfg.fidelity_ctx, "--max-tokens", cfg.fidelity_tokens, "--text-file", fid_text,
        "--device", cfg.device], logs, T))
    timings["total"] = time.perf_counter() - t_all
    host["loadavg_end"] = list(os.getloadavg())
    summary = build_summary(cfg, paths, timings, student_dir, teacher_dir, host)
    atomic_io.write_json(results / "opd" / f"{cfg.tag}.json", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    return tool_config.build_parser(TOOL, extra=[
        (("--smoke",), {"action": "store_true", "help": "the offline fixture end to end on CPU (pins "
                        + ", ".join(f"{k}={v!r}" for k, v in SMOKE.items()) + ")"}),
        (("--fresh",), {"action": "store_true", "help": "delete this tag's work dir first (else steps resume)"}),
        (("--dry-run",), {"action": "store_true", "help": "check the config, print every step's peak memory per "
                          "rank (model built on the meta device) and the stage's disk/RAM/time, run nothing"})])


def config_from(args: argparse.Namespace, env=None) -> DistillConfig:
    """tool_config's rule; configs/opd.env is the recipe unless --recipe / OPD_RECIPE names another
    (OPD_CONFIG, the old name, still works); --smoke pins the offline fixture."""
    env = dict(os.environ if env is None else env)
    if env.get("OPD_CONFIG") and not env.get("OPD_RECIPE"):
        print("distill_run: OPD_CONFIG is deprecated; use OPD_RECIPE", file=sys.stderr)
        env["OPD_RECIPE"] = env["OPD_CONFIG"]
    env.pop("OPD_CONFIG", None)
    if not getattr(args, "recipe", None) and not env.get("OPD_RECIPE"):
        args = argparse.Namespace(**{**vars(args), "recipe": str(RECIPE)})
    bad: list = []
    try:
        cfg = tool_config.resolve(TOOL, args, env, errors=bad)  # bad keys/values collected, checked with the rest
    except tool_config.ConfigError as e:
        raise DistillError(str(e), "config", 2) from None
    if getattr(args, "smoke", False):
        cfg = dataclasses.replace(cfg, **SMOKE)
    train_venv = env.get("MOE_LOWBIT_TRAIN_VENV")
    if not cfg.train_python and train_venv:  # the FSDP2 step's own venv, resolved like MOE_LOWBIT_VENV
        cfg = dataclasses.replace(cfg, train_python=str(Path(train_venv) / "bin" / "python"))
    bad += distill_steps.config_problems(cfg)  # every bad value at once, before step 1
    if bad:
        raise DistillError(f"{len(bad)} bad value(s): " + "; ".join(bad), "config", 2)
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from(args)
        if args.dry_run:
            import sizing_run

            teacher = resolve_model(cfg.teacher, "resolve")
            student = resolve_model(cfg.student, "resolve") if cfg.student else None
            if student is not None and not ptq_meta.has_meta(student):  # a BF16 checkpoint: sized as the teacher
                teacher, student = student, None
            print(distill_steps.memory_plan(cfg, teacher, student))
            if not any(Path(student or teacher).glob("*.safetensors")):  # a config-only model: no headers to size
                return 0
            return sizing_run.main(["--stage", "distill", "--model", str(student or teacher),
                                    "--train-tokens", str(cfg.token_budget)])
        for key, value in host_env_defaults(cfg.device).items():  # once, by the entry point
            os.environ.setdefault(key, value)
        summary = run(cfg, args.fresh)
    except DistillError as e:
        print(f"DISTILL FAILED at step {e.step}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("DISTILL interrupted; rerun the same command to resume the finished steps", file=sys.stderr)
        return 130
    print(format_table(summary))
    print(f"results: {Path(cfg.results_dir) / 'opd' / (cfg.tag + '.json')}")
    if not all_finite(summary):
        print("DISTILL FAILED at step table: a number in the table is missing or not finite", file=sys.stderr)
        return 1
    print("DISTILL OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
