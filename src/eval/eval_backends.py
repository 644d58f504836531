"""Where generations come from: vLLM in-process, transformers, an OpenAI-compatible server, or a replay.

Every backend takes the same `Sample` objects (same chat messages) and returns the same record per
sample, ``{"output": str, "finish_reason": "stop" | "length" | ..., "tokens": int}``, so prompting,
extraction and grading stay identical whatever produced the text. ``tokens`` counts generated tokens
including the end-of-sequence token (vLLM's convention). Backends also *stream*: ``stream(samples)``
yields ``(index, generation)`` as each sample finishes, which lets the runner log and grade while the
engine keeps generating, and lets a killed run keep everything that had finished.

Sampling is seeded per sample (``results_schema.sample_seed``) wherever the engine allows it (vLLM,
OpenAI servers), so a sample's tokens do not depend on which batch it ran in; that is what makes a
resumed run equal to an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import results_schema

BACKENDS = ("vllm", "hf", "openai", "replay")


@dataclass(frozen=True)
class Sampling:
    """What shapes a generation besides the model: identical across backends by construction."""
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    seed: int = 0
    max_new_tokens: int = 32768
    thinking: bool = True

    def seed_for(self, sample_id: str) -> int:
        return results_schema.sample_seed(self.seed, sample_id)


class Backend:
    """generate(samples) -> [{output, finish_reason, tokens}] in order; stream(samples) as they finish."""

    name = "base"

    def stream(self, samples: Sequence) -> Iterator[tuple[int, dict]]:
        raise NotImplementedError

    def generate(self, samples: Sequence) -> list[dict]:
        out: list[dict | None] = [None] * len(samples)
        for index, generation in self.stream(samples):
            out[index] = generation
        return out  # type: ignore[return-value]

    def identity(self) -> dict:
        """What about this backend changes the generations (goes into the config hash)."""
        return {"backend": self.name}

    def prep_seconds(self) -> float:
        """Time spent rendering prompts inside the backend (harness work, reported as overhead)."""
        return 0.0

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def chat_messages(sample) -> list:
    """The sample's chat as OpenAI-style messages; image parts become base64 image_url parts (vLLM's chat
    API and llama-server --mmproj read those)."""
    import mm_images

    return mm_images.openai_messages(sample) if mm_images.has_images(sample) else list(sample.messages)


# --------------------------------------------------------------------------------------------- vLLM
class VllmBackend(Backend):
    """vllm.LLM in this process; chat template applied by vLLM with enable_thinking in its kwargs."""

    name = "vllm"

    def __init__(self, model: str, sampling: Sampling, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int | None = None, dtype: str = "auto", enforce_eager: bool | None = None,
                 engine_seed: int = 0):
        from vllm import LLM

        self.sampling = sampling
        self.enforce_eager = default_enforce_eager(model) if enforce_eager is None else enforce_eager
        kwargs = dict(model=model, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                      gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=engine_seed,
                      enforce_eager=self.enforce_eager)
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        self.llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})
        self._prep_s = 0.0

    def _params(self, sample):
        from vllm import SamplingParams

        s = self.sampling
        if s.temperature > 0:
            return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                  max_tokens=s.max_new_tokens, seed=s.seed_for(sample.id))
        return SamplingParams(temperature=0.0, max_tokens=s.max_new_tokens)

    def stream(self, samples):
        if not samples:
            return
        t0 = time.perf_counter()
        request_ids, refused = [], {}
        if not any(isinstance(s.meta, dict) and s.meta.get("images") for s in samples):
            request_ids = self._enqueue(samples)
        else:  # image prompts: one at a time, so the one that does not fit max_model_len is refused alone
            for i, sample in enumerate(samples):
                try:
                    request_ids.append(self._enqueue([sample])[0])
                except ValueError as err:
                    request_ids.append(None)
                    refused[i] = str(err)[:300]
        self._prep_s += time.perf_counter() - t0
        for i, reason in refused.items():
            yield i, {"output": "", "finish_reason": "input_error", "tokens": 0,
                      "input_error": f"vLLM refused the prompt: {reason}"}
        samples = [s for i, s in enumerate(samples) if i not in refused]
        positions = [i for i in range(len(request_ids)) if i not in refused]
        request_ids = [r for r in request_ids if r is not None]
        if not request_ids:
            return
        yield from ((positions[i], gen) for i, gen in self._collect(request_ids, len(samples)))

    def _enqueue(self, samples) -> list:
        return self.llm.enqueue_chat([chat_messages(s) for s in samples], [self._params(s) for s in samples],
                                     use_tqdm=False, chat_template_kwargs={"enable_thinking": self.sampling.thinking})

    def _collect(self, request_ids, n_samples):
        # enqueue_chat returns internal ids ("7-ab12cd"); finished outputs carry the external one ("7").
        index_of, internal_of = {}, {}
        for i, rid in enumerate(request_ids):
            index_of[rid] = index_of[rid.split("-", 1)[0]] = i
            internal_of[i] = rid
        engine = self.llm.llm_engine
        try:
            while internal_of and engine.has_unfinished_requests():
                for out in engine.step():
                    if not out.finished:
                        continue
                    if out.request_id not in index_of:
                        raise RuntimeError(f"vLLM returned request id {out.request_id!r} that this run did not "
                                           "enqueue; another caller is using the same LLM object concurrently")
                    index = index_of[out.request_id]
                    internal_of.pop(index, None)
                    completion = out.outputs[0]
                    yield index, {"output": completion.text, "finish_reason": str(completion.finish_reason),
                                  "tokens": len(completion.token_ids)}
            if internal_of:
                raise RuntimeError(f"vLLM engine stopped with {len(internal_of)} of {n_samples} requests unfinished")
        finally:
            if internal_of and self.llm is not None:  # interrupted: leave no orphan requests in a reused engine
                engine.abort_request(list(internal_of.values()), internal=True)

    def identity(self):
        return {"backend": self.name, "enforce_eager": self.enforce_eager}

    def prep_seconds(self):
        return self._prep_s

    def close(self):
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None) or getattr(
                getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm


def default_enforce_eager(model: str) -> bool:
    """Gemma checkpoints get eager mode (CUDA graphs have misbehaved for them); others may compile."""
    return "gemma" in Path(str(model).rstrip("/")).name.lower()


# ----------------------------------------------------------------------------------------------- HF
class HfBackend(Backend):
    """transformers generate, batched with left padding; for CPU and small checks.

    Greedy (temperature 0) is batch-independent up to float noise. With sampling, torch's generator is
    seeded per batch from the batch's sample ids: reproducible for the same batches, but a resumed run
    (different batches) draws different tokens for the samples it still has to do.
    """

    name = "hf"

    def __init__(self, model: str, sampling: Sampling, batch_size: int = 8, dtype: str = "auto",
                 device: str | None = None, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:  # process-wide: on a shared CPU box extra intra-op threads only contend
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.sampling = sampling
        self.batch_size = max(1, int(batch_size))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.dtype = str(torch_dtype).replace("torch.", "")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in eos if e is not None} | {int(self.tokenizer.eos_token_id)}
        self._prep_s = 0.0

    def render(self, sample) -> str:
        return self.tokenizer.apply_chat_template(list(sample.messages), tokenize=False,
                                                  add_generation_prompt=True,
                                                  enable_thinking=self.sampling.thinking)

    def _batch(self, batch) -> list[dict]:
        torch, s = self.torch, self.sampling
        t0 = time.perf_counter()
        enc = self.tokenizer([self.render(x) for x in batch], return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.device)
        self._prep_s += time.perf_counter() - t0
        kwargs = dict(max_new_tokens=s.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      do_sample=s.temperature > 0)
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
            torch.manual_seed(results_schema.sample_seed(s.seed, "\x00".join(x.id for x in batch)))
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        results = []
        for row in new:
            stop_at = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            if stop_at is None:
                kept, reason = row, ("length" if len(row) >= s.max_new_tokens else "stop")
            else:
                kept, reason = row[:stop_at + 1], "stop"
            results.append({"output": self.tokenizer.decode(kept, skip_special_tokens=True),
                            "finish_reason": reason, "tokens": len(kept)})
        return results

    def stream(self, samples):
        for start in range(0, len(samples), self.batch_size):
            for offset, gen in enumerate(self._batch(samples[start:start + self.batch_size])):
                yield start + offset, gen

    def identity(self):
        return {"backend": self.name, "dtype": self.dtype, "batch_size": self.batch_size}

    def prep_seconds(self):
        return self._prep_s


# ------------------------------------------------------------------------------------------- OpenAI
class ServerRefused(RuntimeError):
    """An HTTP error that retrying will not fix (the request itself is refused)."""

    def __init__(self, message: str, code: int, detail: str):
        super().__init__(message)
        self.code, self.detail = code, detail


CONTEXT_WORDS = "context"  # llama-server: "exceeds the available context size"; vLLM: "maximum context length"


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat server (llama-server, `vllm serve`): concurrent requests with retries.

    The server applies the chat template; enable_thinking goes in ``chat_template_kwargs`` (both vLLM and
    llama-server read it). If the server splits reasoning out (``reasoning`` / ``reasoning_content``),
    ``output`` is the final content (what is graded) and the reasoning is kept under ``reasoning``.
    The API key is read from the environment variable named by ``api_key_env`` and never stored.
    """

    name = "openai"
    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, model: str, sampling: Sampling, base_url: str, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 16, timeout_s: float = 3600.0, max_retries: int = 5,
                 backoff_s: float = 2.0):
        self.model, self.sampling = model, sampling
        self.url = base_url.rstrip("/") + "/chat/completions"
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        self.api_key_env = api_key_env
        self.concurrency, self.timeout_s = max(1, int(concurrency)), float(timeout_s)
        self.max_retries, self.backoff_s = int(max_retries), float(backoff_s)

    def request_body(self, sample) -> dict:
        s = self.sampling
        body = {"model": self.model, "messages": chat_messages(sample), "max_tokens": s.max_new_tokens,
                "temperature": s.temperature, "chat_template_kwargs": {"enable_thinking": s.thinking}}
        if s.temperature > 0:
            body.update(top_p=s.top_p, top_k=s.top_k, seed=s.seed_for(sample.id))
        return body

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        last_error = None
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:500]
                if err.code not in self.RETRY_STATUS:
                    raise ServerRefused(f"{self.url} answered HTTP {err.code}: {detail}", err.code, detail) from None
                last_error = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if attempt < self.max_retries:
                time.sleep(min(60.0, self.backoff_s * 2 ** attempt) * (0.5 + random.random()))
        raise RuntimeError(f"{self.url} failed after {self.max_retries + 1} attempts; last error {last_error}; "
                           "is the server up (curl BASE_URL/models)?")

    def _one(self, sample) -> dict:
        try:
            response = self._post(self.request_body(sample))
        except ServerRefused as err:
            if err.code == 400 and CONTEXT_WORDS in err.detail.lower():  # this prompt (its images) does not fit
                return {"output": "", "finish_reason": "input_error", "tokens": 0,
                        "input_error": f"the server refused the prompt: {err.detail[:300]}"}
            raise
        try:
            choice = response["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"{self.url}: response without choices for {sample.id}: {str(response)[:300]}") from None
        message = choice.get("message") or {}
        reasoning = message.get("reasoning") or message.get("reasoning_content")
        usage = response.get("usage") or {}
        gen = {"output": message.get("content") or "", "finish_reason": str(choice.get("finish_reason")),
               "tokens": int(usage.get("completion_tokens") or 0)}
        if reasoning:
            gen["reasoning"] = reasoning
        return gen

    def stream(self, samples):
        """Requests run in daemon threads, so an interrupted run exits without waiting for in-flight
        generations (they may take many minutes); results are yielded in completion order."""
        if not samples:
            return
        todo, done, stop = queue.Queue(), queue.Queue(), threading.Event()
        for i in range(len(samples)):
            todo.put(i)

        def worker():
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, self._one(samples[i]), None))
                except Exception as err:  # handed to the consumer, which raises it
                    done.put((i, None, err))

        for _ in range(min(self.concurrency, len(samples))):
            threading.Thread(target=worker, daemon=True, name="openai-request").start()
        try:
            for _ in range(len(samples)):
                i, generation, err = done.get()
                if err is not None:
                    raise err
                yield i, generation
        finally:
            stop.set()

    def identity(self):
        return {"backend": self.name, "url": self.url}


