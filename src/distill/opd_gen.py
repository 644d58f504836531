"""Rollouts with vLLM: n samples per prompt from a model (the student for OPD, the teacher for the
off-policy baseline), saved as a resumable per-prompt JSONL with provenance.

The chat template is applied here with the model's tokenizer and vLLM is given token ids, so the stored
`prompt_ids` + `completion_ids` are exactly the sequence the scorer and the trainer see (no second
tokenization that could shift a position). Each sample keeps its `finish_reason` ("stop" or "length"):
`--finished-only` drops truncated samples from the file (they are still counted in the summary),
because a truncated trajectory teaches the student to run out of budget.

    python src/distill/opd_gen.py --model STUDENT_DIR --prompts configs/data/opd/smoke_prompts.jsonl \
        --out work/rollouts.jsonl --n 4 --temperature 1.0 --max-new-tokens 256 [--finished-only] [--fresh]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import atomic_io
import opd_data
from opd_data import OpdInputError


@dataclass(frozen=True)
class GenConfig:
    model: str
    out: str
    prompts: str | None = None
    dataset: str | None = None
    split: str = "train"
    field: str | None = None
    limit: int | None = None
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    finished_only: bool = False
    thinking: bool = False
    batch_prompts: int = 16
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    engine_args: tuple[str, ...] = ()  # vLLM KEY=VALUE

    def __post_init__(self):
        opd_data.parse_engine_args(self.engine_args)  # a malformed KEY=VALUE fails here, before any load
        if self.tensor_parallel_size < 1:
            raise OpdInputError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.n < 1:
            raise OpdInputError(f"--n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise OpdInputError(f"--temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise OpdInputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

    def identity(self) -> dict:
        """What decides the file's content (resume refuses a file made under anything else)."""
        d = asdict(self)
        for k in ("out", "batch_prompts", "enforce_eager", "tensor_parallel_size", "engine_args"):
            d.pop(k)
        return d


def prompt_seed(seed: int, prompt_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "little")


def encode_prompts(tokenizer, prompts: list[dict], thinking: bool) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True,
                                            enable_thinking=thinking)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        out.append([int(x) for x in ids])
    return out


