"""What every generation backend shares: the sampling settings, the Backend interface, and the chat
messages an engine is sent (image parts as base64 image_url), so the backend_* modules share it
without importing each other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import results_schema

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
