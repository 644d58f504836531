"""Roles and contraction axes per family: hub-style names (table) and real tiny checkpoints (on-disk names)."""
import math
import warnings

import pytest

import model_adapters as ma
from model_adapters import Recipe, Role, TensorRole

R = Role
H = 4096  # hidden size of the configs below

# (model_type, tensor name, shape, expected role, expected axis or None when never quantized)
NAME_TABLE = [
    # qwen3.5 MoE, multimodal wrapper (the shipped 122B checkpoint's layout) incl. MTP and vision
    ("qwen3_5_moe", "model.language_model.layers.0.linear_attn.in_proj_qkv.weight", (8192, H), R.LINEAR_ATTENTION, -1),
    ("qwen3_5_moe", "model.language_model.layers.0.linear_attn.in_proj_z.weight", (4096, H), R.LINEAR_ATTENTION, -1),
    ("qwen3_5_moe", "model.language_model.layers.0.linear_attn.in_proj_a.weight", (32, H), R.LINEAR_ATTENTION, -1),
    ("qwen3_5_moe", "model.language_model.layers.0.linear_attn.out_proj.weight", (H, 4096), R.LINEAR_ATTENTION, -1),
    ("qwen3_5_moe", "model.language_model.layers.0.linear_attn.conv1d.weight", (8192, 1, 4), R.OTHER, None),
    ("qwen3_5_moe", "model.language_model.layers.0.linear_attn.A_log", (32,), R.OTHER, None),
    ("qwen3_5_moe", "model.language_model.layers.0.linear_attn.dt_bias", (32,), R.OTHER, None),
    ("qwen3_5_moe", "model.language_model.layers.0.linear_attn.norm.weight", (128,), R.NORM, None),
    ("qwen3_5_moe", "model.language_model.layers.3.self_attn.q_proj.weight", (8192, H), R.ATTENTION, -1),
    ("qwen3_5_moe", "model.language_model.layers.3.self_attn.q_norm.weight", (256,), R.NORM, None),
    ("qwen3_5_moe", "model.language_model.layers.0.mlp.gate.weight", (256, H), R.ROUTER, None),
    ("qwen3_5_moe", "model.language_model.layers.0.mlp.shared_expert_gate.weight", (1, H), R.ROUTER, None),
    ("qwen3_5_moe", "model.language_model.layers.0.mlp.shared_expert.gate_proj.weight", (512, H), R.SHARED_EXPERT, -1),
    ("qwen3_5_moe", "model.language_model.layers.0.mlp.experts.gate_up_proj", (256, 1024, H), R.ROUTED_EXPERT, -1),
    ("qwen3_5_moe", "model.language_model.layers.0.mlp.experts.down_proj", (256, H, 512), R.ROUTED_EXPERT, -1),
    ("qwen3_5_moe", "model.language_model.layers.0.mlp.experts.17.gate_proj.weight", (512, H), R.ROUTED_EXPERT, -1),
    ("qwen3_5_moe", "model.language_model.layers.0.mlp.experts.17.down_proj.weight", (H, 512), R.ROUTED_EXPERT, -1),
    ("qwen3_5_moe", "model.language_model.embed_tokens.weight", (248320, H), R.EMBED, -1),
    ("qwen3_5_moe", "lm_head.weight", (248320, H), R.LM_HEAD, -1),
    ("qwen3_5_moe", "model.language_model.norm.weight", (H,), R.NORM, None),
    ("qwen3_5_moe", "model.visual.blocks.0.attn.qkv.weight", (3456, 1152), R.VISION, None),
    ("qwen3_5_moe", "model.visual.merger.linear_fc1.weight", (4608, 4608), R.VISION, None),
    ("qwen3_5_moe", "model.visual.patch_embed.proj.weight", (1152, 3, 2, 16, 16), R.VISION, None),
    ("qwen3_5_moe", "mtp.fc.weight", (H, 2 * H), R.MTP, -1),
    ("qwen3_5_moe", "mtp.pre_fc_norm_embedding.weight", (H,), R.MTP, None),
    ("qwen3_5_moe", "mtp.layers.0.mlp.experts.3.up_proj.weight", (512, H), R.MTP, -1),
    ("qwen3_5_moe", "mtp.layers.0.mlp.gate.weight", (256, H), R.MTP, None),  # an MTP router stays unquantized
    ("qwen3_5_moe", "mtp.layers.0.self_attn.o_proj.weight", (H, 8192), R.MTP, -1),
    # qwen3-next: fused qkvz / ba projections
    ("qwen3_next", "model.layers.0.linear_attn.in_proj_qkvz.weight", (12288, H), R.LINEAR_ATTENTION, -1),
    ("qwen3_next", "model.layers.0.linear_attn.in_proj_ba.weight", (64, H), R.LINEAR_ATTENTION, -1),
    ("qwen3_next", "model.layers.0.mlp.shared_expert.down_proj.weight", (H, 512), R.SHARED_EXPERT, -1),
    # dense families: gate_proj is NOT a router; phi3's fused gate_up_proj is a dense MLP
    ("llama", "model.layers.0.mlp.gate_proj.weight", (11008, H), R.DENSE_MLP, -1),
    ("llama", "model.layers.0.mlp.down_proj.weight", (H, 11008), R.DENSE_MLP, -1),
    ("llama", "model.layers.0.self_attn.k_proj.weight", (1024, H), R.ATTENTION, -1),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias", (1024,), R.OTHER, None),
    ("phi3", "model.layers.0.mlp.gate_up_proj.weight", (16384, H), R.DENSE_MLP, -1),
    ("phi3", "model.layers.0.self_attn.qkv_proj.weight", (3 * H, H), R.ATTENTION, -1),
    ("gemma3", "model.language_model.layers.0.pre_feedforward_layernorm.weight", (H,), R.NORM, None),
    ("gemma3", "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", (4304, 1152), R.VISION, None),
    ("gemma3", "model.multi_modal_projector.mm_input_projection_weight", (1152, H), R.VISION, None),
    # mixtral legacy on-disk names
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", (8, H), R.ROUTER, None),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.7.w2.weight", (H, 14336), R.ROUTED_EXPERT, -1),
    ("olmoe", "model.layers.0.mlp.experts.63.down_proj.weight", (H, 1024), R.ROUTED_EXPERT, -1),
    # deepseek: MLA, dense first layers, shared_experts, router bias, fp8 scales, MTP as layer 61
    ("deepseek_v3", "model.layers.0.mlp.gate_proj.weight", (18432, H), R.DENSE_MLP, -1),
    ("deepseek_v3", "model.layers.5.mlp.gate.e_score_correction_bias", (256,), R.ROUTER, None),
    ("deepseek_v3", "model.layers.5.mlp.shared_experts.up_proj.weight", (2048, H), R.SHARED_EXPERT, -1),
    ("deepseek_v3", "model.layers.5.mlp.experts.3.down_proj.weight_scale_inv", (56, 16), R.OTHER, None),
    ("deepseek_v3", "model.layers.5.self_attn.kv_a_proj_with_mqa.weight", (576, H), R.ATTENTION, -1),
    ("deepseek_v3", "model.layers.5.self_attn.kv_a_layernorm.weight", (512,), R.NORM, None),
    ("deepseek_v3", "model.layers.61.eh_proj.weight", (H, 2 * H), R.MTP, -1),
    ("deepseek_v3", "model.layers.61.enorm.weight", (H,), R.MTP, None),
    ("deepseek_v3", "model.layers.61.shared_head.head.weight", (129280, H), R.MTP, -1),
    ("deepseek_v3", "model.layers.61.mlp.experts.0.gate_proj.weight", (2048, H), R.MTP, -1),
    # gpt_oss: fused [E, in, out], router with bias, attention sinks, expert biases
    ("gpt_oss", "model.layers.0.mlp.experts.gate_up_proj", (32, H, 5760), R.ROUTED_EXPERT, -2),
    ("gpt_oss", "model.layers.0.mlp.experts.down_proj", (32, 2880, H), R.ROUTED_EXPERT, -2),
    ("gpt_oss", "model.layers.0.mlp.experts.gate_up_proj_bias", (32, 5760), R.OTHER, None),
    ("gpt_oss", "model.layers.0.mlp.router.weight", (32, H), R.ROUTER, None),
    ("gpt_oss", "model.layers.0.mlp.router.bias", (32,), R.ROUTER, None),
    ("gpt_oss", "model.layers.0.self_attn.sinks", (64,), R.OTHER, None),
    ("qwen3_vl_moe", "model.language_model.layers.0.mlp.experts.gate_up_proj", (128, H, 1536), R.ROUTED_EXPERT, -2),
]