def generate(cfg: GenConfig, fresh: bool = False, argv=None) -> dict:
    prompts = opd_data.load_prompts(cfg.prompts, cfg.dataset, cfg.split, cfg.field, cfg.limit)
    model_dir = Path(cfg.model)
    opd_data.read_config(model_dir, "--model")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ident = dict(cfg.identity(), model_config_sha=opd_data.config_hash(opd_data.read_config(model_dir, "--model")),
                 prompts_sha=opd_data.config_hash(prompts))
    out = Path(cfg.out)
    jsonl = opd_data.ResumableJsonl(out, opd_data.header_for("opd-rollouts", ident, argv))
    done = jsonl.open(fresh=fresh)
    todo = [p for p in prompts if p["id"] not in done]
    ids = encode_prompts(tok, todo, cfg.thinking)
    longest = max([len(x) for x in ids] + [len(r["prompt_ids"]) for r in done.values()] + [1])
    t0, load_s = time.perf_counter(), 0.0
    new_tokens = 0
    if todo:
        from tqdm import tqdm
        from vllm import LLM, SamplingParams

        base = {"model": str(model_dir), "dtype": cfg.dtype, "seed": cfg.seed,
                "max_model_len": cfg.max_model_len or longest + cfg.max_new_tokens + 8}
        llm = LLM(**opd_data.engine_kwargs(base, opd_data.parse_engine_args(cfg.engine_args),
                                           cfg.tensor_parallel_size, cfg.enforce_eager))
        load_s, t0 = time.perf_counter() - t0, time.perf_counter()  # tokens/s: generation only, not the engine start
        bar = tqdm(total=len(todo), desc="rollouts", unit="prompt", file=sys.stderr, dynamic_ncols=True)
        try:
            for b0 in range(0, len(todo), cfg.batch_prompts):
                batch, batch_ids = todo[b0:b0 + cfg.batch_prompts], ids[b0:b0 + cfg.batch_prompts]
                params = [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                         max_tokens=cfg.max_new_tokens, seed=prompt_seed(cfg.seed, p["id"]))
                          for p in batch]
                outs = llm.generate([{"prompt_token_ids": x} for x in batch_ids], params, use_tqdm=False)
                records = []
                for p, pid, o in zip(batch, batch_ids, outs):
                    samples = [{"completion_ids": [int(t) for t in c.token_ids], "text": c.text,
                                "finish_reason": str(c.finish_reason), "n_tokens": len(c.token_ids)}
                               for c in o.outputs]
                    new_tokens += sum(s["n_tokens"] for s in samples)
                    records.append({"key": p["id"], "prompt_ids": pid, "n_sampled": len(samples),
                                    "n_truncated": sum(s["finish_reason"] != "stop" for s in samples),
                                    "samples": [s for s in samples if s["finish_reason"] == "stop"]
                                    if cfg.finished_only else samples})
                jsonl.append(records)
                bar.update(len(batch))
                bar.set_postfix_str(f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.0f} tok/s", refresh=False)
        finally:
            bar.close()
            opd_data.shutdown_engine(llm)
    seconds = time.perf_counter() - t0
    _, records = opd_data.read_rollouts(out, allow_partial=True)
    sampled = sum(r["n_sampled"] for r in records)
    truncated = sum(r["n_truncated"] for r in records)
    kept = sum(len(r["samples"]) for r in records)
    summary = {"prompts": len(records), "samples_generated": sampled, "samples_kept": kept,
               "truncated": truncated, "finished_fraction": (sampled - truncated) / max(sampled, 1),
               "completion_tokens_kept": sum(s["n_tokens"] for r in records for s in r["samples"]),
               "resumed_prompts": len(done), "seconds_this_run": seconds, "engine_start_s": load_s,
               "tokens_per_s_this_run": new_tokens / max(seconds, 1e-9), "config": ident}
    if kept == 0:
        raise OpdInputError(f"no samples kept in {out} ({sampled} generated, {truncated} truncated"
                            f"{'; --finished-only dropped them all: raise --max-new-tokens' if cfg.finished_only else ''})")
    atomic_io.write_json(opd_data.complete_marker(out), summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="opd_gen.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint dir that samples (student for OPD, teacher off-policy)")
    ap.add_argument("--out", required=True, help="rollout JSONL (resumed if it exists under the same settings)")
    ap.add_argument("--prompts", help="JSONL file: one object per line with messages/prompt/problem/question")
    ap.add_argument("--dataset", help="hub dataset instead of --prompts (needs network)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--field", help="prompt column/field name (default: first of messages, prompt, problem, ...)")
    ap.add_argument("--limit", type=int, help="use only the first N prompts")
    ap.add_argument("--n", type=int, default=4, help="rollouts per prompt (tinker: 4)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="token budget per rollout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finished-only", action="store_true", help="keep only rollouts that ended by themselves")
    ap.add_argument("--thinking", action="store_true", help="chat template with enable_thinking=True")
    ap.add_argument("--batch-prompts", type=int, default=16, help="prompts per vLLM call (one JSONL append each)")
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None,
                    help="no CUDA graphs (default: graphs on a GPU, eager on CPU where none exist)")
    ap.add_argument("--engine-arg", dest="engine_args", action="append", default=[], metavar="KEY=VALUE",
                    help="any vLLM engine argument, e.g. gpu_memory_utilization=0.85 (repeatable)")
    ap.add_argument("--fresh", action="store_true", help="discard an existing --out instead of resuming it")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    fresh = args.__dict__.pop("fresh")
    try:
        cfg = GenConfig(**{**vars(args), "engine_args": tuple(args.engine_args)})
        summary = generate(cfg, fresh, argv=sys.argv if argv is None else [sys.argv[0], *argv])
    except OpdInputError as e:
        print(f"opd_gen: error: {e}", file=sys.stderr)
        return 2
    print(f"opd_gen: {summary['prompts']} prompts, {summary['samples_kept']}/{summary['samples_generated']} samples "
          f"kept ({summary['truncated']} truncated), {summary['completion_tokens_kept']} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
