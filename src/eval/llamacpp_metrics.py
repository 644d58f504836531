"""What a running llama-server reports: its Prometheus counters turned into throughput, and the peak GPU
memory of its process tree (nvidia-smi). Pure parsing plus one sampler thread; llamacpp_server owns the process."""
from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass, field


def parse_prometheus(text: str) -> dict[str, float]:
    """`llamacpp:name value` lines -> {name: value} (labels and comments dropped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or "{" in parts[0]:
            continue
        try:
            out[parts[0].removeprefix("llamacpp:")] = float(parts[1])
        except ValueError:
            continue
    return out


def throughput(metrics: dict[str, float]) -> dict:
    """Prefill and decode tokens/s over everything the server did (its per-slot timings summed)."""
    def rate(n_key, s_key):
        n, s = metrics.get(n_key), metrics.get(s_key)
        return n / s if n and s else None

    return {"prefill_tok_s": rate("prompt_tokens_total", "prompt_seconds_total"),
            "decode_tok_s": rate("tokens_predicted_total", "tokens_predicted_seconds_total"),
            "prompt_tokens": metrics.get("prompt_tokens_total"),
            "predicted_tokens": metrics.get("tokens_predicted_total")}


@dataclass
class VramSampler:
    """Peak GPU memory of one process tree, sampled with nvidia-smi (None when there is no GPU)."""
    pid: int
    interval_s: float = 0.5
    peak_mib: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        if not shutil.which("nvidia-smi"):
            return False
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return "GPU" in out

    def _sample(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        used = [float(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line)
                if p.strip() == str(self.pid) and m.strip().replace(".", "", 1).isdigit()]
        return sum(used) if used else None

    def _loop(self):
        while not self._stop.is_set():
            v = self._sample()
            if v is not None:
                self.peak_mib = max(self.peak_mib or 0.0, v)
            self._stop.wait(self.interval_s)

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="vram-sampler", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