def config_for(model_type):
    return {"model_type": model_type, "hidden_size": H, "num_hidden_layers": 61}


@pytest.mark.parametrize("model_type,name,shape,role,axis", NAME_TABLE, ids=[f"{r[0]}:{r[1]}" for r in NAME_TABLE])
def test_hub_style_names_get_the_right_role_and_axis(model_type, name, shape, role, axis):
    got = ma.adapter_for(config_for(model_type)).classify(name, shape)
    assert (got.role, got.axis) == (role, axis)


def test_every_listed_family_is_registered_and_unknown_ones_warn():
    for model_type in ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5", "qwen3_next", "qwen3_moe", "qwen2_moe",
                       "mixtral", "olmoe", "deepseek_v3", "deepseek_v2", "gpt_oss", "llama", "mistral", "qwen2",
                       "qwen3", "gemma3", "gemma3_text", "phi3"):
        assert model_type in ma.ADAPTERS, model_type
    with pytest.warns(UserWarning, match="guessing"):
        adapter = ma.adapter_for({"model_type": "brand_new_moe", "hidden_size": H})
    assert adapter.is_guess
    assert adapter.classify("model.layers.0.mlp.experts.2.up_proj.weight", (512, H)).role == R.ROUTED_EXPERT
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ma.adapter_for(config_for("qwen3_moe")).is_guess