# ------------------------------------------------------------------------------------------- replay
class ReplayMissing(ValueError):
    """The replay file lacks generations this run asks for (a different --n, benchmark set or data)."""


class ReplayBackend(Backend):
    """Re-grade saved generations (a JSONL of {id, output, finish_reason[, tokens]}) without a model.

    Used after an extractor fix, or to check that two backends grade identically. Lines without an
    ``id`` (the runner's header line) and lines that do not parse (a torn last line) are skipped.
    """

    name = "replay"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"replay file {self.path} does not exist; pass the <tag>.jsonl of an earlier run")
        self.generations: dict[str, dict] = {}
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, Mapping) or "id" not in rec:
                    continue
                if not isinstance(rec.get("output"), str) or not isinstance(rec.get("finish_reason"), str):
                    raise ValueError(f"{self.path}:{n}: record {rec.get('id')!r} lacks a string output/finish_reason")
                gen = {"output": rec["output"], "finish_reason": rec["finish_reason"],
                       "tokens": int(rec.get("tokens") or 0)}
                if rec.get("reasoning") is not None:
                    gen["reasoning"] = rec["reasoning"]
                self.generations[str(rec["id"])] = gen
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def stream(self, samples):
        missing = [s.id for s in samples if s.id not in self.generations]
        if missing:
            raise ReplayMissing(f"replay file {self.path} has no generation for {len(missing)} of {len(samples)} "
                                f"samples (first: {missing[:3]}); replay the same benchmarks/--n/--data-file as "
                                "the original run")
        for i, sample in enumerate(samples):
            yield i, dict(self.generations[sample.id])

    def identity(self):
        return {"backend": self.name, "replay_sha256": self.sha256}


