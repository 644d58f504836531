"""Evaluate a GGUF through llama-server with the SAME harness as every other model: eval_run.run_eval on
its openai backend (identical prompt build, extraction, grading, results schema, resume), so a GGUF score
sits next to the BF16 and clip scores with nothing but the engine changed.

This module only owns the server: it starts llama-server on a free loopback port (with the mmproj and
expert-offload flags), waits for /health, runs the eval, then adds a `llamacpp` block to the results JSON:
prefill/decode tok/s from the server's own timings (/metrics totals + one fixed single-stream probe),
peak VRAM where a GPU exists, the server command and version. The server is always stopped (see
llamacpp_server.py), also when the eval fails or is interrupted.

    python -m llamacpp_eval8 --gguf out/model-IQ3_XXS.gguf --tag q122-iq3 --benchmarks mmlu_pro,gpqa \
        --n 40 [--mmproj out/model-mmproj-f16.gguf] [--n-cpu-moe 20] [--override-tensor exps=CPU]

Also reached as `bash pipelines/eval.sh --backend llamacpp --gguf ... [--mmproj ...]`. Every vllm_eval8
option works here too (EVAL_* environment variables included, plus EVAL_GGUF / EVAL_MMPROJ); the results
record backend "openai" (the client that generated) and the server in their `llamacpp` block; --model
defaults to the GGUF's file stem (the name the server answers to). The mmproj's fingerprint is part of
the generation config, so a resume with another projector is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import atomic_io
import llamacpp_server
import llamacpp_metrics
import mm_eval
import provenance
import eval_config
import eval_run
from eval_resume import ResumeMismatch

ROOT = Path(__file__).resolve().parents[2]
# A fixed probe: same text and length every run, so single-stream tok/s are comparable across GGUFs.
PROBE_PROMPT = ("The history of numerical computing begins with tables of logarithms and the people who "
                "computed them by hand. ") * 8
PROBE_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """The llama-server side of a run (the eval side is a eval_config.EvalConfig)."""
    gguf: Path
    mmproj: Path | None = None
    llama_cpp: Path | None = None  # install prefix; None = $LLAMA_CPP or install_llamacpp.sh
    port: int = 0
    parallel: int | None = None  # None = min(concurrency, 4)
    ctx_per_slot: int | None = None  # None = the eval's max model length
    threads: int | None = None
    n_gpu_layers: str | None = None
    n_cpu_moe: int | None = None
    override_tensor: tuple = ()
    server_args: tuple = ()
    startup_timeout_s: float = 600.0
    probe: bool = True


def server_config(opts: ServerOptions, cfg: eval_config.EvalConfig, binary: Path, log_path: Path) -> llamacpp_server.ServerConfig:
    parallel = opts.parallel or max(1, min(cfg.concurrency, 4))
    ctx = opts.ctx_per_slot or cfg.resolved_max_model_len()
    return llamacpp_server.ServerConfig(
        binary=binary, model=opts.gguf, mmproj=opts.mmproj, alias=cfg.served_model_name or cfg.model,
        port=opts.port, ctx_size=ctx * parallel, parallel=parallel, threads=opts.threads,
        n_gpu_layers=opts.n_gpu_layers, n_cpu_moe=opts.n_cpu_moe, override_tensor=tuple(opts.override_tensor),
        extra_args=tuple(opts.server_args), startup_timeout_s=opts.startup_timeout_s, log_path=log_path)


def run(cfg: eval_config.EvalConfig, opts: ServerOptions, argv: Sequence[str] | None = None) -> dict:
    """Start the server, run the eval through it, stop it; returns the results JSON (with `llamacpp`)."""
    images = mm_eval.image_benchmarks(cfg.benchmarks)
    if images and opts.mmproj is None:  # refused before the server starts: this GGUF alone cannot see
        raise ValueError(f"model {opts.gguf} is served text-only (no --mmproj); {', '.join(images)} ask image "
                         "questions: pass --mmproj <stem>-mmproj-f16.gguf (pipelines/pack_gguf.sh writes it)")
    prefix = opts.llama_cpp or llamacpp_server.default_prefix(ROOT)
    binary = llamacpp_server.find_binary(prefix)
    json_path, _ = cfg.results_paths()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = json_path.with_name(f"{cfg.tag}.llama-server.log")
    scfg = server_config(opts, cfg, binary, log_path)
    with llamacpp_server.LlamaServer(scfg) as server:
        print(f"llamacpp_eval8: llama-server up on {server.base_url} in {server.startup_s:.1f}s "
              f"(log {log_path})", file=sys.stderr)
        eval_cfg = dataclasses.replace(cfg, backend="openai", base_url=server.base_url + "/v1",
                                       served_model_name=scfg.alias, model_path=str(opts.gguf),
                                       mmproj_path=str(opts.mmproj) if opts.mmproj else None,
                                       concurrency=scfg.parallel)
        try:
            doc = eval_run.run_eval(eval_cfg, argv=argv)
        except Exception as err:
            if not server.alive():
                raise llamacpp_server.ServerError(
                    f"llama-server died during the eval (exit code {server.proc.returncode}); finished samples are "
                    f"kept in the JSONL and a rerun resumes. Log tail:\n{llamacpp_server.tail(log_path)}") from err
            raise
        totals = llamacpp_metrics.throughput(server.metrics())
        probe = server.probe(PROBE_PROMPT, PROBE_TOKENS) if opts.probe else None
        block = {
            "server_command": [provenance.redact(a) for a in server.command],
            "server_version": server.version(),
            "startup_s": server.startup_s,
            "parallel": scfg.parallel, "ctx_size": scfg.ctx_size,
            "throughput_run": totals,
            "probe": ({"prompt_tokens": probe.get("prompt_n"), "predicted_tokens": probe.get("predicted_n"),
                       "prefill_tok_s": probe.get("prompt_per_second"),
                       "decode_tok_s": probe.get("predicted_per_second")} if probe else None),
            "peak_vram_mib": server.vram.peak_mib if server.vram else None,
            "gpu": server.vram is not None,
            "mmproj": str(opts.mmproj) if opts.mmproj else None,
            "offload": {"n_cpu_moe": opts.n_cpu_moe, "override_tensor": list(opts.override_tensor),
                        "n_gpu_layers": opts.n_gpu_layers},
        }
    block["server_exit_code"] = server.proc.returncode if server.proc else None
    doc["llamacpp"] = block
    text = provenance.redact(json.dumps(doc, indent=1, ensure_ascii=False, default=str, allow_nan=False))
    atomic_io.write_text(json_path, text + "\n")
    return json.loads(text)


def build_parser() -> argparse.ArgumentParser:
    parser = eval_config.build_parser()
    parser.prog = "llamacpp_eval8"
    parser.description = __doc__
    g = parser.add_argument_group("llama-server")
    g.add_argument("--gguf", default=os.environ.get("EVAL_GGUF") or None, required=not os.environ.get("EVAL_GGUF"),
                   help="the GGUF to serve (pipelines/pack_gguf.sh output) [env EVAL_GGUF]")
    g.add_argument("--mmproj", default=os.environ.get("EVAL_MMPROJ") or None,
                   help="vision projector GGUF (*-mmproj-f16.gguf); needed for image benchmarks [env EVAL_MMPROJ]")
    g.add_argument("--llama-cpp", default=None, help="llama.cpp install prefix (default: $LLAMA_CPP or the cached build)")
    g.add_argument("--port", type=int, default=0, help="loopback port; 0 = a free one (default)")
    g.add_argument("--parallel", type=int, default=None, help="server slots = concurrent requests (default min(concurrency, 4))")
    g.add_argument("--ctx-per-slot", type=int, default=None, help="context per slot (default: the budget's max model len)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads of the server")
    g.add_argument("--n-gpu-layers", default=None, help="layers on the GPU: N, auto or all (default: server's auto)")
    g.add_argument("--n-cpu-moe", type=int, default=None, help="keep the experts of the first N layers on the CPU")
    g.add_argument("--override-tensor", action="append", default=None, metavar="PATTERN=BUFT",
                   help="llama-server --override-tensor, e.g. exps=CPU; repeatable")
    g.add_argument("--server-arg", action="append", default=None,
                   help="extra llama-server arguments (shell words), e.g. '--flash-attn on'; repeatable")
    g.add_argument("--startup-timeout-s", type=float, default=600.0, help="how long to wait for /health")
    g.add_argument("--no-probe", action="store_true", help="skip the fixed single-stream speed probe")
    return parser


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        gguf=Path(args.gguf), mmproj=Path(args.mmproj) if args.mmproj else None,
        llama_cpp=Path(args.llama_cpp) if args.llama_cpp else None, port=args.port, parallel=args.parallel,
        ctx_per_slot=args.ctx_per_slot, threads=args.threads, n_gpu_layers=args.n_gpu_layers,
        n_cpu_moe=args.n_cpu_moe, override_tensor=tuple(args.override_tensor or ()),
        server_args=llamacpp_server.split_passthrough(args.server_arg), startup_timeout_s=args.startup_timeout_s,
        probe=not args.no_probe)


def format_speed(block: dict) -> str:
    run, probe = block["throughput_run"], block.get("probe") or {}

    def f(x):
        return "-" if x is None else f"{x:.1f}"

    vram = "-" if block["peak_vram_mib"] is None else f"{block['peak_vram_mib']:.0f} MiB"
    return (f"llama-server: prefill {f(run['prefill_tok_s'])} tok/s, decode {f(run['decode_tok_s'])} tok/s over the run; "
            f"probe prefill {f(probe.get('prefill_tok_s'))}, decode {f(probe.get('decode_tok_s'))} tok/s; "
            f"peak VRAM {vram}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.backend not in (None, "openai", "llamacpp"):  # llamacpp: how eval.sh names this path
        print(f"llamacpp_eval8: the client is always openai here (got --backend {args.backend!r})", file=sys.stderr)
        return 2
    args.backend = "openai"
    if not args.model and not os.environ.get("EVAL_MODEL"):
        args.model = Path(args.gguf).stem
    try:
        cfg = eval_config.config_from_args(args)
        doc = run(cfg, options_from_args(args), argv=[sys.argv[0], *argv])
    except (ValueError, FileNotFoundError, ResumeMismatch, llamacpp_server.ServerError) as err:
        print(f"llamacpp_eval8: {provenance.redact(str(err))}", file=sys.stderr)
        return 2
    print(eval_run.format_summary(doc))
    print(format_speed(doc["llamacpp"]))
    print(f"wrote {cfg.results_paths()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