def test_a_fused_layout_that_contradicts_the_config_is_refused():
    """gpt_oss-shaped experts ([E, H, 2I]) read with the [E, out, in] rule would be grouped along the output."""
    qwen = ma.adapter_for(config_for("qwen3_moe"))
    with pytest.raises(ValueError, match="hidden_size=4096 is not at axis -1"):
        qwen.classify("model.layers.0.mlp.experts.gate_up_proj", (32, H, 5760))
    with pytest.raises(ValueError, match="on-disk layout"):
        ma.adapter_for(config_for("gpt_oss")).classify("model.layers.0.mlp.experts.down_proj", (32, H, 2880))


def test_recipe_maps_roles_to_bits_and_only_float_matrices_are_quantized():
    recipe = Recipe(expert_bits=3.0, linear_bits=4.0, mtp_bits=8.0, group=64)
    expected = {R.ROUTED_EXPERT: 3.0, R.SHARED_EXPERT: 4.0, R.ATTENTION: 4.0, R.LINEAR_ATTENTION: 4.0,
                R.DENSE_MLP: 4.0, R.EMBED: 4.0, R.LM_HEAD: 4.0, R.MTP: 8.0, R.ROUTER: 16.0, R.NORM: 16.0,
                R.VISION: 16.0, R.OTHER: 16.0}
    assert {role: recipe.bits_for(role) for role in Role} == expected
    expert = TensorRole(R.ROUTED_EXPERT, -1)
    spec = recipe.spec_for(expert, dtype_is_float=True, ndim=2)
    assert (spec.bits, spec.group, spec.clip_steps) == (3.0, 64, 16)
    assert recipe.spec_for(expert, dtype_is_float=False, ndim=2) is None
    assert recipe.spec_for(TensorRole(R.ROUTED_EXPERT, -1), dtype_is_float=True, ndim=1) is None
    assert recipe.spec_for(TensorRole(R.ROUTER), dtype_is_float=True, ndim=2) is None
    assert Recipe(mtp_bits=16.0).spec_for(TensorRole(R.MTP, -1), True, 2) is None


