"""The teacher scores rollouts: its top-k log-probs (k=20 by default) and the log-mass of everything
else, at every completion token, cached in sharded safetensors files.

Alignment (the one thing that must not slip). A rollout is the sequence x = prompt (P tokens) +
completion (C tokens). Row i of the stored scores (i = 0..C-1) is the teacher's distribution over the
token at sequence position P+i, i.e. for PREDICTING completion token i from x[:P+i]:
* HF backend: the causal LM's logits at position P-1+i;
* vLLM backend: `prompt_logprobs` entry P+i (vLLM indexes a prompt position by the token it scores).
The trainer uses the student's logits at position P-1+i for row i, so both sides predict the same
token. `target_logp` (the teacher's log-prob of the token actually sampled) is stored too, as the
check that the rows line up (tests/test_opd_score.py teacher-forces the sequence and compares).

Log-probs are a log-softmax over the FULL vocabulary (never renormalised over the top-k); `rest_logp`
is log(1 - sum of the top-k mass), computed from the logits as logsumexp over the other ids (HF), or
from the k probabilities (vLLM, floored at the fp32 resolution of that sum, see opd_loss).

Sharding and resume: items are cut into shards of `--shard-size` rollouts in file order; shard j is
`scores-<j>.safetensors` + `scores-<j>.json` (the uids, prompt lengths, and a key over teacher identity,
k, backend and the exact token ids). A rerun reuses a shard whose key matches and recomputes the rest.
`index.json` is written last and marks the score set complete.

    python src/distill/opd_score.py --teacher DIR --rollouts R.jsonl [--rollouts R2.jsonl] --out DIR \
        [--student DIR] [--k 20] [--backend hf|vllm] [--finished-only]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import atomic_io
import opd_data
import provenance
from opd_data import OpdInputError

if TYPE_CHECKING:
    import torch

INDEX = "index.json"
FORMAT = "moe-lowbit/opd-scores/1"
REST_FLOOR_LOG = -16.635532333438686  # log(2^-24): resolution of an fp32 sum of top-k probabilities


@dataclass(frozen=True)
class ScoreConfig:
    teacher: str
    rollouts: tuple[str, ...]
    out: str
    student: str | None = None
    k: int = 20
    backend: str = "hf"
    finished_only: bool = False
    shard_size: int = 64
    batch_tokens: int = 4096
    device: str = "cpu"
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None  # None: CUDA graphs on a GPU, eager on CPU
    engine_args: tuple[str, ...] = ()  # vLLM KEY=VALUE

    def __post_init__(self):
        opd_data.parse_engine_args(self.engine_args)  # a malformed KEY=VALUE fails here, before any load
        if self.tensor_parallel_size < 1:
            raise OpdInputError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.k < 1:
            raise OpdInputError(f"--k must be >= 1, got {self.k}")
        if self.backend not in ("hf", "vllm"):
            raise OpdInputError(f"--backend must be hf or vllm, got {self.backend!r}")
        if self.shard_size < 1:
            raise OpdInputError(f"--shard-size must be >= 1, got {self.shard_size}")


# ---------------------------------------------------------------------------------------------- math
def topk_rows(logits: torch.Tensor, targets: torch.Tensor, k: int) -> dict:
    """[C, V] logits (row i predicts targets[i]) -> top-k ids/log-probs, rest log-mass, target log-prob."""
    import torch
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_logp, top_ids = logp.topk(k, dim=-1)
    rest = torch.logsumexp(logp.scatter(-1, top_ids, float("-inf")), dim=-1)
    return {"topk_ids": top_ids.to(torch.int32), "topk_logp": top_logp, "rest_logp": rest,
            "target_logp": logp.gather(-1, targets.long()[:, None])[:, 0]}


def completion_rows(logits: torch.Tensor, prompt_len: int, n_completion: int) -> torch.Tensor:
    """The logits rows that predict the completion tokens: positions P-1 .. P+C-2 (see module doc)."""
    return logits[prompt_len - 1: prompt_len - 1 + n_completion]


def vllm_rows(prompt_logprobs: list, seq: list[int], prompt_len: int, k: int) -> dict:
    """The same rows from vLLM's prompt_logprobs (entry j scores token seq[j] given seq[:j])."""
    import torch
    ids, lps, rest, tgt = [], [], [], []
    for j in range(prompt_len, len(seq)):
        entry = prompt_logprobs[j]
        ranked = sorted(((v.rank, t, v.logprob) for t, v in entry.items() if v.rank is not None and v.rank <= k))[:k]
        if len(ranked) < k:
            raise RuntimeError(f"vLLM returned {len(ranked)} ranked logprobs at position {j}, asked for {k}")
        ids.append([t for _, t, _ in ranked])
        lp = torch.tensor([x for _, _, x in ranked], dtype=torch.float64)
        lps.append(lp)
        rest.append(float(torch.log(torch.clamp(1.0 - lp.exp().sum(), min=2.0 ** -24))))
        tgt.append(float(entry[seq[j]].logprob))
    return {"topk_ids": torch.tensor(ids, dtype=torch.int32), "topk_logp": torch.stack(lps).float(),
            "rest_logp": torch.tensor(rest, dtype=torch.float32), "target_logp": torch.tensor(tgt, dtype=torch.float32)}


