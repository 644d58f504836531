"""End-to-end builder throughput and peak memory on synthetic MoE checkpoints of two sizes.

For each size it writes a qwen3_moe-named checkpoint (fused 3-D experts, several shards), then runs, each
in a fresh subprocess so peak RSS is the child's own:
  * a plain copy: read every tensor with safetensors and write it back (the builder's I/O, no math);
  * the builder (quant_save, int3 experts / int4 linears, g128, 16-step clip search).
It prints MB/s, the builder/copy time ratio, and the builder's peak RSS against the issue's bound
(2 x largest tensor + 1 GiB), which must stay flat as the model grows.

    python tests/bench/bench_builder.py [--sizes 4,12 --experts 16 --hidden 1024 --inter 768 --workdir DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COPY_SNIPPET = r"""
import sys, json
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for shard in sorted(src.glob("*.safetensors")):
    out = {}
    with safe_open(str(shard), "pt") as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
    save_file(out, str(dst / shard.name), metadata={"format": "pt"})
    del out
"""


def write_synthetic_moe(root: Path, layers: int, experts: int, hidden: int, inter: int, vocab: int = 8192) -> int:
    """A qwen3_moe-style checkpoint, one shard per layer; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, largest = {}, 0
    for i in range(layers + 1):
        p = f"model.layers.{i}."
        tensors = {}
        if i < layers:
            tensors.update({
                p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(hidden // 4, hidden),
                p + "self_attn.v_proj.weight": w(hidden // 4, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "mlp.gate.weight": w(experts, hidden),
                p + "mlp.experts.gate_up_proj": w(experts, 2 * inter, hidden),
                p + "mlp.experts.down_proj": w(experts, hidden, inter),
            })
            name = f"model-{i:05d}.safetensors"
        else:
            tensors.update({"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
                            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
            name = "model-embed.safetensors"
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            largest = max(largest, t.numel() * t.element_size())
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": hidden,
              "moe_intermediate_size": inter, "intermediate_size": inter, "num_experts": experts,
              "num_experts_per_tok": 2, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": hidden // 8, "vocab_size": vocab, "torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(config))
    return largest


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one child process (os.wait4 gives that child's own rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,12", help="layer counts of the synthetic models (ascending)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_builder_"))
    here = Path(__file__).resolve().parents[2]
    env_py = sys.executable
    try:
        for layers in [int(x) for x in args.sizes.split(",")]:
            src = work / f"moe_{layers}L"
            largest = write_synthetic_moe(src, layers, args.experts, args.hidden, args.inter)
            mb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e6
            copy_wall, copy_rss = run_child([env_py, "-c", COPY_SNIPPET, str(src), str(work / "copy")])
            build_wall, build_rss = run_child([env_py, str(here / "src/quant/quant_save.py"), "--model", str(src),
                                               "--out", str(work / "built"), "--no-progress"])
            bound = 2 * largest / 2**30 + 1.0
            print(f"{layers:3d} layers, {mb:7.0f} MB, largest tensor {largest / 1e6:.0f} MB | "
                  f"copy {mb / copy_wall:6.1f} MB/s | builder {mb / build_wall:6.1f} MB/s | "
                  f"ratio {build_wall / copy_wall:5.2f}x | builder peak RSS {build_rss:.2f} GiB "
                  f"(bound {bound:.2f} GiB) | load avg {os.getloadavg()[0]:.1f}")
            shutil.rmtree(work / "copy", ignore_errors=True)
            shutil.rmtree(work / "built", ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
