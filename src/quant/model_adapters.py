"""Which role each checkpoint tensor plays, per model family, and how many bits a role gets.

Shaped like llama.cpp's converter: `BaseAdapter` holds the name rules most HF decoders share; each
family is a small subclass overriding only what differs, registered under its `config.model_type`.
The answer for a tensor is a `TensorRole`: its role and, for quantizable weights, the contraction
(input) axis *in the on-disk layout*, which is where quantization groups must run.

Everything downstream (bits, GGUF types, LoRA targets) is decided from roles, never from family
names: `Recipe` maps role -> bits. Only floating tensors with ndim >= 2 are ever quantized.

On-disk layouts (checked against transformers 5.17 modeling and conversion_mapping code):
* 2-D Linear weights are [out, in] -> contraction axis -1 (per-expert `experts.N.*` included);
* fused 3-D experts in transformers' own layout are [E, out, in] (qwen*_moe, mixtral, olmoe,
  deepseek, qwen3_next, qwen3_5_moe: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) -> axis -1;
* gpt_oss stores [E, in, out] (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]) -> axis -2;
* qwen3_vl_moe stores its fused experts transposed on disk ([E, H, 2I]; transformers transposes on
  load) -> axis -2.
Because a wrong axis silently quantizes along the output dim, `classify` cross-checks fused 3-D
experts against the config: the contraction dim of `gate_up_proj` must equal hidden_size.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from enum import Enum

import quant_spec


class Role(str, Enum):
    ROUTED_EXPERT = "routed_expert"
    SHARED_EXPERT = "shared_expert"
    ATTENTION = "attention"
    LINEAR_ATTENTION = "linear_attention"
    DENSE_MLP = "dense_mlp"
    ROUTER = "router"
    NORM = "norm"
    VISION = "vision"
    EMBED = "embed"
    LM_HEAD = "lm_head"
    MTP = "mtp"
    OTHER = "other"


# Roles whose weight matrices are quantized (given a recipe that says < 16 bits for them).
WEIGHT_ROLES = frozenset({Role.ROUTED_EXPERT, Role.SHARED_EXPERT, Role.ATTENTION, Role.LINEAR_ATTENTION,
                          Role.DENSE_MLP, Role.EMBED, Role.LM_HEAD})


@dataclass(frozen=True)
class TensorRole:
    """A tensor's role; `axis` is the contraction axis of a quantizable weight, None otherwise."""

    role: Role
    axis: int | None = None
    inner: Role | None = None  # for mtp: the role the tensor would have in a decoder layer

    @property
    def quantizable(self) -> bool:
        return self.axis is not None


# ------------------------------------------------------------------------------------------ recipe
METHODS = ("clip", "rtn", "wclip", "gptq", "awq")  # quant_methods.METHODS; checked here so a recipe fails early
CALIBRATED_METHODS = frozenset({"wclip", "gptq", "awq"})  # need activation statistics H
GRIDS = quant_spec.GRIDS


