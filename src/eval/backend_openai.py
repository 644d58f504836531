"""The OpenAI-compatible chat backend (llama-server via llamacpp_eval8, `vllm serve`, any such server):
concurrent requests with retries; a prompt the server refuses as too long for its context is an input
error for that sample, not the end of the run."""
from __future__ import annotations

import json
import os
import queue
import random
import threading
import time
import urllib.error
import urllib.request

from backend_base import Backend, Sampling, chat_messages

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
