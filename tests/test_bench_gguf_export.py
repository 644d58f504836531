"""tests/bench/gguf_export_vs_llamacpp.py's own arithmetic: per-window KL and top-1 recovered from
llama-perplexity's running means (what the paired intervals are computed from)."""
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "bench"))  # last: tests/bench/ shadows src names

import gguf_export_vs_llamacpp as bench  # noqa: E402

LOG = """chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      12.1234 ±    1.2345       0.01234 ±        nan       0.05000 ±        nan     3.456 ±    nan %    90.000 ±    nan %
   2      12.1234 ±    1.2345       0.01234 ±    0.00100       0.06000 ±    0.00100     3.456 ±  0.123 %    85.000 ±  1.000 %
   3      12.1234 ±    1.2345      -0.01234 ±    0.00100       0.10000 ±    0.00100     3.456 ±  0.123 %    90.000 ±  1.000 %
"""


def test_per_window_values_from_running_means(tmp_path):
    log = tmp_path / "kld.log"
    log.write_text(LOG)
    kl, top = bench.per_window(log)
    assert kl == pytest.approx([0.05, 0.07, 0.18])
    assert top == pytest.approx([0.90, 0.80, 1.00])