@dataclass(frozen=True)
class Recipe:
    """Role -> bits, plus how every quantized tensor is rounded (method, grid, group, clip search).

    The one place bit widths live; validated on construction (fails early). `role_bits` overrides the
    bits of any role, e.g. (("embed", 8.0), ("lm_head", 8.0)) for a tied embedding.
    """

    expert_bits: float = 3.0
    linear_bits: float = 4.0
    mtp_bits: float = 16.0
    group: int = 128
    clip_steps: int = 16
    clip_lo: float = 0.65
    method: str = "clip"
    grid: str = "sym"
    role_bits: tuple = ()
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid: unknown grid {self.grid!r}; choose one of {', '.join(GRIDS)}")
        if not 0.0 <= float(self.damp) < 1.0:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        object.__setattr__(self, "role_bits", normalize_role_bits(self.role_bits))
        self.spec(16.0)  # group / clip knobs, with QuantSpec's own message
        for knob in ("expert_bits", "linear_bits", "mtp_bits"):
            try:
                self.spec(getattr(self, knob))
            except ValueError as e:
                raise ValueError(f"{knob.replace('_', '-')}: {e}") from None
        for role, bits in self.role_bits:
            try:
                self.spec(bits)
            except ValueError as e:
                raise ValueError(f"role-bits {role}={bits:g}: {e}") from None

    @property
    def calibrated(self) -> bool:
        """True when the method needs activation statistics (a calibration pass)."""
        return self.method in CALIBRATED_METHODS

    def bits_for(self, role: Role) -> float:
        for name, bits in self.role_bits:
            if name == role.value:
                return float(bits)
        if role == Role.ROUTED_EXPERT:
            return float(self.expert_bits)
        if role == Role.MTP:
            return float(self.mtp_bits)
        if role in WEIGHT_ROLES:
            return float(self.linear_bits)
        return 16.0  # router, norm, vision, other

    def spec(self, bits: float) -> quant_spec.QuantSpec:
        return quant_spec.QuantSpec(bits=float(bits), group=self.group, clip_steps=self.clip_steps,
                                   clip_lo=self.clip_lo, grid=self.grid)

    def spec_for(self, tensor_role: TensorRole, dtype_is_float: bool, ndim: int) -> quant_spec.QuantSpec | None:
        """The QuantSpec to apply, or None when the tensor is copied unchanged."""
        if not (tensor_role.quantizable and dtype_is_float and ndim >= 2):
            return None
        spec = self.spec(self.bits_for(tensor_role.role))
        return None if spec.is_identity else spec

    def as_dict(self) -> dict:
        return {"expert_bits": float(self.expert_bits), "linear_bits": float(self.linear_bits),
                "mtp_bits": float(self.mtp_bits), "group": self.group, "clip_steps": self.clip_steps,
                "clip_lo": float(self.clip_lo), "method": self.method, "grid": self.grid,
                "role_bits": {r: float(b) for r, b in self.role_bits}, "damp": float(self.damp),
                "act_order": bool(self.act_order)}


def normalize_role_bits(value) -> tuple:
    """'embed=8,lm_head=8' | {'embed': 8} | (('embed', 8),) -> sorted (('embed', 8.0), ...); unknown roles refused."""
    if isinstance(value, str):
        pairs = []
        for item in filter(None, (x.strip() for x in value.split(","))):
            role, sep, bits = item.partition("=")
            if not sep:
                raise ValueError(f"role-bits: {item!r} is not ROLE=BITS (e.g. embed=8,lm_head=8)")
            try:
                pairs.append((role.strip(), float(bits)))
            except ValueError:
                raise ValueError(f"role-bits: {item!r}: bits must be a number") from None
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = [tuple(p) for p in value]
    known = {r.value for r in Role}
    out = {}
    for role, bits in pairs:
        if role not in known:
            raise ValueError(f"role-bits: unknown role {role!r}; roles: {', '.join(sorted(known))}")
        out[role] = float(bits)
    return tuple(sorted(out.items()))


# ---------------------------------------------------------------------------------------- adapters
VISION_SEGMENTS = frozenset({"visual", "vision_tower", "vision_model", "vision_encoder", "multi_modal_projector",
                             "mm_projector", "image_encoder", "audio_tower", "audio_model", "vision_embed_tokens"})
ROUTER_MODULES = frozenset({"gate", "router", "shared_expert_gate"})
ATTENTION_SEGMENTS = frozenset({"self_attn", "attn", "attention", "cross_attn"})
MLP_SEGMENTS = frozenset({"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"})
EMBED_MODULES = frozenset({"embed_tokens", "wte", "tok_embeddings", "word_embeddings"})
LM_HEAD_MODULES = frozenset({"lm_head", "embed_out"})
# Dense/expert projections that read the hidden state (their contraction dim is hidden_size).
HIDDEN_INPUT_PROJS = frozenset({"gate_up_proj", "gate_proj", "up_proj", "w1", "w3"})
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _is_norm(module: str) -> bool:
    return "norm" in module or re.fullmatch(r"ln(_\w+|\d+)?", module) is not None