def _wants_images(cfg) -> bool:
    import mm_eval

    return bool(mm_eval.image_benchmarks(cfg.benchmarks))


def make_backend(cfg) -> Backend:
    """Build the backend an EvalConfig names (duck-typed so this module does not import the runner)."""
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
                        max_new_tokens=cfg.resolved_max_new_tokens(), thinking=cfg.thinking)
    if cfg.backend == "vllm":
        return VllmBackend(cfg.model, sampling, tensor_parallel_size=cfg.tensor_parallel_size,
                           max_model_len=cfg.resolved_max_model_len(),
                           gpu_memory_utilization=cfg.gpu_memory_utilization,
                           max_num_seqs=cfg.resolved_max_num_seqs(), dtype=cfg.dtype,
                           enforce_eager=cfg.enforce_eager, engine_seed=cfg.seed)
    if cfg.backend == "hf" and _wants_images(cfg):
        import mm_eval

        return mm_eval.HfVisionBackend(cfg.model, sampling, dtype=cfg.dtype, max_context=cfg.max_model_len)
    if cfg.backend == "hf":
        return HfBackend(cfg.model, sampling, batch_size=cfg.hf_batch_size, dtype=cfg.dtype)
    if cfg.backend == "openai":
        return OpenAIBackend(cfg.served_model_name or cfg.model, sampling, base_url=cfg.base_url,
                             api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                             timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries)
    if cfg.backend == "replay":
        if not cfg.replay_file:
            raise ValueError("--backend replay needs --replay-file PATH (the <tag>.jsonl of an earlier run)")
        return ReplayBackend(cfg.replay_file)
    raise ValueError(f"unknown backend {cfg.backend!r}; choose one of {BACKENDS}")