# ----------------------------------------------------------------------------------------- backends
class HfScorer:
    def __init__(self, teacher: str, device: str, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        torch_dtype = {"auto": torch.float32 if device == "cpu" else torch.bfloat16, "float32": torch.float32,
                       "bfloat16": torch.bfloat16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch_dtype).to(device).eval()
        self.device = device

    def score(self, items: list[dict], k: int) -> list[dict]:
        import torch

        with torch.no_grad():
            return self._score(items, k)

    def _score(self, items: list[dict], k: int) -> list[dict]:
        import torch
        ids, mask = opd_data.padded_batch(items)
        # only the positions that predict a completion token go through the LM head (see the trainer)
        first = min(len(it["prompt_ids"]) - 1 for it in items)
        last = max(len(it["prompt_ids"]) - 1 + len(it["completion_ids"]) for it in items)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False,
                            logits_to_keep=torch.arange(first, last, device=self.device)).logits
        out = []
        for b, it in enumerate(items):
            rows = completion_rows(logits[b], len(it["prompt_ids"]) - first, len(it["completion_ids"]))
            out.append({n: t.cpu() for n, t in topk_rows(rows, torch.tensor(it["completion_ids"]), k).items()})
        return out


class VllmScorer:
    """vLLM prompt_logprobs over all GPUs (tensor parallel); max_logprobs raised to k (vLLM's default 20
    would cap top-k); the engine is shut down when scoring ends."""

    def __init__(self, teacher: str, max_len: int, cfg: "ScoreConfig"):
        from vllm import LLM

        base = {"model": teacher, "dtype": cfg.dtype, "max_model_len": max_len + 8, "seed": 0,
                "max_logprobs": max(cfg.k, 20)}
        self.llm = LLM(**opd_data.engine_kwargs(base, opd_data.parse_engine_args(cfg.engine_args),
                                                cfg.tensor_parallel_size, cfg.enforce_eager))

    def close(self):
        opd_data.shutdown_engine(self.llm)

    def score(self, items: list[dict], k: int) -> list[dict]:
        from vllm import SamplingParams

        seqs = [it["prompt_ids"] + it["completion_ids"] for it in items]
        outs = self.llm.generate([{"prompt_token_ids": s} for s in seqs],
                                 SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0), use_tqdm=False)
        return [vllm_rows(o.prompt_logprobs, s, len(it["prompt_ids"]), k) for o, s, it in zip(outs, seqs, items)]


