"""Sizing: disk, host RAM, memory per GPU and time of each stage, from the checkpoint's headers and a cost table.

A 245 GB build that dies of a full disk after four hours, or an eval that OOMs at load, costs more than
the arithmetic that predicts it. Everything here is pure (shapes, a recipe, a device description and a
`CostTable` in; `Stage` rows out), so the table `--dry-run` prints is the same model the real run checks
before it reads a weight (`preflight`, which refuses in one line naming the number).

Work per layer, counted from the tensors (per-expert 2-D tensors and fused [E, R, K] alike):
* GPTQ on an [R, K] matrix: K^3 (Cholesky + triangular solve of H) + 2 R K^2 (column updates) flops;
* Hessians: 2 K^2 flops per token seen per distinct input (routed experts see tokens * top_k / E);
* calibration forward: 2 flops per active parameter per token, twice (teacher input, quantized output);
* clip / rtn rounding: seconds per 1e9 parameters (the 16-step grid search);
* disk: bytes / GB/s.
Rates come from a `CostTable`: `cpu` is measured here by tests/bench/sizing_costs.py (results/sizing/
cost_model_cpu.json); `h100` states datasheet rates times assumed efficiencies until tests/bench/gpu_check.sh
has measured them (`--costs FILE` takes either JSON).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

GB = 10**9
ROOT = Path(__file__).resolve().parents[2]
CPU_COSTS_JSON = ROOT / "results" / "sizing" / "cost_model_cpu.json"
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


class SizingError(RuntimeError):
    """A run that would not fit: one line naming the number and the fix."""


@dataclass(frozen=True)
class CostTable:
    """Per-operation rates of one machine; `source` says where each number comes from."""

    name: str
    source: str
    clip_s_per_gparam: float = 60.0  # the 16-step clip search, seconds per 1e9 weights (one device)
    gptq_gflops: float = 20.0  # effective GPTQ rate (flop model in the module docstring)
    hessian_gflops: float = 50.0  # fp32 x^T x
    forward_gflops: float = 100.0  # bf16 calibration forward
    read_gbps: float = 1.0  # checkpoint read
    write_gbps: float = 1.0
    download_gbps: float = 0.25  # hub download (not measured anywhere: an assumption)
    clip_ram_factor: float = 6.0  # peak RSS growth / largest tensor's bytes on the streaming path
    gptq_column_s: float = 0.0  # fixed cost per GPTQ column step per call (kernel launches; ~0 for the CPU kernel)
    gpu_mem_bytes: int = 0  # per device; 0 = CPU
    gen_tokens_per_s: float = 0.0  # aggregate decode throughput of the eval engine (0 = unknown)


H100 = CostTable(
    name="h100", gpu_mem_bytes=80 * 2**30,
    source=("ASSUMED, not measured (no GPU has run this project): H100 SXM datasheet rates times an efficiency: "
            "fp32 67 TFLOP/s x 0.3 for GPTQ (batched Cholesky + column loop), x 0.5 for Hessian matmuls; bf16 "
            "989 TFLOP/s x 0.2 for the calibration forward; clip search 16 passes over the weights at 3.35 TB/s "
            "x 0.3 (~60 GB/s of bf16 weights = 30 Gparam/s); NVMe 2 GB/s read and write; hub 0.25 GB/s; vLLM "
            "decode 2500 tok/s aggregate for a 10B-active MoE at TP 4; 100 us of kernel launches per GPTQ column step "
            "and call. tests/bench/gpu_check.sh measures the clip and GPTQ rates."),
    clip_s_per_gparam=1 / 30, gptq_gflops=20_000, gptq_column_s=100e-6, hessian_gflops=33_000, forward_gflops=200_000,
    read_gbps=2.0, write_gbps=2.0, download_gbps=0.25, clip_ram_factor=1.5, gen_tokens_per_s=2500.0)


def load_costs(name_or_path: str | None) -> CostTable:
    """'cpu' (the measured JSON), 'h100' (assumed), or a JSON file with CostTable fields (+ 'source')."""
    if name_or_path in (None, "", "cpu"):
        path = CPU_COSTS_JSON
        if not path.is_file():
            return CostTable("cpu", "DEFAULTS (run python tests/bench/sizing_costs.py to measure this machine)")
    elif name_or_path == "h100":
        return H100
    else:
        path = Path(name_or_path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SizingError(f"--costs {path}: unreadable cost table ({e})") from None
    known = {f for f in CostTable.__dataclass_fields__}
    values = {k: v for k, v in {**doc, **(doc.get("costs") or {})}.items() if k in known}
    values.setdefault("name", path.stem)
    values["source"] = f"{values.get('source', '')} [{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}]"
    return CostTable(**values)


# ----------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class Devices:
    kind: str  # "cpu" | "gpu"
    count: int = 1
    mem_bytes: int = 0  # per GPU
    label: str = "cpu"

    @classmethod
    def parse(cls, text: str) -> "Devices":
        """'cpu', '4xH100', '8xH200', 'Nxgpu:80' (N GPUs of 80 GiB)."""
        m = re.fullmatch(r"(\d+)x(H100|H200|gpu:(\d+))", text.strip(), re.I)
        if text.strip().lower() == "cpu":
            return cls("cpu")
        if not m:
            raise SizingError(f"--size-for {text!r}: expected cpu, NxH100, NxH200 or Nxgpu:GiB")
        gib = {"H100": 80, "H200": 141}.get(m.group(2).upper()) or int(m.group(3))
        return cls("gpu", int(m.group(1)), gib * 2**30, text)


def visible_devices(device: str = "cuda") -> Devices:
    """What this process can use: every visible GPU (or cuda:N), else the CPU."""
    if device == "cpu":
        return Devices("cpu")
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        n = 0
    if n == 0:
        return Devices("cpu", label="cpu (no GPU visible)")
    mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(n))
    count = 1 if re.fullmatch(r"cuda:\d+", device) else n
    return Devices("gpu", count, mem, f"{count}x{torch.cuda.get_device_name(0)}")


# ------------------------------------------------------------------------------------------- shapes
@dataclass
class LayerWork:
    """Bytes and flops of one decoder layer (or of the layer-less tensors: embed, lm_head, vision)."""

    bytes: int = 0
    quant_params: int = 0
    gptq_flops: float = 0.0
    hessian_flops: float = 0.0
    forward_flops: float = 0.0
    hessian_bytes: int = 0  # fp32 Hessians of the non-routed linears held at once (one per distinct input)
    expert_h_bytes: int = 0  # fp32 H of ONE routed expert (its distinct inputs: gate/up's and down's)
    expert_rk: int = 0  # the largest routed matrix, R x K elements (a chunk holds ~6 fp32 copies of it)
    routed_rows_bytes: float = 0.0  # the rows the router sends the experts, kept until H is formed per chunk
    largest_bytes: int = 0
    columns_per_tensor: int = 0  # GPTQ column steps when every tensor is its own call (per-expert 2-D: B=1)
    columns_batched: int = 0  # ... when a layer's experts of one projection are one [E, R, K] call


@dataclass
class ModelWork:
    layers: dict = field(default_factory=dict)  # key -> LayerWork (key: layer index or "other")
    source_bytes: int = 0
    params: int = 0
    largest_bytes: int = 0
    n_experts: int = 0


def model_work(tensors, tokens: int, top_k: int, n_experts: int) -> ModelWork:
    """tensors: (name, shape, bytes, quantized, axis, routed) per tensor. Pure."""
    work = ModelWork(n_experts=n_experts)
    seen_routed: set = set()
    seen_inputs: set = set()
    seen_kinds: set = set()
    share = top_k / n_experts if n_experts else 1.0
    for name, shape, nbytes, quantized, axis, routed in tensors:
        m = LAYER.search(name)
        key = (("mtp." if name.startswith("mtp.") else "") + m.group(1)) if m else "other"
        lw = work.layers.setdefault(key, LayerWork())
        numel = math.prod(shape)
        lw.bytes += nbytes
        lw.largest_bytes = max(lw.largest_bytes, nbytes)
        work.source_bytes += nbytes
        work.params += numel
        work.largest_bytes = max(work.largest_bytes, nbytes)
        seen = tokens * (share if routed else 1.0)
        if key != "other":
            lw.forward_flops += 2 * 2 * seen * numel
        if not quantized or len(shape) < 2:
            continue
        k = shape[axis]
        mats = numel // (k * shape[-2 if axis in (-1, len(shape) - 1) else -1])
        r = numel // (k * mats)
        lw.quant_params += numel
        lw.gptq_flops += mats * 2 * r * k * k
        lw.columns_per_tensor += k
        kind = (key, EXPERT_INDEX.sub(".experts.*.", name), k)
        if kind not in seen_kinds:
            seen_kinds.add(kind)
            lw.columns_batched += k
        input_key = (key, name.rsplit(".", 2)[0], k, mats)  # gate/up, q/k/v share one input, one H, one Cholesky
        if input_key not in seen_inputs:
            seen_inputs.add(input_key)
            lw.gptq_flops += mats * k**3
            lw.hessian_flops += 2 * k * k * seen * (mats if routed and mats > 1 else 1)
            if not routed:
                lw.hessian_bytes += 4 * k * k * mats
        if routed:  # H is formed a chunk of experts at a time (calib_quant), from rows kept per expert
            lw.expert_rk = max(lw.expert_rk, r * k)
            routed_key = (key, k)
            if routed_key not in seen_routed:
                seen_routed.add(routed_key)
                lw.expert_h_bytes += 4 * k * k
                lw.routed_rows_bytes += tokens * top_k * k * 4
    return work


# ------------------------------------------------------------------------------------------- stages
CPU_EXPERT_CHUNK = 16  # calib_quant's auto chunk on CPU (experts per H chunk and per batched call)


def expert_chunk(n_experts: int, dev: "Devices") -> int:
    """Experts whose H is held at once per device: 16 on CPU, experts / GPUs on GPUs (calib_quant's auto)."""
    if not n_experts:
        return 0
    return min(n_experts, CPU_EXPERT_CHUNK) if dev.kind == "cpu" else -(-n_experts // max(dev.count, 1))


@dataclass(frozen=True)
class Stage:
    name: str
    disk_read: float = 0.0  # bytes
    disk_write: float = 0.0  # bytes (peak on disk at the end of the stage)
    host_ram: float = 0.0  # bytes, peak
    gpu_mem: float = 0.0  # bytes, peak per GPU
    seconds: float = 0.0
    basis: str = ""  # the per-layer figure (or assumption) the time rests on


def quantize_stages(work: ModelWork, out_bytes: int, calibrated: bool, tokens: int, hidden: int,
                    dev: Devices, costs: CostTable, downloading: bool = False, batched: bool = False,
                    transient_bytes: int = 0) -> list[Stage]:
    """The build's stages: [download], calibration (when calibrated), rounding + write. `transient_bytes`: disk
    held on top of the output until the build ends (a calibrated build's per-layer progress files)."""
    n = dev.count if dev.kind == "gpu" else 1
    stages = []
    if downloading:
        stages.append(Stage("download (hub cache)", disk_write=work.source_bytes,
                            seconds=work.source_bytes / GB / costs.download_gbps,
                            basis=f"{costs.download_gbps:g} GB/s"))
    layers = [lw for k, lw in work.layers.items() if k != "other" and lw.quant_params]
    params = sum(lw.quant_params for lw in work.layers.values())
    clip_s = params / 1e9 * costs.clip_s_per_gparam / n
    read_s = work.source_bytes / GB / costs.read_gbps
    write_s = out_bytes / GB / costs.write_gbps
    if calibrated:
        big = max(layers, key=lambda lw: lw.bytes) if layers else LayerWork()
        def layer_s(lw: LayerWork, batch: bool) -> float:  # unbatched = today's code: one call per tensor, devices[0]
            return ((lw.gptq_flops / costs.gptq_gflops + lw.hessian_flops / costs.hessian_gflops
                     + lw.forward_flops / costs.forward_gflops) / 1e9
                    + (lw.columns_batched if batch else lw.columns_per_tensor) * costs.gptq_column_s) / (n if batch else 1)
        per_layer = [layer_s(lw, batched) for lw in layers]
        other = max((layer_s(lw, not batched) for lw in layers), default=0)
        acts = tokens * hidden * 4 * 3  # layer input, output and the quantized stream, fp32
        chunk = expert_chunk(work.n_experts, dev)
        # per chunk of C experts: ~4 fp32 copies of their H (sums/blended, damped, Cholesky factor, inverse) and
        # ~6 of the largest matrix (weights, error-updated, dequant, clip's candidate, the guard's products)
        chunk_mem = chunk * (4 * big.expert_h_bytes + 6 * 4 * big.expert_rk)
        # the layer in the skeleton + the shards' pages it was read from; the non-routed H; the routed rows
        work_mem = big.bytes + big.hessian_bytes + chunk_mem + big.routed_rows_bytes
        host = big.bytes + acts + (work_mem if dev.kind == "cpu" else 0)
        # a GPU holds its replica of the layer and its chunk; the first also the routed rows (reduced onto it)
        gpu = (big.bytes + big.hessian_bytes + chunk_mem + big.routed_rows_bytes + acts / n) if dev.kind == "gpu" else 0
        worst = max(per_layer, default=0.0)
        stages.append(Stage("calibrate + gptq (per layer)", disk_read=work.source_bytes,
                            disk_write=out_bytes + transient_bytes,
                            host_ram=host, gpu_mem=gpu, seconds=sum(per_layer) + read_s + write_s,
                            basis=(f"{worst:.2f} s/layer compute (GPTQ {big.gptq_flops / 1e12:.1f} TFLOP @ "
                                   f"{costs.gptq_gflops:g} GFLOP/s, Hessians {big.hessian_flops / 1e12:.1f} TFLOP, "
                                   f"{tokens} tokens, {'batched' if batched else 'one call per tensor'}; "
                                   f"{'unbatched' if batched else 'batched'}: {other:.2f} s/layer) x {len(layers)} "
                                   f"layers over {n if batched else 1} device(s); + disk"
                                   + (f"; disk incl. {transient_bytes / GB:.0f} GB of progress files" if transient_bytes
                                      else ""))))
        return stages
    host = work.largest_bytes * costs.clip_ram_factor
    gpu = work.largest_bytes * costs.clip_ram_factor if dev.kind == "gpu" else 0
    stages.append(Stage("round (clip/rtn) + write", disk_read=work.source_bytes, disk_write=out_bytes,
                        host_ram=host, gpu_mem=gpu, seconds=max(clip_s, read_s, write_s),
                        basis=(f"{costs.clip_s_per_gparam:.3g} s per 1e9 weights over {n} device(s) = {clip_s:.0f} s; "
                               f"read {read_s:.0f} s, write {write_s:.0f} s (overlapped)")))
    return stages


def pack_stages(source_bytes: float, params: int, gguf_bits: float, dev: Devices, costs: CostTable,
                imatrix_tokens: int = 0, active_params: int | None = None) -> list[Stage]:
    """convert -> BF16 GGUF, imatrix (GPU when offloaded), quantize -> low-bit GGUF."""
    low = params * gguf_bits / 8
    n = dev.count if dev.kind == "gpu" else 1
    out = [Stage("convert -> BF16 GGUF", disk_read=source_bytes, disk_write=source_bytes,
                 host_ram=2 * GB, seconds=source_bytes / GB / min(costs.read_gbps, costs.write_gbps),
                 basis=f"disk-bound at {min(costs.read_gbps, costs.write_gbps):g} GB/s (lazy tensors)")]
    if imatrix_tokens:
        out.append(Stage("llama-imatrix", disk_read=source_bytes, host_ram=source_bytes if dev.kind == "cpu" else 4 * GB,
                         gpu_mem=source_bytes / n * 1.05 if dev.kind == "gpu" else 0,
                         seconds=(source_bytes / GB / costs.read_gbps
                                  + 2 * (active_params or params) * imatrix_tokens / 1e9 / costs.forward_gflops / n),
                         basis=f"{imatrix_tokens} tokens x {(active_params or params) / 1e9:.1f}B active weights"))
    out.append(Stage("llama-quantize -> low-bit GGUF", disk_read=source_bytes, disk_write=low, host_ram=2 * GB,
                     seconds=params / 1e9 * costs.clip_s_per_gparam * 2 + source_bytes / GB / costs.read_gbps,
                     basis=f"{gguf_bits:.2f} bits/weight; CPU rounding ~2x the clip search per weight (assumed)"))
    return out


def eval_stages(weight_bytes: float, tp: int, mem_util: float, dev: Devices, costs: CostTable,
                gen_tokens: int) -> list[Stage]:
    """vLLM: the weights split over TP GPUs, KV cache in what gpu_memory_utilization leaves."""
    per_gpu = weight_bytes / max(tp, 1)
    rate = costs.gen_tokens_per_s
    return [Stage("vLLM load + generate", disk_read=weight_bytes, host_ram=8 * GB,
                  gpu_mem=per_gpu + 2 * GB if dev.kind == "gpu" else 0,
                  seconds=weight_bytes / GB / costs.read_gbps + (gen_tokens / rate if rate else 0),
                  basis=(f"weights/TP = {per_gpu / GB:.1f} GB per GPU of {mem_util:g} x memory; <= {gen_tokens:,} "
                         f"new tokens at {rate:g} tok/s" if rate else "generation time: no measured throughput"))]


def distill_stages(weight_bytes: float, active_params: int, dev: Devices, costs: CostTable,
                   train_tokens: int) -> list[Stage]:
    """OPD: student rollouts (vLLM), teacher top-k, FSDP2 LoRA over all GPUs (bf16 weights sharded)."""
    n = dev.count if dev.kind == "gpu" else 1
    shard = weight_bytes / n
    flops = 6 * active_params * train_tokens  # forward + backward through the weights a token uses
    return [Stage("FSDP2 LoRA step(s)", disk_read=weight_bytes, disk_write=weight_bytes, host_ram=shard + 8 * GB,
                  gpu_mem=shard + 4 * GB if dev.kind == "gpu" else 0,
                  seconds=flops / 1e9 / costs.forward_gflops / n + weight_bytes / GB / costs.read_gbps,
                  basis=f"6 x {active_params / 1e9:.1f}B active x {train_tokens} tokens; weights sharded {n} ways")]


# ----------------------------------------------------------------------------------------- checks
def _fmt(b: float) -> str:
    return "-" if not b else f"{b / GB:,.1f} GB"


def _dur(s: float) -> str:
    return "-" if not s else (f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def format_stages(stages: list[Stage], dev: Devices, costs: CostTable) -> str:
    lines = [f"sizing for {dev.label} ({dev.count} GPU(s) of {dev.mem_bytes / 2**30:.0f} GiB)" if dev.kind == "gpu"
             else f"sizing for {dev.label}",
             f"{'stage':<32}{'disk read':>12}{'disk write':>12}{'host RAM':>11}{'GPU mem/dev':>13}{'time':>10}  basis"]
    for s in stages:
        lines.append(f"{s.name:<32}{_fmt(s.disk_read):>12}{_fmt(s.disk_write):>12}{_fmt(s.host_ram):>11}"
                     f"{_fmt(s.gpu_mem):>13}{_dur(s.seconds):>10}  {s.basis}")
    total = sum(s.seconds for s in stages)
    lines.append(f"{'TOTAL':<32}{'':>12}{_fmt(sum(s.disk_write for s in stages)):>12}"
                 f"{_fmt(max((s.host_ram for s in stages), default=0)):>11}"
                 f"{_fmt(max((s.gpu_mem for s in stages), default=0)):>13}{_dur(total):>10}")
    lines.append(f"costs: {costs.name}: {costs.source}")
    return "\n".join(lines)


def check_fit(stages: list[Stage], disk_free: float, ram_free: float, dev: Devices, what: str,
              existing: float = 0.0) -> None:
    """Refuse in one line when the disk, host RAM or a GPU is short. `existing`: bytes already written
    (a resumed build needs only the rest)."""
    need_disk = sum(s.disk_write for s in stages) - existing
    if need_disk > disk_free:
        raise SizingError(f"{what} needs {need_disk / GB:,.1f} GB of disk but {disk_free / GB:,.1f} GB are free "
                          f"(or allowed by --max-disk); free space or point OUT elsewhere")
    need_ram = max((s.host_ram for s in stages), default=0)
    if ram_free and need_ram > ram_free:
        raise SizingError(f"{what} needs {need_ram / GB:,.1f} GB of host RAM at peak but {ram_free / GB:,.1f} GB "
                          f"are available")
    need_gpu = max((s.gpu_mem for s in stages), default=0)
    if dev.kind == "gpu" and dev.mem_bytes and need_gpu > dev.mem_bytes:
        raise SizingError(f"{what} needs {need_gpu / GB:,.1f} GB per GPU but each has {dev.mem_bytes / GB:,.1f} GB; "
                          f"use more GPUs or a smaller chunk")


def free_disk(path: Path, max_disk: float | None = None) -> float:
    """Free bytes where `path` will be written (its nearest existing parent), capped by --max-disk."""
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    return min(free, max_disk) if max_disk is not None else free


def available_ram() -> float:
    """MemAvailable from /proc/meminfo (0 = unknown: no check)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def parse_bytes(text: str) -> float:
    """'500G', '1.5T', '800GB', '12345' (bytes) -> bytes (decimal units)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)B?\s*", str(text), re.I)
    if not m:
        raise SizingError(f"--max-disk {text!r}: expected a size like 500G or 1.2T")
    return float(m.group(1)) * 1000 ** "_KMGT".index(m.group(2).upper() or "_")


def with_gpu_memory(costs: CostTable, dev: Devices) -> Devices:
    return replace(dev, mem_bytes=dev.mem_bytes or costs.gpu_mem_bytes)
