"""The calibration pass: activation statistics layer by layer, true-sequential, checkpointed per layer.

For a calibrated method (gptq, awq, wclip) every quantized linear needs H = E[x xᵀ] over the inputs it
sees. They are collected one decoder layer at a time from a weightless skeleton (`layer_io`), so memory
is one layer plus the activations whatever the depth:

1. the calibration windows run through the embedding to the first layer (the model's own forward up to a
   catcher, so masks / positions / rotary embeddings are the family's own);
2. per layer, in two stages (attention, then MLP): hooks accumulate H for the stage's linears, the
   stage's tensors are quantized with it and written back into the layer, so the MLP's statistics
   already see the quantized attention; routed experts get H from exactly the tokens the router sends
   them, with their token count and router-weight mass;
3. the quantized layer's output is the next layer's input (true-sequential: layer i+1 sees layer i's
   quantized output); after the last layer, the final norm's output gives lm_head's H (and a tied
   embedding's).

Experts with few or no tokens get blended statistics (`blend_expert_stats`): below `min_tokens` the
expert's own H is mixed with the layer's pooled H (gate/up: the MoE block's input over every token;
down: the token-weighted mean of the experts' own) in proportion to its token count; an expert with no
tokens gets the pooled H. The rule and every expert's count are recorded.

Each quantized tensor goes straight into its output shard (`shard_writer.InPlaceShards`), once; each finished
layer leaves a marker with its tensors' sha256 and statistics summary, and the activations after it
(`calib_checkpoint`); a killed build resumes after the last finished layer and is byte-identical.

The pieces: `calib_forward` runs a layer with hooks, `calib_accum` holds the statistics, `calib_quant`
quantizes a stage (routed experts as [E, R, K] batches, chunked, over the devices).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import calib_forward
import calib_quant
import layer_io
import store_pack
import weight_quant
from build_plan import TensorPlan
from calib_accum import LinearStats
from calib_checkpoint import LayerCheckpoints
from calib_source import CalibWindows
from ckpt_source import BuildError, Source, load_tensor, tensor_locations
from model_adapters import Recipe, Role

DEFAULT_MIN_TOKENS = 128  # below this an expert's own H is blended with the layer's pooled H
HEAD_ROWS = 1 << 15  # rows of an output head quantized per call when it is larger than HEAD_SPLIT_ELEMENTS
HEAD_SPLIT_ELEMENTS = 1 << 28  # the 122B's lm_head (763M) is split, a 135M model's embedding (28M) is not


@dataclass(frozen=True)
class CalibConfig:
    windows: CalibWindows
    ckpt_dir: Path
    key: dict  # decides reuse of per-layer checkpoints
    device: str = "cpu"
    batch_windows: int = 8
    min_tokens: int = DEFAULT_MIN_TOKENS
    progress: bool = True
    dtype_name: str = "bfloat16"  # forward dtype: the checkpoint's own (and 5x faster than fp32 on AVX512-BF16)
    devices: tuple = ()  # every device (default: (device,)): the forward's batches and the experts' chunks are split over them
    expert_chunk: int = 0  # experts per batched call (0 = auto: 16 on CPU, experts / devices on GPUs; 1 = unbatched)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)


@dataclass
class CalibOutput:
    files: dict = field(default_factory=dict)  # disk tensor name -> the .partial shard file holding it
    stats: dict = field(default_factory=dict)  # disk tensor name -> {method, tokens, proxy, proxy_clip, experts}
    experts: dict = field(default_factory=dict)  # experts module -> {tokens, router_mass, rule, calls}
    resumed_layers: int = 0
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)  # wall seconds per stage (devices synchronized)


def _synchronizer(devices):
    cuda = [d for d in devices if str(d).startswith("cuda")]
    if not cuda:
        return None
    return lambda: [torch.cuda.synchronize(d) for d in cuda]


class _Pass:
    def __init__(self, source: Source, plans: dict, recipe: Recipe, cfg: CalibConfig, store):
        self.source, self.recipe, self.cfg, self.store = source, recipe, cfg, store
        self.planned: dict[str, TensorPlan] = {p.entry.name: p for rows in plans.values() for p in rows if p.quantized}
        self.where = tensor_locations(source)
        self.skel = layer_io.build_skeleton(source.root, source.config)
        self.slot, self.slots_of = layer_io.slot_map(self.where, self.skel)
        self.out = CalibOutput()
        self.ckpt = LayerCheckpoints(cfg.ckpt_dir, cfg.key, store)
        devices = list(cfg.devices or (cfg.device,))
        self.sync = _synchronizer(devices)
        self.ctx = calib_quant.StageContext(self.skel, self.slot, self.planned, self.read, recipe, store, devices,
                                            cfg.min_tokens, cfg.expert_chunk, cfg.expert_chunk != 1, self.sync,
                                            self.out.stage_seconds)

    def read(self, disk_name: str) -> torch.Tensor:
        shard, _ = self.where[disk_name]
        return load_tensor(shard, disk_name)

    def _adopt(self, rec: dict) -> None:
        for name in rec["tensors"]:
            self.out.files[name] = self.store.partial(self.where[name][0])
        self.out.stats.update(rec["stats"])
        self.out.experts.update(rec["experts"])

    def _tick(self, stage: str, t0: float) -> None:
        if self.sync is not None:
            self.sync()
        self.out.stage_seconds[stage] = self.out.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0

    def run(self) -> CalibOutput:
        from tqdm import tqdm

        t0 = time.perf_counter()
        ids, bw = self.cfg.windows.ids, self.cfg.batch_windows
        skel, n_layers = self.skel, len(self.skel.layers)
        self.cfg.ckpt_dir.mkdir(parents=True, exist_ok=True)
        # resume point: the layers whose checkpoints are intact, in order; the activations after the last
        # of them are kept until the next layer's checkpoint exists, so they are always there
        start = 0
        while start < n_layers and self.ckpt.load(f"layer-{start:05d}") is not None:
            start += 1
        if start and not self.ckpt.has_acts(f"layer-{start - 1:05d}"):
            start = 0
        t_in = time.perf_counter()
        x, layer_args, norms = layer_io.first_layer_inputs(skel, ids, bw, self.slots_of, self.read, self.cfg.device,
                                                           self.cfg.dtype)
        self._tick("layer0_inputs", t_in)
        if start:
            x = self.ckpt.load_acts(f"layer-{start - 1:05d}")
            for i in range(start):
                self._adopt(self.ckpt.load(f"layer-{i:05d}"))
            self.out.resumed_layers = start
            print(f"quant_save: calibration resumes after layer {start - 1} ({start}/{n_layers} layers done)",
                  file=sys.stderr)
        bar = tqdm(total=n_layers, initial=start, desc="calibrate", unit="layer", file=sys.stderr,
                   disable=not self.cfg.progress, dynamic_ncols=True)
        try:
            for i in range(start, n_layers):
                self._layer(i, x, [la[i] for la in layer_args])
                bar.update(1)
        finally:
            bar.close()
        t_fin = time.perf_counter()
        self._final(x, norms)
        self._tick("final_head", t_fin)
        self.out.seconds = time.perf_counter() - t0
        return self.out

    def _layer(self, i: int, x: torch.Tensor, layer_args: list) -> None:
        skel, cfg = self.skel, self.cfg
        layer = skel.layers[i]
        prefix = skel.layer_prefix(i)
        names = sorted(n for n in self.planned if n in self.slot and self.slot[n].name.startswith(prefix))
        parts = calib_forward.ATTENTION_PARTS
        stages = [[n for n in names if any(p in n[len(prefix):].split(".") for p in parts)]]
        stages.append([n for n in names if n not in stages[0]])
        devices = self.ctx.devices
        t0 = time.perf_counter()
        layer_io.materialise(skel, layer, self.slots_of, self.read, cfg.device, cfg.dtype)
        self._tick("materialise", t0)
        t0 = time.perf_counter()  # one replica per further device; its batches' arguments there
        replicas = [layer] + [calib_forward.replicate(layer, d) for d in devices[1:]]
        args_of = [layer_args if str(d) == str(cfg.device) else calib_forward.to_device(layer_args, d)
                   for d in devices]
        self._tick("replicate", t0)
        shas, stats, experts = {}, {}, {}
        attn = list(calib_forward.attention_children(layer))
        recorded = None
        for k, stage in enumerate(stages):
            if not stage:
                continue
            t0 = time.perf_counter()
            linear, stage_experts, record = calib_forward.stats_forward(
                replicas, devices, prefix, sorted({self.slot[n].name for n in stage}), x, args_of, cfg.batch_windows,
                cfg.dtype, stop_early=(k == 0), record_children=attn if k == 1 else None)
            self._tick("forward_stats", t0)
            s, st, ex = calib_quant.quantize_stage(self.ctx, stage, linear, stage_experts)
            shas.update(s)
            stats.update(st)
            experts.update(ex)
            del linear, stage_experts
            t0 = time.perf_counter()
            for rep in replicas[1:]:  # the stage's quantized weights, for the next stage and the output pass
                calib_forward.refresh(rep, layer)
            self._tick("replicate", t0)
            recorded = record if k == 1 else recorded
        t0 = time.perf_counter()
        usable = recorded if recorded and all(len(v) == len(layer_args) for v in recorded.values()) else None
        calib_forward.output_forward(replicas, devices, x, args_of, cfg.batch_windows, cfg.dtype, replay=usable)
        self._tick("forward_out", t0)
        del recorded, usable, replicas, args_of
        t0 = time.perf_counter()
        layer_io.release(layer)
        layer_io.return_freed_memory()
        tag = f"layer-{i:05d}"
        self.ckpt.save(tag, shas, stats, experts, x)
        self.ckpt.drop_acts(f"layer-{i - 1:05d}")  # the activations before this layer are no longer needed
        self._adopt({"tensors": shas, "stats": stats, "experts": experts})
        self._tick("checkpoint", t0)

    def _final(self, x: torch.Tensor, norms) -> None:
        """lm_head's H from the final norm's output; a tied embedding is quantized with it."""
        done = self.ckpt.load("final")
        if done is not None or not norms:
            for m in norms:
                layer_io.release(m)
            if done is not None:
                self._adopt(done)
            return
        skel = self.skel
        head_names = [n for n, p in self.planned.items() if p.role.role == Role.LM_HEAD and n not in self.slot
                      or (p.role.role == Role.LM_HEAD and not self.slot[n].name.startswith(skel.layers_prefix))]
        text = self.source.config.get("text_config") or {}
        tied = bool(self.source.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        if not head_names and tied:
            head_names = [n for n, p in self.planned.items() if p.role.role == Role.EMBED]
        acc = LinearStats()
        bw = self.cfg.batch_windows
        if head_names:
            with torch.no_grad():
                for b0 in range(0, x.shape[0], bw):
                    acc.hook(None, (norms[-1](x[b0:b0 + bw].to(self.cfg.device, self.cfg.dtype)),))
        for m in norms:
            layer_io.release(m)
        if not head_names:
            return
        shas, stats = {}, {}
        h = acc.mean()
        for name in head_names:
            res = quantize_head(name, self.read(name), self.planned[name], self.recipe, h, self.cfg.device)
            shas[name] = self.store.write(name, res.dequant)
            self.store.write_entries(name, res.store)
            stats[name] = calib_quant._stat(res, acc.n, None, "H (final norm output)")
            del res
        self.ckpt.save("final", shas, stats, {}, None)
        self._adopt({"tensors": shas, "stats": stats, "experts": {}})


def quantize_head(name, w, plan, recipe, h, device) -> weight_quant.WeightResult:
    """An output head (or tied embedding) quantized under H. A head above HEAD_SPLIT_ELEMENTS goes in blocks of
    HEAD_ROWS rows (GPTQ's rows are independent under one H; the clip guard then decides per block), so its fp32
    working copies are per block: the 122B's [248320, 3072] head would otherwise need ~15 GB of temporaries."""
    if w.numel() <= HEAD_SPLIT_ELEMENTS or w.ndim != 2 or plan.slice_specs is not None or (plan.role.axis % 2) != 1:
        return weight_quant.quantize_weight(name, w.to(device), plan, recipe, hessian=h, compare_clip=True)
    dq = torch.empty_like(w)
    total = weight_quant.WeightResult(dq, 0.0, 0.0, recipe.method, 0.0, 0.0, 0.0, 0.0)
    blocks = []
    for r0 in range(0, w.shape[0], HEAD_ROWS):
        part = weight_quant.quantize_weight(name, w[r0:r0 + HEAD_ROWS].to(device), plan, recipe, hessian=h,
                                            compare_clip=True)
        dq[r0:r0 + HEAD_ROWS] = part.dequant.to(dq.device)
        blocks.append(part.store[name])
        total.method = part.method
        for k in ("sq_err", "sq_ref", "proxy", "proxy_clip", "proxy_diag", "proxy_diag_clip"):
            setattr(total, k, getattr(total, k) + (getattr(part, k) or 0.0))
        del part
    try:
        total.store = {name: store_pack.concat_rows(name, blocks)}
    except ValueError as e:
        raise BuildError(str(e)) from None
    return total


def run_calibration(source: Source, plans: dict, recipe: Recipe, cfg: CalibConfig, store) -> CalibOutput:
    """Quantize every tensor a decoder layer (or the head) owns with its activation statistics; each is written
    once, in place, through `store` (shard_writer.InPlaceShards)."""
    return _Pass(source, plans, recipe, cfg, store).run()
