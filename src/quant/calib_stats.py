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

Each finished layer leaves its quantized tensors, its statistics summary and the activations after it in
the checkpoint dir; a killed build resumes after the last finished layer and is byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import atomic_io
import layer_io
from calib_accum import ExpertStats, LinearStats, _StageDone, blend_expert_stats
import store_pack
import weight_quant
from build_plan import TensorPlan
from calib_source import CalibWindows
from ckpt_source import Source, load_tensor, tensor_locations
from model_adapters import Recipe, Role

ATTENTION_PARTS = ("self_attn", "linear_attn", "attn", "attention", "cross_attn")
DEFAULT_MIN_TOKENS = 128  # below this an expert's own H is blended with the layer's pooled H


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

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)


@dataclass
class CalibOutput:
    files: dict = field(default_factory=dict)  # disk tensor name -> safetensors file with its quantized copy
    stats: dict = field(default_factory=dict)  # disk tensor name -> {method, tokens, proxy, proxy_clip, experts}
    experts: dict = field(default_factory=dict)  # experts module -> {tokens, router_mass, rule}
    resumed_layers: int = 0
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)  # wall seconds per stage of the pass (for the bench)


def _detached_copy(out):
    """A module output (tensor, or tuple/list of tensors and None) copied, so later in-place ops cannot
    change what was recorded."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_detached_copy(o) for o in out)
    return out


class _Replay:
    """While installed, `module` returns outs[batch[0]] instead of running (see _Pass._forward)."""

    def __init__(self, module: nn.Module, outs: list, batch: list):
        self.module = module
        module.forward = lambda *args, **kwargs: outs[batch[0]]

    def remove(self) -> None:
        del self.module.forward  # back to the class's forward


# ------------------------------------------------------------------------------------------ pass
class _Pass:
    def __init__(self, source: Source, plans: dict, recipe: Recipe, cfg: CalibConfig):
        self.source, self.recipe, self.cfg = source, recipe, cfg
        self.planned: dict[str, TensorPlan] = {p.entry.name: p for rows in plans.values() for p in rows if p.quantized}
        self.where = tensor_locations(source)
        self.skel = layer_io.build_skeleton(source.root, source.config)
        self.slot: dict[str, layer_io.Slot] = {}
        self.slots_of: dict[str, list] = {}
        for name in self.where:
            s = layer_io.memory_slot(name, self.skel.params)
            if s is not None:
                self.slot[name] = s
                self.slots_of.setdefault(s.name, []).append((name, s))
        for pieces in self.slots_of.values():
            pieces.sort(key=lambda x: (x[1].expert or 0, x[1].part or ""))
        self.out = CalibOutput()

    def read(self, disk_name: str) -> torch.Tensor:
        shard, _ = self.where[disk_name]
        return load_tensor(shard, disk_name)

    # --- checkpoints
    def _paths(self, tag: str):
        d = self.cfg.ckpt_dir
        return d / f"{tag}.safetensors", d / f"{tag}.json", d / f"acts-{tag}.safetensors"

    def _load_done(self, tag: str):
        tensors, marker, _ = self._paths(tag)
        if not (marker.is_file() and tensors.is_file()):
            return None
        try:
            rec = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        if rec.get("key") != self.cfg.key:
            return None
        from provenance import sha256_file

        if sha256_file(tensors) != rec.get("tensors_sha256"):
            return None
        return rec

    def _save(self, tag: str, tensors: dict, stats: dict, experts: dict, acts: torch.Tensor | None) -> None:
        from safetensors.torch import save

        tpath, marker, apath = self._paths(tag)
        data = save({k: v.contiguous() for k, v in tensors.items()}) if tensors else save({"_empty": torch.zeros(1)})
        atomic_io.write_bytes(tpath, data)
        if acts is not None:
            atomic_io.write_bytes(apath, save({"x": acts.detach().to("cpu").contiguous()}))
        atomic_io.write_json(marker, {"key": self.cfg.key, "tensors_sha256": hashlib.sha256(data).hexdigest(),
                                      "stats": stats, "experts": experts})

    def _adopt(self, tag: str, rec: dict) -> None:
        tpath, _, _ = self._paths(tag)
        for name in rec["stats"]:
            if rec["stats"][name].get("stored", True):
                self.out.files[name] = tpath
        self.out.stats.update(rec["stats"])
        self.out.experts.update(rec["experts"])

    # --- quantization of one stage's tensors with the stats just collected
    def _hessian(self, name: str, linear: dict, experts: dict, blended: dict):
        slot = self.slot[name]
        module_path, attr = slot.name.rsplit(".", 1)
        if module_path in experts:
            h, _ = blended[(module_path, attr)]
            return h if slot.expert is None else h[slot.expert], module_path
        acc = linear.get(module_path)
        return (acc.mean() if acc is not None else None), None

    def _quantize(self, names, linear, experts, tensors, stats):
        blended = {}
        for path, acc in experts.items():
            if acc.h_in is None:  # the block never ran (no tokens at all)
                continue
            h_in, rules = blend_expert_stats(acc.h_in, acc.counts, self.cfg.min_tokens,
                                             pooled=acc.pooled_in / max(acc.total, 1))
            h_mid, _ = blend_expert_stats(acc.h_mid, acc.counts, self.cfg.min_tokens)
            blended[(path, "gate_up_proj")] = (h_in, rules)
            blended[(path, "down_proj")] = (h_mid, rules)
            self.out.experts[path] = {"tokens": acc.counts.tolist(), "router_mass": [round(float(m), 6) for m in acc.mass],
                                      "rule": rules, "min_tokens": self.cfg.min_tokens, "routed_tokens": acc.total}
        for name in names:
            plan = self.planned[name]
            h, expert_path = self._hessian(name, linear, experts, blended)
            if expert_path is not None and (expert_path, self.slot[name].name.rsplit(".", 1)[1]) not in blended:
                h = None
            w = self.read(name).to(self.cfg.device)
            res = weight_quant.quantize_weight(name, w, plan, self.recipe, hessian=h, compare_clip=True)
            layer_io.write_slot(self.skel, self.slot[name], res.dequant)
            tensors[name] = res.dequant.to("cpu")
            tensors.update(store_pack.to_tensors(res.store, with_spec=True))  # the packed store's entries
            slot = self.slot[name]
            tokens = (int(self.out.experts[expert_path]["tokens"][slot.expert]) if expert_path and slot.expert is not None
                      and expert_path in self.out.experts else
                      (self.out.experts.get(expert_path, {}).get("routed_tokens") if expert_path else
                       (linear[slot.name.rsplit(".", 1)[0]].n if slot.name.rsplit(".", 1)[0] in linear else 0)))
            stats[name] = {"method": res.method, "statistics": "H" if h is not None else None, "tokens": tokens,
                           "proxy": res.proxy, "proxy_clip": res.proxy_clip, "proxy_diag": res.proxy_diag,
                           "proxy_diag_clip": res.proxy_diag_clip, "sq_err": res.sq_err,
                           "sq_ref": res.sq_ref, "experts": expert_path}
            del w, res

    def _hooks(self, names):
        linear, experts, handles = {}, {}, []
        self._shared = shared = {}
        for name in names:
            slot = self.slot[name]
            module_path, attr = slot.name.rsplit(".", 1)
            module = self.skel.model.get_submodule(module_path)
            if isinstance(module, nn.Linear) and attr == "weight":
                if module_path not in linear:
                    linear[module_path] = LinearStats(shared)
                    handles.append(module.register_forward_pre_hook(linear[module_path].hook))
            elif attr in ("gate_up_proj", "down_proj") and hasattr(module, "gate_up_proj") and \
                    module.gate_up_proj.ndim == 3:
                if module_path not in experts:
                    experts[module_path] = ExpertStats(module)
                    handles.append(module.register_forward_pre_hook(experts[module_path].hook, with_kwargs=True))
        return linear, experts, handles

    def _forward(self, layer, x, layer_args, capture_out: bool, stop_after: list | None = None,
                 attn_record: dict | None = None, attn_replay: dict | None = None):
        """Run the layer over every batch; with `stop_after` (modules), a batch stops as soon as all of them
        have run (the attention stage needs no MLP compute).

        `attn_record` ({module: [outputs per batch]}) keeps what the layer's attention modules return; with
        `attn_replay` those modules return the recorded outputs instead of recomputing them. The output
        pass uses this: between the MLP stage and it only the MLP's weights change, so the attention's
        output is the same (bit for bit: the same inputs through the same weights), and one attention pass
        per layer is saved."""
        bw = self.cfg.batch_windows
        pending = set()
        handles = []
        batch = [0]
        if stop_after:
            def done(module, args, output):
                pending.discard(id(module))
                if not pending:
                    raise _StageDone()

            handles = [m.register_forward_hook(done) for m in stop_after]
        for module, outs in (attn_record or {}).items():
            handles.append(module.register_forward_hook(
                lambda m, a, out, outs=outs: outs.append(_detached_copy(out))))
        for module, outs in (attn_replay or {}).items():
            handles.append(_Replay(module, outs, batch))
        try:
            for b, (args, kwargs) in enumerate(layer_args):
                batch[0] = b
                xb = x[b * bw:(b + 1) * bw].to(self.cfg.device, self.cfg.dtype)
                pending.update(id(m) for m in stop_after or ())
                getattr(self, "_shared", {}).clear()
                try:
                    with torch.no_grad():
                        y = layer(xb, *args, **kwargs)
                except _StageDone:
                    continue
                if isinstance(y, tuple):
                    y = y[0]
                if capture_out:
                    x[b * bw:(b + 1) * bw] = y.to(x.device, x.dtype)
        finally:
            for h in handles:
                h.remove()

    def run(self) -> CalibOutput:
        from tqdm import tqdm

        t0 = time.perf_counter()
        ids = self.cfg.windows.ids
        bw = self.cfg.batch_windows
        skel, n_layers = self.skel, len(self.skel.layers)
        self.cfg.ckpt_dir.mkdir(parents=True, exist_ok=True)
        # resume point: the layers whose checkpoints are intact, in order; the activations after the last
        # of them are kept until the next layer's checkpoint exists, so they are always there
        start = 0
        while start < n_layers and self._load_done(f"layer-{start:05d}") is not None:
            start += 1
        if start and not self._paths(f"layer-{start - 1:05d}")[2].is_file():
            start = 0
        # inputs of layer 0 and the per-layer forward arguments, batch by batch
        top = [m for n, m in skel.text_model.named_children() if n != skel.layers_prefix.rsplit(".", 1)[-1]]
        embed_like = [m for m in top if any(True for _ in m.parameters())]
        for m in embed_like:
            layer_io.materialise(skel, m, self.slots_of, self.read, self.cfg.device, self.cfg.dtype)
        t_in = time.perf_counter()
        xs, layer_args = [], []
        for b0 in range(0, ids.shape[0], bw):
            hidden, per_layer = layer_io.catch_layer_inputs(skel, ids[b0:b0 + bw].to(self.cfg.device))
            xs.append(hidden.to("cpu"))
            layer_args.append(per_layer)
        x = torch.cat(xs).to(self.cfg.dtype)
        del xs
        self._tick("layer0_inputs", t_in)
        if start:
            from safetensors.torch import load_file

            x = load_file(str(self._paths(f"layer-{start - 1:05d}")[2]))["x"]
            for i in range(start):
                self._adopt(f"layer-{i:05d}", self._load_done(f"layer-{i:05d}"))
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
        self._final(x, embed_like)
        self._tick("final_head", t_fin)
        self.out.seconds = time.perf_counter() - t0
        return self.out

    def _layer(self, i: int, x: torch.Tensor, layer_args: list) -> None:
        skel = self.skel
        layer = skel.layers[i]
        prefix = skel.layer_prefix(i)
        names = sorted(n for n in self.planned if n in self.slot and self.slot[n].name.startswith(prefix))
        stages = [[n for n in names if any(p in n[len(prefix):].split(".") for p in ATTENTION_PARTS)]]
        stages.append([n for n in names if n not in stages[0]])
        layer_io.materialise(skel, layer, self.slots_of, self.read, self.cfg.device, self.cfg.dtype)
        tensors, stats = {}, {}
        experts_before = set(self.out.experts)
        attn_modules = [m for n, m in layer.named_children() if n in ATTENTION_PARTS]
        recorded = None
        for k, stage in enumerate(stages):
            if not stage:
                continue
            linear, experts, handles = self._hooks(stage)
            hooked = [self.skel.model.get_submodule(p) for p in list(linear) + list(experts)]
            record = {m: [] for m in attn_modules} if k == 1 else None
            t0 = time.perf_counter()
            try:
                self._forward(layer, x, layer_args, capture_out=False, stop_after=hooked if k == 0 else None,
                              attn_record=record)
            finally:
                for h in handles:
                    h.remove()
            self._tick("forward_stats", t0)
            t0 = time.perf_counter()
            self._quantize(stage, linear, experts, tensors, stats)
            self._tick("quantize", t0)
            recorded = record if k == 1 else recorded
        t0 = time.perf_counter()
        usable = recorded if recorded and all(len(v) == len(layer_args) for v in recorded.values()) else None
        self._forward(layer, x, layer_args, capture_out=True, attn_replay=usable)
        self._tick("forward_out", t0)
        del recorded, usable
        t0 = time.perf_counter()
        layer_io.release(layer)
        layer_io.return_freed_memory()
        tag = f"layer-{i:05d}"
        experts = {k: v for k, v in self.out.experts.items() if k not in experts_before}
        self._save(tag, tensors, stats, experts, x)
        prev = self._paths(f"layer-{i - 1:05d}")[2]
        prev.unlink(missing_ok=True)  # the activations before this layer are no longer needed
        self._adopt(tag, {"stats": stats, "experts": experts})
        self._tick("checkpoint", t0)

    def _tick(self, stage: str, t0: float) -> None:
        self.out.stage_seconds[stage] = self.out.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0

    def _final(self, x: torch.Tensor, top_modules) -> None:
        """lm_head's H from the final norm's output; a tied embedding is quantized with it."""
        skel = self.skel
        done = self._load_done("final")
        if done is not None:
            for m in top_modules:
                layer_io.release(m)
            self._adopt("final", done)
            return
        norm_modules = [m for m in top_modules if "norm" in type(m).__name__.lower()]
        head_names = [n for n, p in self.planned.items() if p.role.role == Role.LM_HEAD and n not in self.slot
                      or (p.role.role == Role.LM_HEAD and not self.slot[n].name.startswith(skel.layers_prefix))]
        tied = bool(self.source.config.get("tie_word_embeddings", (self.source.config.get("text_config") or {})
                                           .get("tie_word_embeddings", False)))
        if not head_names and tied:
            head_names = [n for n, p in self.planned.items() if p.role.role == Role.EMBED]
        if not head_names or not norm_modules:
            for m in top_modules:
                layer_io.release(m)
            return
        acc = LinearStats()
        bw = self.cfg.batch_windows
        with torch.no_grad():
            for b0 in range(0, x.shape[0], bw):
                acc.hook(None, (norm_modules[-1](x[b0:b0 + bw].to(self.cfg.device, self.cfg.dtype)),))
        for m in top_modules:
            layer_io.release(m)
        tensors, stats = {}, {}
        h = acc.mean()
        for name in head_names:
            w = self.read(name).to(self.cfg.device)
            res = weight_quant.quantize_weight(name, w, self.planned[name], self.recipe, hessian=h, compare_clip=True)
            tensors[name] = res.dequant.to("cpu")
            tensors.update(store_pack.to_tensors(res.store, with_spec=True))  # the packed store's entries
            stats[name] = {"method": res.method, "statistics": "H (final norm output)", "tokens": acc.n,
                           "proxy": res.proxy, "proxy_clip": res.proxy_clip, "proxy_diag": res.proxy_diag,
                           "proxy_diag_clip": res.proxy_diag_clip, "sq_err": res.sq_err,
                           "sq_ref": res.sq_ref, "experts": None}
        self._save("final", tensors, stats, {}, None)
        self._adopt("final", {"stats": stats, "experts": {}})


def run_calibration(source: Source, plans: dict, recipe: Recipe, cfg: CalibConfig) -> CalibOutput:
    """Quantize every tensor a decoder layer (or the head) owns with its activation statistics."""
    return _Pass(source, plans, recipe, cfg).run()
