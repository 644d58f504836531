"""The quantize tool's options: one dataclass (tool_config) that is the source of quant_save's flags, the
QUANT_* environment names, the configs/*.env recipe keys and the defaults, and the ONE mapping from a
recipe to a quant_save command line (quantize.sh, the smoke, the distill student and the benches all use
`argv`, so a recipe knob is added in one place).

Light on purpose (no torch): `quant_save.py --help` and recipe checks answer without loading the math.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import model_adapters
import tool_config
from tool_config import option

METHODS = model_adapters.METHODS
GRIDS = model_adapters.GRIDS
NAMED_CALIB = ("teacher-sample", "pydoc-topics")
DEFAULT_RECIPE = tool_config.cache_paths.REPO_ROOT / "configs" / "clip_122b.env"


@dataclass(frozen=True)
class QuantConfig:
    """Every knob of one build (flags --F, env QUANT_F, recipe key F; the old unprefixed names still work)."""

    model: str = option("", "checkpoint dir, hub id owner/name, or embedded:NAME", legacy=("MODEL",))
    revision: str | None = option(None, "hub revision (branch, tag or commit) when --model is a hub id",
                                  legacy=("REVISION",), kind=str)
    out: str | None = option(None, "output dir (not inside the input); required unless --dry-run", path=True,
                             legacy=("OUT",), kind=str)
    expert_bits: float = option(3.0, "bits for routed experts", legacy=("EXPERT_BITS",))
    linear_bits: float = option(4.0, "bits for attention, linear attention, shared experts, dense MLP, embed, "
                                     "lm_head", legacy=("LINEAR_BITS",))
    mtp_bits: float = option(16.0, "bits for multi-token-prediction weights", legacy=("MTP_BITS",))
    role_bits: str = option("", "override any role's bits: ROLE=BITS[,ROLE=BITS], e.g. embed=8,lm_head=8",
                            legacy=("ROLE_BITS",))
    bits_plan: str | None = option(None, "per-tensor (per-expert) bits JSON from moe_alloc.py; unlisted tensors "
                                         "keep their role bits", path=True, legacy=("BITS_PLAN",), kind=str)
    method: str = option("clip", "rounding method (wclip/gptq/awq need calibration text)", choices=METHODS,
                         legacy=("METHOD",))
    grid: str = option("sym", "code grid: sym [-qmax, qmax]; full: all 2^b levels; asym: zero point; gguf:TYPE "
                              "llama.cpp's Q4_0/Q5_0/Q8_0/Q3_K/Q4_K/Q5_K/Q6_K block exactly (bits and group implied); "
                              "gguf:K the K-quant picked by each role's bits (3 Q3_K, 4 Q4_K, 5 Q5_K, 6 Q6_K, 8 Q8_0)",
                       choices=GRIDS, legacy=("GRID",))
    group: int = option(128, "quantization group size along the input axis", legacy=("GROUP",))
    clip_steps: int = option(16, "clip-ratio candidates in the MSE search (0 = absmax)", legacy=("CLIP_STEPS",))
    clip_lo: float = option(0.65, "smallest clip ratio searched", legacy=("CLIP_LO",))
    damp: float = option(0.01, "gptq: damping, as a fraction of mean diag(H)", legacy=("DAMP",))
    act_order: bool = option(False, "gptq: quantize columns in decreasing diag(H) order", legacy=("ACT_ORDER",))
    calib_file: str | None = option(None, "calibration text file (UTF-8); wins over the two below", path=True,
                                    legacy=("CALIB_FILE",), kind=str)
    calib_dataset: str | None = option(None, "calibration hub dataset ID[:split[:field]] or ID:config:split:field",
                                       legacy=("CALIB_DATASET",), kind=str)
    calib: str | None = option(None, "named calibration text: teacher-sample (sampled from the source) or "
                                     "pydoc-topics (offline)", choices=NAMED_CALIB, legacy=("CALIB",), kind=str)
    calib_tokens: int = option(32768, "calibration tokens", legacy=("CALIB_TOKENS",))
    calib_ctx: int = option(512, "calibration window length", legacy=("CALIB_CTX",))
    calib_batch: int = option(8, "windows per forward in the calibration pass")
    expert_batch: int = option(0, "routed experts per calibrated quantization call (0 = auto: experts / devices; "
                                  "1 = one call per expert tensor)")
    min_expert_tokens: int = option(128, "routed experts with fewer calibration tokens get statistics blended "
                                         "with the layer's pooled ones", legacy=("MIN_EXPERT_TOKENS",))
    device: str = option("cpu", "cpu | cuda (all visible GPUs) | cuda:N", legacy=("DEVICE",))
    probe: bool = option(False, "first probe the router (moe_probe) and plan bits (moe_alloc), then build "
                                "with that plan (written to OUT.probe/)", legacy=("PROBE",))
    probe_calib: str | None = option(None, "probe text file (default: --calib-file)", path=True,
                                     legacy=("PROBE_CALIB",), kind=str)
    probe_tokens: int = option(16384, "probe calibration tokens", legacy=("PROBE_TOKENS",))
    alloc_budget: float = option(3.0, "probe plan: routed-expert effective bits", legacy=("ALLOC_BUDGET",))
    alloc_strategy: str = option("asal", "probe plan: salience strategy (moe_alloc)", legacy=("ALLOC_STRATEGY",))
    alloc_levels: str = option("2,3,4", "probe plan: allowed expert bit levels", legacy=("ALLOC_LEVELS",))
    emit: str = option("dequant", "exports of the packed store, a comma list of dequant (the BF16 view vLLM loads "
                                  "unchanged), compressed-tensors, gguf", legacy=("EMIT",))
    dry_run: bool = option(False, "print roles, bits, footprint and the sizing table (disk, host RAM, GPU memory, "
                                  "time per stage); write nothing")
    max_disk: str | None = option(None, "disk the build may use (e.g. 500G); the real free space caps it too; the "
                                        "build refuses up front when it needs more", legacy=("MAX_DISK",), kind=str)
    size_for: str | None = option(None, "with --dry-run: size for these devices instead of the visible ones (cpu, "
                                        "4xH100, 8xH200, Nxgpu:GiB)", kind=str)
    costs: str | None = option(None, "cost table: cpu (measured by tests/bench/sizing_costs.py), h100 (assumed) or a JSON "
                                     "file (tests/bench/gpu_check.sh's); default by device kind", kind=str)
    list_tensors: bool = option(False, "with --dry-run: one line per tensor")
    force: bool = option(False, "overwrite an OUT holding another build or other files")
    progress: bool = option(True, "progress bar")

    def __post_init__(self):
        """A gguf:TYPE grid implies its bits and group: the knobs left at their defaults take them, a value that
        contradicts the type is refused (a value given equal to the default counts as not given)."""
        import quant_spec

        if not quant_spec.gguf_type(self.grid):
            return
        bits, group = quant_spec.gguf_bits_group(self.grid)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        implied = {"group": group} if self.grid == quant_spec.K_FAMILY else \
            {"group": group, "expert_bits": float(bits), "linear_bits": float(bits)}
        for name, want in implied.items():
            have = getattr(self, name)
            if have == defaults[name]:
                object.__setattr__(self, name, want)
            elif have != want:
                raise ValueError(f"--{name.replace('_', '-')} {have:g} contradicts --grid {self.grid} (llama.cpp's "
                                 f"{quant_spec.gguf_type(self.grid)}: {bits}-bit codes, group {group}); drop it")

    def calib_source(self) -> dict:
        """The one calibration source a build uses: a file, else a hub dataset, else a named text."""
        if self.calib_file:
            return {"calib_file": self.calib_file}
        if self.calib_dataset:
            return {"calib_dataset": self.calib_dataset}
        return {"calib": self.calib} if self.calib else {}


TOOL = tool_config.Tool("quant_save", "QUANT_", QuantConfig,
                        "Quantize a HF safetensors checkpoint by tensor role (routed experts at --expert-bits, other "
                        "linears at --linear-bits, routers/norms/vision kept), streaming one tensor at a time, "
                        "optionally with a calibrated method (gptq, awq, wclip) run layer by layer.")
RUN_ONLY = ("probe", "probe_calib", "probe_tokens", "alloc_budget", "alloc_strategy", "alloc_levels")


def from_recipe(path: Path, environ=None, **overrides) -> QuantConfig:
    """The QuantConfig a recipe file gives (with QUANT_* / legacy env on top unless `environ={}`)."""
    import argparse

    args = argparse.Namespace(recipe=str(path), **{f.name: None for f in dataclasses.fields(QuantConfig)})
    cfg = tool_config.resolve(TOOL, args, {} if environ is None else environ, notice=lambda m: None)
    return dataclasses.replace(cfg, **overrides)


def argv(cfg: QuantConfig) -> list[str]:
    """The quant_save command line that builds CFG. Every value is spelled out, so the child reads no
    recipe and no QUANT_* environment of its own; the pipeline-only probe knobs are not quant_save's."""
    out: list[str] = []
    for f in dataclasses.fields(QuantConfig):
        value = getattr(cfg, f.name)
        if f.name in RUN_ONLY or f.name in ("calib_file", "calib_dataset", "calib") or value is None or value == "":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out += [flag, "on" if value else "off"]
        elif isinstance(value, float):
            out += [flag, f"{value:g}"]
        else:
            out += [flag, str(value)]
    for key, value in cfg.calib_source().items():
        out += ["--" + key.replace("_", "-"), str(value)]
    return out