class BaseAdapter:
    """Name rules shared by HF decoders. Subclasses override class attributes or `classify`."""

    model_types: tuple[str, ...] = ()
    # Contraction axis of fused 3-D expert tensors, by parameter name (transformers' [E, out, in]).
    fused_expert_axis: dict[str, int] = {"gate_up_proj": -1, "gate_proj": -1, "up_proj": -1, "down_proj": -1}
    is_guess = False

    def __init__(self, config: dict):
        self.config = config
        text = config.get("text_config") or {}
        self.hidden_size = config.get("hidden_size") or text.get("hidden_size")
        self.num_hidden_layers = config.get("num_hidden_layers") or text.get("num_hidden_layers")

    @property
    def name(self) -> str:
        return type(self).__name__

    # The public answer ------------------------------------------------------------------------
    def classify(self, name: str, shape) -> TensorRole:
        """Role (and contraction axis) of the on-disk tensor `name` with `shape`."""
        shape = tuple(int(s) for s in shape)
        parts = name.split(".")
        if VISION_SEGMENTS.intersection(parts):
            return TensorRole(Role.VISION)
        if self.is_mtp(name, parts):
            inner = self.classify_decoder(name, parts, shape)
            return TensorRole(Role.MTP, inner.axis if inner.role in WEIGHT_ROLES else None, inner.role)
        return self.classify_decoder(name, parts, shape)

    # Rules, in precedence order ---------------------------------------------------------------
    def is_mtp(self, name: str, parts: list[str]) -> bool:
        return "mtp" in parts

    def classify_decoder(self, name: str, parts: list[str], shape: tuple[int, ...]) -> TensorRole:
        param = parts[-1]
        module = parts[-2] if len(parts) >= 2 else ""
        is_weight = param == "weight"
        if _is_norm(module) or (not is_weight and _is_norm(param)):
            return TensorRole(Role.NORM)
        if module in ROUTER_MODULES or param in ROUTER_MODULES or param == "e_score_correction_bias":
            return TensorRole(Role.ROUTER)
        if param == "bias" or param.endswith("_bias") or param.endswith(("_scale", "_scale_inv", "scales")):
            return TensorRole(Role.OTHER)  # biases, sinks-like params and fp8/mx scales are never quantized
        if "shared_experts" in parts or "shared_expert" in parts or "shared_mlp" in parts:
            return self._weight(Role.SHARED_EXPERT, is_weight, shape)
        if "experts" in parts:
            return self.classify_expert(name, parts, shape)
        if "linear_attn" in parts:
            return self._weight(Role.LINEAR_ATTENTION, is_weight and "proj" in module, shape)
        if ATTENTION_SEGMENTS.intersection(parts):
            return self._weight(Role.ATTENTION, is_weight, shape)
        if module in EMBED_MODULES:
            return self._weight(Role.EMBED, is_weight, shape)
        if module in LM_HEAD_MODULES:
            return self._weight(Role.LM_HEAD, is_weight, shape)
        if MLP_SEGMENTS.intersection(parts):
            return self._weight(Role.DENSE_MLP, is_weight, shape)
        return TensorRole(Role.OTHER)

    def classify_expert(self, name: str, parts: list[str], shape: tuple[int, ...]) -> TensorRole:
        param = parts[-1]
        if param == "weight" and len(shape) == 2:  # per-expert nn.Linear: experts.N.<proj>.weight
            return TensorRole(Role.ROUTED_EXPERT, -1)
        if len(shape) == 3 and param in self.fused_expert_axis:
            axis = self.fused_expert_axis[param]
            self.check_fused_layout(name, param, shape, axis)
            return TensorRole(Role.ROUTED_EXPERT, axis)
        return TensorRole(Role.OTHER)

    def check_fused_layout(self, name: str, param: str, shape: tuple[int, ...], axis: int) -> None:
        """A fused [E, a, b] tensor's contraction dim must be hidden_size for the hidden-input projections
        and its output dim hidden_size for down_proj; anything else means the adapter's axis is wrong."""
        if not self.hidden_size:
            return
        other = -1 if axis == -2 else -2
        dim_that_must_be_hidden = axis if param in HIDDEN_INPUT_PROJS else other
        if shape[dim_that_must_be_hidden] != self.hidden_size:
            raise ValueError(
                f"{self.name}: fused expert {name} has shape {list(shape)} but hidden_size={self.hidden_size} is not at "
                f"axis {dim_that_must_be_hidden}; the on-disk layout differs from what this adapter assumes "
                f"(contraction axis {axis}). Fix fused_expert_axis for model_type {self.config.get('model_type')!r}.")

    @staticmethod
    def _weight(role: Role, quantizable: bool, shape: tuple[int, ...]) -> TensorRole:
        """A weight of `role`; quantizable only when it is a matrix (axis -1 = the Linear input dim)."""
        if quantizable and len(shape) == 2:
            return TensorRole(role, -1)
        return TensorRole(role if quantizable else Role.OTHER)


