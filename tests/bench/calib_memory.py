"""Peak RSS and wall time of a calibrated (gptq) build at two depths of the same tiny MoE: memory must be flat
in depth (one layer + the activations), time linear in it. Each build runs quant_save's CLI entry point in its
own process; the child reports its VmHWM (the kernel's peak RSS of this process image) and, sampled every 50 ms,
the peaks of anonymous and file-backed RSS. Not ru_maxrss: Linux carries the forking parent's peak into an
exec'd child's ru_maxrss, and the parent here holds the source it just built (1.1 GB at 16 layers).

`--default-caches` gives oneDNN's and ideep's shape-keyed caches their stock sizes (1024 entries) instead of
the limits quant_save sets (layer_io.CPU_SHAPE_CACHE_LIMITS), to show what those limits buy.

    python tests/bench/calib_memory.py [--layers 4,16] [--hidden 512] [--tokens 8192] [--default-caches]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_paths import use_project_modules

ROOT = use_project_modules()
CHILD = r"""
import json, resource, sys, threading, time
from pathlib import Path
import ptq_meta
import quant_save

def rss_kib():
    fields = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile", "VmHWM")))
    return {k: int(v.split()[0]) for k, v in fields.items()}

peak = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()

def sample():
    while not done.wait(0.05):
        now = rss_kib()
        for k in peak:
            peak[k] = max(peak[k], now[k])

threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
rc = quant_save.main(["--model", sys.argv[1], "--out", sys.argv[2], "--no-progress", "--method", "gptq",
                      "--calib", "pydoc-topics", "--calib-tokens", sys.argv[3], "--calib-ctx", "256"])
done.set()
meta = json.loads((Path(sys.argv[2]) / ptq_meta.META_NAME).read_text()) if rc == 0 else None
if meta is None:
    sys.exit(rc or 1)
print("RESULT " + json.dumps({"wall_s": time.perf_counter() - t, "peak_rss_MiB": rss_kib()["VmHWM"] / 1024,
    "ru_maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_anon_MiB": peak["RssAnon"] / 1024,
    "peak_file_MiB": peak["RssFile"] / 1024, "calibration_s": meta["timings"]["calibration_seconds"],
    "source_MiB": meta["source"]["bytes"] / 2**20}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,16")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--default-caches", action="store_true",
                    help="stock oneDNN/ideep cache sizes (1024) instead of quant_save's limits")
    args = ap.parse_args(argv)
    import tiny_models

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / "src" / d) for d in ("quant", "eval", "distill"))}
    if args.default_caches:
        env.update({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.layers.split(",")):
            src = tiny_models.build_tiny_checkpoint(
                "qwen3_moe", Path(tmp) / f"src{n}", byte_tokenizer=True, num_hidden_layers=n,
                hidden_size=args.hidden, head_dim=64, num_attention_heads=8, num_key_value_heads=4,
                num_experts=args.experts, moe_intermediate_size=args.hidden, max_shard_size="20MB")
            proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / f"out{n}"), str(args.tokens)],
                                  env=env, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            r = {"layers": n, **json.loads(line[len("RESULT "):])}
            rows.append(r)
            print(f"layers {n:>3}: source {r['source_MiB']:8.1f} MiB  peak RSS {r['peak_rss_MiB']:8.1f} MiB  "
                  f"(anon {r['peak_anon_MiB']:7.1f}, file-backed {r['peak_file_MiB']:7.1f}, sampled every 50 ms)  "
                  f"wall {r['wall_s']:6.1f} s  (calibration {r['calibration_s']:.1f} s)")
    a, b = rows[0], rows[-1]
    print(f"depth x{b['layers'] / a['layers']:.1f}: source x{b['source_MiB'] / a['source_MiB']:.2f}, peak RSS "
          f"x{b['peak_rss_MiB'] / a['peak_rss_MiB']:.2f} (+{b['peak_rss_MiB'] - a['peak_rss_MiB']:.0f} MiB), "
          f"wall x{b['wall_s'] / a['wall_s']:.2f}")
    # issue 8's bound: one layer (the source bytes each extra layer adds, bf16) + the activations (bf16
    # [tokens, hidden]) + 1 GiB
    layer_mib = (b["source_MiB"] - a["source_MiB"]) / max(b["layers"] - a["layers"], 1)
    acts_mib = args.tokens * args.hidden * 2 / 2**20
    bound = layer_mib + acts_mib + 1024
    worst = max(r["peak_rss_MiB"] for r in rows)
    print(f"bound: one layer {layer_mib:.1f} MiB + activations {acts_mib:.1f} MiB + 1024 MiB = {bound:.0f} MiB; "
          f"worst peak RSS {worst:.0f} MiB -> {'within' if worst <= bound else 'OVER'} the bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