# ------------------------------------------------------------------------------------------ storage
def shard_key(items: list[dict], teacher_id: str, cfg: ScoreConfig) -> str:
    return opd_data.config_hash({"teacher": teacher_id, "k": cfg.k, "backend": cfg.backend,
                                 "items": [[it["uid"], it["prompt_ids"], it["completion_ids"]] for it in items]})


def write_shard(out: Path, j: int, items: list[dict], rows: list[dict], key: str) -> dict:
    import torch
    from safetensors.torch import save

    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + int(r["topk_ids"].shape[0]))
    tensors = {n: torch.cat([r[n] for r in rows]).contiguous() for n in rows[0]}
    tensors["row_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    atomic_io.write_bytes(out / f"scores-{j:05d}.safetensors", save(tensors))
    meta = {"key": key, "uids": [it["uid"] for it in items], "prompt_lens": [len(it["prompt_ids"]) for it in items],
            "tokens": offsets[-1]}
    atomic_io.write_json(out / f"scores-{j:05d}.json", meta)
    return meta


def read_shard_meta(out: Path, j: int) -> dict | None:
    try:
        return json.loads((out / f"scores-{j:05d}.json").read_text())
    except (OSError, ValueError):
        return None


def load_scores(score_dir: str | Path) -> tuple[dict, dict[str, dict]]:
    """(index, uid -> {topk_ids, topk_logp, rest_logp, target_logp}) of a complete score set."""
    from safetensors.torch import load_file

    d = Path(score_dir)
    if not (d / INDEX).is_file():
        raise OpdInputError(f"scores {d}: no {INDEX} (incomplete or not a score dir; rerun opd_score.py)")
    index = json.loads((d / INDEX).read_text())
    by_uid = {}
    for j, shard in enumerate(index["shards"]):
        t = load_file(str(d / shard["file"]))
        off = t["row_offsets"].tolist()
        for i, uid in enumerate(shard["uids"]):
            by_uid[uid] = {n: t[n][off[i]:off[i + 1]] for n in ("topk_ids", "topk_logp", "rest_logp", "target_logp")}
    return index, by_uid


# ---------------------------------------------------------------------------------------------- run
def score(cfg: ScoreConfig, argv=None) -> dict:
    import moe_eval

    teacher = Path(cfg.teacher)
    opd_data.read_config(teacher, "--teacher")
    if cfg.student:
        opd_data.check_same_vocab(teacher, cfg.student)
    items, sources = [], []
    for r in cfg.rollouts:
        header, records = opd_data.read_rollouts(r)
        sources.append({"file": str(r), "config_hash": header["config_hash"], "model": header["config"]["model"]})
        items += opd_data.flatten_samples(records, cfg.finished_only)
    if not items:
        raise OpdInputError(f"no samples to score in {list(cfg.rollouts)}")
    vocab = opd_data.text_config(opd_data.read_config(teacher, "--teacher")).get("vocab_size")
    bad = next((it for it in items if max(it["prompt_ids"] + it["completion_ids"]) >= vocab), None)
    if bad is not None:
        raise OpdInputError(f"rollout {bad['uid']} holds token ids >= the teacher's vocab_size {vocab}: "
                            f"these rollouts were made with another tokenizer")
    teacher_id = moe_eval.model_identity(teacher)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)
    shards = [items[i:i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    keys = [shard_key(s, teacher_id, cfg) for s in shards]
    todo = [j for j, key in enumerate(keys) if (read_shard_meta(out, j) or {}).get("key") != key
            or not (out / f"scores-{j:05d}.safetensors").is_file()]
    from tqdm import tqdm

    t0, tokens, load_s = time.perf_counter(), 0, 0.0
    scorer = None
    bar = tqdm(total=sum(len(it["completion_ids"]) for j in todo for it in shards[j]), desc="score", unit="tok",
               file=sys.stderr, dynamic_ncols=True, disable=not todo)
    try:
        for j in todo:
            if scorer is None:
                scorer = (HfScorer(str(teacher), cfg.device, cfg.dtype) if cfg.backend == "hf" else
                          VllmScorer(str(teacher), max(len(it["prompt_ids"]) + len(it["completion_ids"]) for it in items),
                                     cfg))
                load_s, t0 = time.perf_counter() - t0, time.perf_counter()  # tokens/s: scoring only
            # longest first, so a batch pads to a similar width; rows go back in file order
            order = sorted(range(len(shards[j])), key=lambda i: -(len(shards[j][i]["prompt_ids"]) +
                                                                   len(shards[j][i]["completion_ids"])))
            by_pos, batch, width = {}, [], 0
            for i in order + [None]:
                it = None if i is None else shards[j][i]
                n = 0 if it is None else len(it["prompt_ids"]) + len(it["completion_ids"])
                if batch and (it is None or max(width, n) * (len(batch) + 1) > cfg.batch_tokens):
                    for (pos, _), r in zip(batch, scorer.score([b for _, b in batch], cfg.k)):
                        by_pos[pos] = r
                    done = sum(len(b["completion_ids"]) for _, b in batch)
                    tokens += done
                    bar.update(done)
                    bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f} tok/s", refresh=False)
                    batch, width = [], 0
                if it is not None:
                    batch.append((i, it))
                    width = max(width, n)
            write_shard(out, j, shards[j], [by_pos[i] for i in range(len(shards[j]))], keys[j])
    finally:
        bar.close()
        if hasattr(scorer, "close"):
            scorer.close()
    seconds = time.perf_counter() - t0
    index = {"format": FORMAT, "teacher": {"dir": str(teacher), "id": teacher_id}, "k": cfg.k, "backend": cfg.backend,
             "alignment": "row i = teacher distribution for completion token i (HF logits at P-1+i)",
             "rollouts": sources, "finished_only": cfg.finished_only, "items": len(items),
             "tokens": sum(len(it["completion_ids"]) for it in items),
             "shards": [{"file": f"scores-{j:05d}.safetensors", "uids": [it["uid"] for it in s]} for j, s in enumerate(shards)],
             "resumed_shards": len(shards) - len(todo), "seconds_this_run": seconds, "model_load_s": load_s,
             "tokens_per_s_this_run": tokens / max(seconds, 1e-9) if tokens else None,
             "provenance": provenance.record(argv=argv)}
    atomic_io.write_json(out / INDEX, index)
    return index


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="opd_score.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="BF16 teacher checkpoint dir")
    ap.add_argument("--rollouts", action="append", required=True, help="rollout JSONL from opd_gen.py (repeatable)")
    ap.add_argument("--out", required=True, help="score dir (shards + index.json); resumed when it exists")
    ap.add_argument("--student", help="student dir: checked to share the teacher's vocabulary")
    ap.add_argument("--k", type=int, default=20, help="teacher top-k kept per token (default 20)")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="hf forward, or vLLM prompt_logprobs")
    ap.add_argument("--finished-only", action="store_true", help="score only rollouts with finish_reason 'stop'")
    ap.add_argument("--shard-size", type=int, default=64, help="rollouts per shard file")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per teacher forward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm backend: GPUs the teacher spans")
    ap.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None,
                    help="vllm backend: no CUDA graphs (default: graphs on a GPU, eager on CPU)")
    ap.add_argument("--engine-arg", dest="engine_args", action="append", default=[], metavar="KEY=VALUE",
                    help="vllm backend: any vLLM engine argument, e.g. gpu_memory_utilization=0.85 (repeatable)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = ScoreConfig(**{**vars(args), "rollouts": tuple(args.rollouts), "engine_args": tuple(args.engine_args)})
        index = score(cfg, argv=sys.argv if argv is None else [sys.argv[0], *argv])
    except OpdInputError as e:
        print(f"opd_score: error: {e}", file=sys.stderr)
        return 2
    print(f"opd_score: {index['items']} rollouts, {index['tokens']} tokens, k={index['k']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