@pytest.mark.parametrize("kwargs,message", [
    ({"expert_bits": 3.5}, r"expert-bits: bits must be one of"),
    ({"linear_bits": 7.0}, r"linear-bits: bits must be one of"),
    ({"group": 0}, r"group must be a positive integer, got 0"),
    ({"clip_lo": 1.5}, r"clip_lo must be in \(0, 1\]"),
])
def test_bad_recipes_fail_early_naming_the_knob(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**kwargs)


# ---- real tiny checkpoints: the on-disk names transformers 5 writes ---------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    import tiny_models

    root = tmp_path_factory.mktemp("tiny_adapters")
    cache = {}

    def get(model_type, layout="native"):
        if (model_type, layout) not in cache:
            cache[model_type, layout] = tiny_models.build_tiny_checkpoint(
                model_type, root / f"{model_type}-{layout}", expert_layout=layout)
        return cache[model_type, layout]

    return get


def read_shapes(path):
    from safetensors import safe_open

    shapes = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return shapes


FAMILIES = ["qwen3_5_moe", "qwen3_5", "qwen3_next", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3",
            "deepseek_v2", "gpt_oss", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_tensor_of_a_real_checkpoint_gets_a_role_with_a_verified_axis(tiny_dirs, model_type):
    """No floating matrix is left unclassified, 1-D tensors are never quantizable, and every quantizable
    weight's contraction axis has the size of that layer's input (hidden / intermediate / head dims)."""
    import json

    path = tiny_dirs(model_type)
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)
    adapter = ma.adapter_for(config)
    roles = {}
    for name, (shape, dtype) in read_shapes(path).items():
        tr = adapter.classify(name, shape)
        roles.setdefault(tr.role, []).append(name)
        if len(shape) < 2:
            assert not tr.quantizable, name
        if tr.role == R.OTHER and dtype in ("BF16", "F32") and len(shape) >= 2:
            assert name.endswith("conv1d.weight") or name.endswith("_bias"), f"unclassified matrix {name}"
        if tr.quantizable and name.split(".")[-2] in ("gate_proj", "up_proj", "q_proj", "k_proj", "v_proj",
                                                         "gate_up_proj", "w1", "w3", "q_a_proj", "in_proj_qkv",
                                                         "in_proj_qkvz", "kv_a_proj_with_mqa", "qkv_proj"):
            assert shape[tr.axis] == text["hidden_size"], (name, shape, tr.axis)
        if tr.quantizable and name.endswith("experts.gate_up_proj"):
            assert shape[tr.axis] == text["hidden_size"], (name, shape, tr.axis)
        if tr.quantizable and name.endswith("experts.down_proj"):
            inter = text.get("moe_intermediate_size") or text["intermediate_size"]
            assert shape[tr.axis] == inter, (name, shape, tr.axis)
    is_moe = any(k in text for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    assert bool(roles.get(R.ROUTED_EXPERT)) == is_moe
    assert bool(roles.get(R.ROUTER)) == is_moe
    assert roles.get(R.NORM) and roles.get(R.EMBED) and roles.get(R.LM_HEAD)
    assert bool(roles.get(R.VISION)) == ("vision_config" in config)
    assert bool(roles.get(R.LINEAR_ATTENTION)) == ("linear_num_value_heads" in text)


@pytest.mark.parametrize("model_type,layout", [("qwen3_moe", "fused"), ("qwen3_5_moe", "fused"),
                                               ("mixtral", "fused"), ("gpt_oss", "native")])
def test_fused_3d_experts_are_routed_experts_with_the_family_axis(tiny_dirs, model_type, layout):
    import json

    path = tiny_dirs(model_type, layout)
    adapter = ma.adapter_for(json.loads((path / "config.json").read_text()))
    fused = {n: s for n, (s, _) in read_shapes(path).items() if len(s) == 3 and ".experts." in n}
    assert fused, "expected fused 3-D experts in this checkpoint"
    for name, shape in fused.items():
        tr = adapter.classify(name, shape)
        assert tr.role == R.ROUTED_EXPERT
        assert tr.axis == (-2 if model_type == "gpt_oss" else -1)
        assert math.prod(shape) > 0