# --------------------------------------------------------------------------------------- registry
ADAPTERS: dict[str, type[BaseAdapter]] = {}


def register(cls: type[BaseAdapter]) -> type[BaseAdapter]:
    for model_type in cls.model_types:
        if model_type in ADAPTERS:
            raise ValueError(f"model_type {model_type!r} registered twice ({ADAPTERS[model_type].__name__}, {cls.__name__})")
        ADAPTERS[model_type] = cls
    return cls


@register
class DenseAdapter(BaseAdapter):
    """llama & co.: attention + dense MLP (phi3's fused gate_up_proj is a dense MLP, not an expert)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "phi3")


@register
class Gemma3Adapter(BaseAdapter):
    """gemma3: text-only or the multimodal wrapper (`model.language_model.*`, `vision_tower`, projector)."""

    model_types = ("gemma3", "gemma3_text")


@register
class QwenMoeAdapter(BaseAdapter):
    """qwen2/3 MoE: routed experts (per-expert or fused [E, out, in]), `shared_expert` + its gate."""

    model_types = ("qwen2_moe", "qwen3_moe")


@register
class Qwen35Adapter(BaseAdapter):
    """qwen3.5 / qwen3-next: Gated DeltaNet `linear_attn.*` layers, full attention, (MoE), `mtp.*`."""

    model_types = ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")

    def classify_decoder(self, name, parts, shape):
        if parts[0] == "mtp" and parts[-2:] == ["fc", "weight"] and len(shape) == 2:  # MTP input projection
            return TensorRole(Role.DENSE_MLP, -1)
        return super().classify_decoder(name, parts, shape)


@register
class Qwen3VLMoeAdapter(BaseAdapter):
    """qwen3_vl_moe stores fused experts transposed on disk ([E, in, out])."""

    model_types = ("qwen3_vl_moe",)
    fused_expert_axis = {"gate_up_proj": -2, "down_proj": -2}


@register
class MixtralAdapter(BaseAdapter):
    """mixtral: `block_sparse_moe.experts.N.w1/w2/w3` on disk (fused gate_up_proj in memory)."""

    model_types = ("mixtral",)


@register
class OlmoeAdapter(BaseAdapter):
    model_types = ("olmoe",)


@register
class GptOssAdapter(BaseAdapter):
    """gpt_oss: fused experts stored [E, in, out] (x @ W), `mlp.router`, attention `sinks`."""

    model_types = ("gpt_oss",)
    fused_expert_axis = {"gate_up_proj": -2, "down_proj": -2}


@register
class DeepseekAdapter(BaseAdapter):
    """deepseek v2/v3: MLA attention, first_k_dense_replace dense layers, `shared_experts`, and MTP
    modules stored as extra decoder layers with index >= num_hidden_layers (eh_proj, enorm, ...)."""

    model_types = ("deepseek_v2", "deepseek_v3")

    def is_mtp(self, name, parts):
        m = LAYER_INDEX.search(name)
        if m and self.num_hidden_layers is not None and int(m.group(1)) >= self.num_hidden_layers:
            return True
        return super().is_mtp(name, parts)

    def classify_decoder(self, name, parts, shape):
        if parts[-2:] == ["eh_proj", "weight"] and len(shape) == 2:  # MTP: concat(embed, hidden) -> hidden
            return TensorRole(Role.DENSE_MLP, -1)
        if "shared_head" in parts and parts[-2] == "head":
            return self._weight(Role.LM_HEAD, parts[-1] == "weight", shape)
        return super().classify_decoder(name, parts, shape)


class GenericAdapter(BaseAdapter):
    """Unknown model_type: the shared name rules, announced as a guess."""

    is_guess = True


def adapter_for(config: dict) -> BaseAdapter:
    """The adapter for a checkpoint's config.json dict (generic name rules, with a warning, if unknown)."""
    model_type = config.get("model_type")
    cls = ADAPTERS.get(model_type)
    if cls is None:
        warnings.warn(f"model_type {model_type!r} has no adapter in model_adapters.py: guessing roles from tensor "
                      f"names. Check the --dry-run role table before trusting the output.", stacklevel=2)
        cls = GenericAdapter
    return cls(config)


def count_params(shape) -> int:
    return math.prod(int(s) for s in shape)
