"""Tests for src/quant/gguf_pack.py (with gguf_types.py and gguf_source.py) and pipelines/pack_gguf.sh.

Fast tests check the recipe parser, the type planner (llama-quantize's rules and shape fallbacks) and the
CLI guards on small GGUFs written with gguf-py. The `llamacpp` tests run the real pipeline (convert ->
imatrix -> quantize) with the cached llama.cpp build on a tiny random qwen3_5_moe (the target
architecture; dims multiples of 256 so IQ3_XXS applies) and on the embedded SmolLM2, and read the
written files back with gguf-py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf_fixtures as gf
import gguf_intermediates as gi
import gguf_pack as gp
import gguf_source as gs
import gguf_types as gt

ROOT = Path(__file__).resolve().parents[1]
IQ3 = ROOT / "configs" / "gguf_tensor_types_iq3.txt"
Q3K = ROOT / "configs" / "gguf_tensor_types_q3k.txt"

# --------------------------------------------------------------------------------------------- helpers
def known():
    return gt.ggml_types(), gt.known_tensor_names()


def ti(name, type_="bf16", shape=(256, 256)):
    n = int(np.prod(shape))
    return gt.TensorInfo(name, type_, tuple(shape), n, n * 2)


def write_gguf(path: Path, tensors: dict[str, tuple[int, ...]], arch: str = "llama") -> Path:
    """A small GGUF with F32 tensors of the given gguf-order shapes (ne0 first), via gguf-py."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(tuple(reversed(shape)), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gguf_pack", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


# ---------------------------------------------------------------------------------------------- recipe
@pytest.mark.parametrize("recipe", [IQ3, Q3K], ids=["iq3", "q3k"])
def test_shipped_recipes_parse_and_render_without_comments(recipe):
    types, names = known()
    text = recipe.read_text()
    rules = gt.parse_recipe(text, types, names, str(recipe))
    rendered = gt.render_tensor_type_file(rules)
    assert "#" not in rendered and "\n\n" not in rendered and not rendered.startswith("\n")
    assert len(rendered.splitlines()) == len(rules) == sum(
        1 for line in text.splitlines() if line.split("#", 1)[0].strip())
    assert all(line.count("=") == 1 and " " not in line for line in rendered.splitlines())


def test_iq3_recipe_routes_each_role_to_the_documented_type():
    types, names = known()
    rules = gt.parse_recipe(IQ3.read_text(), types, names)
    tensors = [ti("token_embd.weight", shape=(256, 1000)), ti("output.weight", shape=(256, 1000)),
               ti("blk.0.ffn_gate_exps.weight", shape=(256, 512, 8)), ti("blk.0.ffn_down_exps.weight", shape=(512, 256, 8)),
               ti("blk.0.ffn_up_shexp.weight"), ti("blk.0.ffn_down_shexp.weight"),
               ti("blk.0.ffn_gate_inp.weight", "f32", (256, 8)), ti("blk.0.ffn_gate_inp_shexp.weight", "f32", (256, 1)),
               ti("blk.0.attn_qkv.weight", shape=(256, 768)), ti("blk.0.attn_gate.weight"), ti("blk.3.attn_q.weight"),
               ti("blk.3.attn_output.weight"), ti("blk.0.ssm_out.weight"), ti("blk.0.ssm_alpha.weight", shape=(256, 4)),
               ti("blk.0.ssm_a", "f32", (4,)), ti("blk.0.ssm_conv1d.weight", "f32", (4, 768)),
               ti("blk.3.attn_q_norm.weight", "f32", (64,))]
    plan = {p.name: p for p in gt.plan_types(tensors, rules, types)}
    expect = {"token_embd.weight": "q8_0", "output.weight": "q8_0", "blk.0.ffn_gate_exps.weight": "iq3_xxs",
              "blk.0.ffn_down_exps.weight": "iq3_xxs", "blk.0.ffn_up_shexp.weight": "q8_0",
              "blk.0.ffn_down_shexp.weight": "q8_0", "blk.0.ffn_gate_inp.weight": "f32",
              "blk.0.ffn_gate_inp_shexp.weight": "f32", "blk.0.attn_qkv.weight": "iq4_nl",
              "blk.0.attn_gate.weight": "iq4_nl", "blk.3.attn_q.weight": "iq4_nl", "blk.3.attn_output.weight": "iq4_nl",
              "blk.0.ssm_out.weight": "iq4_nl", "blk.0.ssm_alpha.weight": "f16", "blk.0.ssm_a": "f32",
              "blk.0.ssm_conv1d.weight": "f32", "blk.3.attn_q_norm.weight": "f32"}
    assert {n: p.expected for n, p in plan.items()} == expect
    assert plan["blk.0.ffn_gate_inp.weight"].source == "kept"  # llama-quantize never touches the router


@pytest.mark.parametrize("line,needle", [
    ("ffn_(gate|up|down)_exps=iq3_xxx", "unknown ggml type 'iq3_xxx'"),
    ("ffn_gaet_exps=iq3_xxs", "matches no GGUF tensor name"),
    ("ffn_(gate|up_exps=iq3_xxs", "not a valid regex"),
    ("ffn_down_exps iq3_xxs", "has spaces"),
    ("ffn_down_exps:iq3_xxs", "is not PATTERN=TYPE"),
    ("=q8_0", "is not PATTERN=TYPE"),
])
def test_recipe_typos_are_errors_naming_the_line(line, needle):
    types, names = known()
    text = "# a comment\n\nffn_up_shexp=q8_0\n" + line + "   # trailing comment\n"
    with pytest.raises(gt.RecipeError) as err:
        gt.parse_recipe(text, types, names, "my.txt")
    assert needle in str(err.value) and "my.txt:4" in str(err.value)


def test_empty_recipe_is_an_error():
    types, names = known()
    with pytest.raises(gt.RecipeError, match="no PATTERN=TYPE"):
        gt.parse_recipe("# only comments\n\n", types, names)


def test_first_matching_rule_wins_like_llama_quantize():
    types, names = known()
    rules = gt.parse_recipe("ffn_down_exps=q8_0\nffn_.*_exps=iq3_xxs\n", types, names)
    plan = {p.name: p for p in gt.plan_types([ti("blk.1.ffn_down_exps.weight"), ti("blk.1.ffn_up_exps.weight")],
                                             rules, types)}
    assert plan["blk.1.ffn_down_exps.weight"].expected == "q8_0"
    assert plan["blk.1.ffn_up_exps.weight"].expected == "iq3_xxs"


# ------------------------------------------------------------------------------------------ fallbacks
@pytest.mark.parametrize("type_,row,expected", [
    ("iq3_xxs", 2048, "iq3_xxs"), ("iq3_xxs", 576, "iq4_nl"), ("iq3_xxs", 100, "f16"),
    ("q3_k", 576, "q4_0"), ("q4_k", 576, "q5_0"), ("q6_k", 576, "q8_0"), ("iq4_nl", 576, "iq4_nl"),
    ("q8_0", 100, "f16"), ("f16", 100, "f16"),
])
def test_shape_fallback_follows_llama_quantize(type_, row, expected):
    got, reason = gt.shape_fallback(type_, row, gt.ggml_types())
    assert got == expected
    assert (reason is None) == (got == type_ and row % gt.ggml_types()[type_][0] == 0)


def test_fallbacks_are_planned_and_reported_against_what_was_written():
    types, names = known()
    rules = gt.parse_recipe("ffn_.*_exps=iq3_xxs\n", types, names)
    source = [ti("blk.0.ffn_up_exps.weight", shape=(576, 1536, 4)), ti("blk.0.ffn_down_exps.weight", shape=(1536, 576, 4))]
    plan = gt.plan_types(source, rules, types)
    assert [p.expected for p in plan] == ["iq4_nl", "iq3_xxs"]
    written = [ti("blk.0.ffn_up_exps.weight", "iq4_nl", (576, 1536, 4)),
               ti("blk.0.ffn_down_exps.weight", "q4_0", (1536, 576, 4))]  # second: not what llama.cpp should do
    report = gt.compare(plan, written)
    assert [(f["tensor"], f["requested"], f["actual"]) for f in report["fallbacks"]] == [
        ("blk.0.ffn_up_exps.weight", "iq3_xxs", "iq4_nl"), ("blk.0.ffn_down_exps.weight", "iq3_xxs", "q4_0")]
    assert "576" in report["fallbacks"][0]["reason"]
    assert report["prediction_mismatches"] == [{"tensor": "blk.0.ffn_down_exps.weight", "expected": "iq3_xxs",
                                                "actual": "q4_0", "source": "rule:1"}]


def test_imatrix_need_is_detected_from_the_plan():
    types, names = known()
    tensors = [ti("token_embd.weight"), ti("blk.0.ffn_up_exps.weight", shape=(256, 256, 4)), ti("blk.0.attn_q.weight")]
    iq3 = gt.plan_types(tensors, gt.parse_recipe(IQ3.read_text(), types, names), types)
    q3k = gt.plan_types(tensors, gt.parse_recipe(Q3K.read_text(), types, names), types)
    assert [p.name for p in gt.tensors_needing_imatrix(iq3, "IQ3_XXS")] == ["blk.0.ffn_up_exps.weight"]
    assert gt.tensors_needing_imatrix(q3k, "Q3_K_M") == []
    # a tensor left to the base mix needs one when the base type does
    dense = gt.plan_types([ti("blk.0.ffn_up.weight")], gt.parse_recipe(Q3K.read_text(), types, names), types)
    assert [p.name for p in gt.tensors_needing_imatrix(dense, "IQ3_XXS")] == ["blk.0.ffn_up.weight"]
    assert gt.tensors_needing_imatrix(dense, "Q3_K_M") == []


def test_summary_counts_types_and_bits_per_weight():
    written = [gt.TensorInfo("blk.0.ffn_up_exps.weight", "iq3_xxs", (256, 256, 4), 262144, 262144 * 98 // 256),
               gt.TensorInfo("token_embd.weight", "q8_0", (256, 100), 25600, 25600 * 34 // 32),
               gt.TensorInfo("blk.0.attn_norm.weight", "f32", (256,), 256, 1024)]
    s = gt.summarize(written, file_bytes=200_000)
    assert s["type_counts"] == {"f32": 1, "iq3_xxs": 1, "q8_0": 1}
    total_bits = 8 * (262144 * 98 // 256 + 25600 * 34 // 32 + 1024)
    assert s["bits_per_weight"] == pytest.approx(total_bits / (262144 + 25600 + 256))
    assert s["bits_per_weight_without_embed_output"] == pytest.approx(8 * (262144 * 98 // 256 + 1024) / (262144 + 256))
    assert s["size_gib"] == pytest.approx(200_000 / 2**30)


# ---------------------------------------------------------------------------------------- input guards
def test_dequantized_clip_input_is_refused_unless_forced(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert gs.check_input(tmp_path) is None
    (tmp_path / gs.PTQ_META).write_text("{}")
    with pytest.raises(gt.PackError, match="dequantized PTQ checkpoint.*FORCE=1"):
        gs.check_input(tmp_path)
    assert "FORCE=1" in gs.check_input(tmp_path, force=True)
    r = run_cli("check-input", tmp_path)
    assert r.returncode == 2 and "original BF16 checkpoint" in r.stderr
    assert run_cli("check-input", tmp_path, "--force").returncode == 0


def test_input_without_config_is_refused(tmp_path):
    with pytest.raises(gt.PackError, match="no config.json"):
        gs.check_input(tmp_path)


def test_tokenizer_the_converter_would_misread_is_refused_and_the_view_fixes_it(tmp_path):
    tok = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
           "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "ByteLevel"}]}}
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text(json.dumps(tok))
    assert "SentencePiece" in gs.tokenizer_conflict(src)
    r = run_cli("check-tokenizer", src)
    assert r.returncode == 2 and "bpe-view" in r.stderr
    view = gs.byte_level_bpe_view(src, tmp_path / "view")
    assert gs.tokenizer_conflict(view) is None and (view / "config.json").is_symlink()
    fixed = json.loads((view / "tokenizer.json").read_text())
    assert fixed["model"]["byte_fallback"] is False and fixed["decoder"]["type"] == "ByteLevel"
    assert fixed["pre_tokenizer"] == tok["pre_tokenizer"]  # encoding side untouched
    # a plain byte-level BPE (what HF ships for SmolLM2) or a SentencePiece-style BPE passes
    tok_ok = dict(tok, model={**tok["model"], "byte_fallback": False}, decoder={"type": "ByteLevel"})
    (src / "tokenizer.json").write_text(json.dumps(tok_ok))
    assert gs.tokenizer_conflict(src) is None
    tok_spm = dict(tok, pre_tokenizer={"type": "Metaspace"})
    (src / "tokenizer.json").write_text(json.dumps(tok_spm))
    assert gs.tokenizer_conflict(src) is None


def test_mtp_flags(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    assert gs.converter_flags(tmp_path, "drop", supports_mtp=True) == ["--no-mtp"]
    assert gs.converter_flags(tmp_path, "drop", supports_mtp=False) == []  # e.g. llama: the flag is refused
    with pytest.raises(gt.PackError, match="no mtp"):
        gs.converter_flags(tmp_path, "keep", supports_mtp=True)
    save_file({"mtp.fc.weight": torch.zeros(2, 2)}, str(tmp_path / "model-2.safetensors"))
    assert gs.converter_flags(tmp_path, "keep", supports_mtp=True) == []
    with pytest.raises(gt.PackError, match="drop or keep"):
        gs.converter_flags(tmp_path, "maybe", supports_mtp=True)


# ----------------------------------------------------------------------------------- CLI on a real GGUF
def test_tensor_types_cli_refuses_a_missing_imatrix_and_writes_a_clean_file(tmp_path):
    src = write_gguf(tmp_path / "src.gguf", {"token_embd.weight": (256, 64), "blk.0.ffn_up_exps.weight": (256, 256, 4),
                                             "blk.0.attn_norm.weight": (256,)})
    out = tmp_path / "types.txt"
    r = run_cli("tensor-types", "--recipe", IQ3, "--gguf", src, "--base-type", "IQ3_XXS", "--out", out,
                "--imatrix", tmp_path / "missing.gguf")
    assert r.returncode == 2 and "requires an importance matrix" in r.stderr and "ffn_up_exps" in r.stderr
    assert not out.exists()
    r = run_cli("tensor-types", "--recipe", Q3K, "--gguf", src, "--base-type", "Q3_K_M", "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == gt.render_tensor_type_file(gt.parse_recipe(Q3K.read_text(), *known()))
    assert "applies to no tensor" in r.stderr  # the shared recipe names roles this model lacks


def test_tensor_types_cli_rejects_a_typo(tmp_path):
    src = write_gguf(tmp_path / "src.gguf", {"blk.0.ffn_up_exps.weight": (256, 256, 4)})
    bad = tmp_path / "bad.txt"
    bad.write_text("ffn_(gate|up|down)_exps=iq3_xss\n")
    r = run_cli("tensor-types", "--recipe", bad, "--gguf", src, "--base-type", "IQ3_XXS", "--out", tmp_path / "t.txt")
    assert r.returncode == 2 and "bad.txt:1" in r.stderr and "iq3_xss" in r.stderr


def test_meta_reads_types_back_and_lists_fallbacks(tmp_path):
    # "written" file: what llama-quantize would produce for a 576-wide expert under the IQ3 recipe
    import gguf

    src = write_gguf(tmp_path / "src.gguf", {"blk.0.ffn_up_exps.weight": (576, 256, 2), "blk.0.attn_norm.weight": (576,)})
    out = tmp_path / "out.gguf"
    writer = gguf.GGUFWriter(str(out), "llama")
    q = gguf.quants.quantize(np.random.default_rng(0).standard_normal((2, 256, 576)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up_exps.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(576, dtype=np.float32))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    commands = tmp_path / "c.jsonl"
    assert run_cli("log-command", "--file", commands, "--rc", 0, "--seconds", 1.5, "--", "echo", "hi").returncode == 0
    meta_path = tmp_path / "m.json"
    r = run_cli("meta", "--gguf", out, "--source", src, "--recipe", IQ3, "--base-type", "IQ3_XXS",
                "--commands", commands, "--out", meta_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads(meta_path.read_text())
    assert meta["type_counts"] == {"f32": 1, "q8_0": 1}
    assert meta["fallbacks"][0]["tensor"] == "blk.0.ffn_up_exps.weight"
    assert meta["fallbacks"][0]["requested"] == "iq3_xxs" and meta["fallbacks"][0]["actual"] == "q8_0"
    assert meta["prediction_mismatches"][0]["expected"] == "iq4_nl"  # what llama.cpp would really have done
    assert meta["commands"] == [{"cmd": ["echo", "hi"], "rc": 0, "seconds": 1.5, "status": "ran",
                                 "end_utc": meta["commands"][0]["end_utc"]}]
    assert meta["recipe"]["text"] == IQ3.read_text() and meta["provenance"]["git_sha"]
    assert meta["bits_per_weight"] == pytest.approx(
        8 * (2 * 256 * 576 * 34 / 32 + 576 * 4) / (2 * 256 * 576 + 576))


def test_pack_script_has_help():
    r = subprocess.run(["bash", str(ROOT / "pipelines" / "pack_gguf.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "BASE_TYPE" in r.stdout and "CALIB_FILE" in r.stdout
    r = subprocess.run(["bash", str(ROOT / "pipelines" / "install_llamacpp.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "LLAMA_CPP" in r.stdout


# ------------------------------------------------------------------------------- intermediate keys
def _checkpoint(root: Path, weights: bytes = b"\x00" * 16) -> Path:
    """A checkpoint-shaped dir: config.json and one safetensors file (header + payload)."""
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"w": np.frombuffer(weights, dtype=np.uint8).copy()}, str(root / "model.safetensors"))
    return root


def test_a_stale_intermediate_is_detected_for_every_input(tmp_path):
    ckpt = _checkpoint(tmp_path / "a" / "Model")
    conv = tmp_path / "convert.py"
    conv.write_text("v1")
    target = tmp_path / "Model-BF16.gguf"
    target.write_bytes(b"gguf")

    def key(router="f16", mtp="drop", llama="11434.0.0", model=ckpt):
        return gi.intermediate_key({"router_type": router, "mtp": mtp, "llama_cpp": llama}, {"convert": str(conv)},
                                   {"model": str(model)})

    assert "has no" in gi.stale_reason(target, key())  # made before keys existed: rebuild
    gi.record_key(target, key())
    assert gi.stale_reason(target, key()) is None
    assert "router_type: f16 -> bf16" in gi.stale_reason(target, key(router="bf16"))
    assert "mtp" in gi.stale_reason(target, key(mtp="keep"))
    assert "llama_cpp" in gi.stale_reason(target, key(llama="11500.0.0"))
    other = _checkpoint(tmp_path / "b" / "Model", weights=b"\x01" * 32)  # same basename, other weights
    assert "checkpoints.model" in gi.stale_reason(target, key(model=other))
    conv.write_text("v2")
    assert "files.convert" in gi.stale_reason(target, key())
    target.unlink()
    assert "does not exist" in gi.stale_reason(target, key())


def test_rewritten_weights_with_the_same_layout_are_a_different_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path / "Model")
    before = gi.checkpoint_identity(ckpt)
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    assert gi.checkpoint_identity(ckpt) != before


def test_fresh_and_record_cli_rebuild_only_when_an_input_changed(tmp_path):
    ckpt = _checkpoint(tmp_path / "Model")
    target = tmp_path / "Model-BF16.gguf"
    target.write_bytes(b"gguf")
    args = ["--checkpoint", f"model={ckpt}", "--value", "router_type=f16"]
    assert run_cli("record", target, *args).returncode == 0
    assert run_cli("fresh", target, *args).returncode == 0 and target.exists()
    r = run_cli("fresh", target, "--checkpoint", f"model={ckpt}", "--value", "router_type=f32")
    assert r.returncode == 1 and "rebuilding" in r.stderr and "router_type: f16 -> f32" in r.stderr
    assert not target.exists() and not Path(str(target) + gi.KEY_SUFFIX).exists()  # stale file removed
    assert run_cli("record", target, *args).returncode == 2  # nothing to record


def test_pack_consults_the_keys_for_every_intermediate():
    text = (ROOT / "src" / "quant" / "gguf_run.py").read_text()
    for target in ("p.bf16", "p.mmproj", "calib", "target"):
        assert f"p.step({target}, " in text, target  # Pack.step: `fresh` before, `record` after
    for needle in ("router_type={cfg.router_type}", "mtp={cfg.mtp}", "llama_cpp={cfg.llama_cpp_version}",
                   "model={model_dir}", "bf16_inputs={p.bf16}.inputs.json", "calibration={calib}"):
        assert needle in text, needle


def test_fallbacks_reported_by_llama_quantize_are_parsed():
    # the exact format of llama-quantize's warning (src/llama-quant.cpp, tensor_type_fallback)
    line1 = ("warning: %-36s - ncols %6d not divisible by %3d (required for type %7s) -> falling back to %7s\n"
             % ("blk.0.ffn_gate.weight", 576, 256, "iq3_xxs", "iq4_nl"))
    line2 = ("warning: %-36s - ncols %6d not divisible by %3d (required for type %7s) "
             "(WARNING: must use F16 due to unusual shape) -> falling back to %7s\n"
             % ("blk.0.odd.weight", 100, 256, "q3_K", "f16"))
    got = gt.quantize_log_fallbacks("llama_model_quantize: start\n" + line1 + "[  12/ 272] other\n" + line2)
    assert got == [{"tensor": "blk.0.ffn_gate.weight", "requested": "iq3_xxs", "actual": "iq4_nl", "row_len": 576,
                    "block": 256},
                   {"tensor": "blk.0.odd.weight", "requested": "q3_k", "actual": "f16", "row_len": 100, "block": 256}]


# ------------------------------------------------------------------------------ the real pipeline (slow)
@pytest.fixture(scope="module")
def llama_prefix():
    return gf.llama_cpp_prefix()


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, smollm2_dir):
    return gf.build_tiny_qwen35_moe(tmp_path_factory.mktemp("tiny") / "tiny-qwen35-moe", smollm2_dir)


def read_back(path: Path) -> dict[str, str]:
    return {t.name: t.type for t in gp.read_gguf_tensors(path)}


def of_kind(types: dict[str, str], suffix: str) -> set[str]:
    return {t for n, t in types.items() if n.endswith(suffix)}


@pytest.mark.slow
@pytest.mark.llamacpp
def test_tiny_qwen35_moe_packs_with_the_iq3_recipe(tiny_moe, llama_prefix):
    out, meta = gf.packed("tiny-qwen35-moe", tiny_moe, llama_prefix)
    types = read_back(out / "tiny-qwen35-moe-IQ3_XXS.gguf")
    for kind in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"):
        assert of_kind(types, kind) == {"iq3_xxs"}, kind
    for kind in ("ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight"):
        assert of_kind(types, kind) == {"q8_0"}, kind
    assert of_kind(types, "ffn_gate_inp.weight") == {"f16"}  # router: ROUTER_TYPE at conversion, never quantized
    assert of_kind(types, "ffn_gate_inp_shexp.weight") == {"f32"}  # [hidden, 1]: 1-D to ggml, kept
    for kind in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_qkv.weight",
                 "attn_gate.weight", "ssm_out.weight"):
        assert of_kind(types, kind) == {"iq4_nl"}, kind
    assert of_kind(types, "ssm_alpha.weight") == of_kind(types, "ssm_beta.weight") == {"f16"}
    assert types["token_embd.weight"] == types["output.weight"] == "q8_0"
    assert not any(".nextn." in n for n in types)  # MTP=drop
    # the meta JSON says the same as the file, lists no surprise, and records how it was made
    assert meta["prediction_mismatches"] == [] and meta["fallbacks"] == [] and meta["llama_quantize_fallbacks"] == []
    assert meta["type_counts"] == {t: list(types.values()).count(t) for t in set(types.values())}
    assert 0 < meta["bits_per_weight"] < 16 and meta["size_gib"] > 0
    tools = [Path(c["cmd"][0]).name if "convert" not in " ".join(c["cmd"]) else "convert" for c in meta["commands"]]
    assert {"convert", "llama-imatrix", "llama-quantize"} <= set(tools)
    assert meta["imatrix"]["sha256"] and meta["versions"]["llama_cpp"] == "11434.0.0"
    # the vision tower went to its own file
    mmproj = out / "tiny-qwen35-moe-mmproj-f16.gguf"
    assert mmproj.is_file() and meta["mmproj"]["n_params"] > 0
    assert not any(n.startswith(("v.", "mm.")) for n in types)
    assert set(read_back(mmproj).values()) <= {"f16", "f32"}


@pytest.mark.slow
@pytest.mark.llamacpp
def test_smollm2_packs_and_lists_its_fallbacks(smollm2_dir, llama_prefix):
    out, meta = gf.packed("smollm2", smollm2_dir, llama_prefix)
    types = read_back(out / "smollm2-IQ3_XXS.gguf")
    assert types["token_embd.weight"] == "q8_0" and "output.weight" not in types  # tied embeddings
    assert of_kind(types, "attn_q.weight") == {"iq4_nl"}
    # hidden 576 is not a multiple of 256: llama-quantize falls back, and the meta JSON says so
    reported = {f["tensor"]: f for f in meta["llama_quantize_fallbacks"]}
    assert reported, "SmolLM2's 576-wide rows must fall back from the 256-block types"
    for name, fb in reported.items():
        assert fb["row_len"] % 256 != 0 and types[name] == fb["actual"]
    assert "blk.0.ffn_gate.weight" in reported and types["blk.0.ffn_gate.weight"] == "iq4_nl"
    assert meta["prediction_mismatches"] == []


@pytest.mark.slow
@pytest.mark.llamacpp
def test_pack_refuses_missing_imatrix_typo_and_dequantized_input(smollm2_dir, llama_prefix, tmp_path):
    cached, _ = gf.packed("smollm2", smollm2_dir, llama_prefix)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("smollm2-BF16.gguf", "smollm2-imatrix.gguf"):  # reuse the converted model, not the outputs
        (out / name).symlink_to(cached / name)
    calib = gf.calibration_file(tmp_path / "calib.txt")
    env = gf.pack_env(gf.packable_checkpoint(smollm2_dir), out, calib, llama_prefix, NAME="smollm2", IMATRIX="none")
    r = gf.run_pack(env)
    assert r.returncode != 0 and "requires an importance matrix" in r.stderr
    assert not (out / "smollm2-IQ3_XXS.gguf").exists()
    bad = tmp_path / "bad.txt"
    bad.write_text("ffn_(gate|up|down)_exps=iq3_xxs\nattn_(q|k|v)=iq4_nll\n")
    r = gf.run_pack({**env, "GGUF_IMATRIX": "", "GGUF_TENSOR_TYPES": str(bad)})
    assert r.returncode != 0 and "bad.txt:2" in r.stderr and "iq4_nll" in r.stderr
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text((smollm2_dir / "config.json").read_text())
    (clip / gs.PTQ_META).write_text("{}")
    r = gf.run_pack({**env, "GGUF_MODEL": str(clip), "GGUF_OUT": str(tmp_path / "o")})
    assert r.returncode != 0 and "dequantized PTQ checkpoint" in r.stderr and not (tmp_path / "o").exists()


def _statuses(out: Path, stem: str) -> dict:
    """{step: ran|reused} from the commands JSONL of the last pack_gguf.sh run."""
    out_status = {}
    for line in (out / f"{stem}-IQ3_XXS.commands.jsonl").read_text().splitlines():
        rec = json.loads(line)
        text = " ".join(rec["cmd"])
        step = ("bf16" if "BF16.gguf" in text and ("gguf_convert" in text or rec["cmd"][0] == "reuse") else
                "imatrix" if "imatrix" in text and "llama-quantize" not in text else None)
        if step:
            out_status[step] = rec["status"]
    return out_status


@pytest.mark.slow
@pytest.mark.llamacpp
def test_a_stale_gguf_intermediate_is_rebuilt(tmp_path, smollm2_dir, llama_prefix):
    """The real pipeline on a tiny llama: a rerun reuses the BF16 GGUF and the imatrix; another ROUTER_TYPE
    and another checkpoint under the same directory name rebuild them (and the imatrix made from them)."""
    import tiny_models

    dims = dict(hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=49152)
    a = gf.packable_checkpoint(tiny_models.build_tiny_checkpoint("llama", tmp_path / "a" / "Model", seed=0,
                                                         tokenizer_dir=smollm2_dir, **dims))
    b = gf.packable_checkpoint(tiny_models.build_tiny_checkpoint("llama", tmp_path / "b" / "Model", seed=1,
                                                         tokenizer_dir=smollm2_dir, **dims))
    assert a.name == b.name  # same basename, other weights
    out, calib = tmp_path / "out", gf.calibration_file(tmp_path / "calib.txt")

    def pack(model, **env):
        proc = gf.run_pack(gf.pack_env(model, out, calib, llama_prefix, IMATRIX_CHUNKS=2, **env))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _statuses(out, a.name), proc.stderr

    assert pack(a)[0] == {"bf16": "ran", "imatrix": "ran"}
    assert pack(a)[0] == {"bf16": "reused", "imatrix": "reused"}
    got, err = pack(b, ROUTER_TYPE="f32")  # each change alone is covered by the fast stale_reason test
    assert got == {"bf16": "ran", "imatrix": "ran"}
    assert "router_type: f16 -> f32" in err and "checkpoints.model" in err
    meta = json.loads((out / f"{a.name}-IQ3_XXS.meta.json").read_text())
    assert meta["source_gguf"]["path"].endswith(f"{a.name}-BF16.gguf")


@pytest.mark.slow
@pytest.mark.llamacpp
def test_smollm2_moe_fixture_packs_and_answers_through_llama_server(llama_prefix):
    """The real-weight qwen2_moe fixture goes through the whole pipeline (convert -> imatrix -> quantize with
    the recipe) and the packed GGUF answers a completion through llama-server."""
    import urllib.request

    import embedded_model
    import llamacpp_server as ls

    moe = embedded_model.resolve("embedded:smollm2-moe", log=lambda m: None)
    out, meta = gf.packed("smollm2-moe", moe, llama_prefix)
    gguf = out / "smollm2-moe-IQ3_XXS.gguf"
    types = read_back(gguf)
    n_layers = json.loads((moe / "config.json").read_text())["num_hidden_layers"]
    for kind in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_shexp.weight",
                 "ffn_down_shexp.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"):
        assert sum(n.endswith(kind) for n in types) == n_layers, kind  # every layer is a qwen2moe block
    assert of_kind(types, "ffn_gate_inp.weight") == {"f16"}  # the router: ROUTER_TYPE, never quantized
    assert of_kind(types, "ffn_down_shexp.weight") == {"q8_0"}
    assert types["output.weight"] == types["token_embd.weight"] == "q8_0"  # the stored lm_head is packed
    # expert rows are 576 (gate/up) and 128 (down) wide, not whole 256-blocks: llama-quantize falls back,
    # and the meta JSON reports each fallback as the file holds it
    reported = {f["tensor"]: f for f in meta["llama_quantize_fallbacks"]}
    assert "blk.0.ffn_down_exps.weight" in reported
    for name, fb in reported.items():
        assert fb["row_len"] % 256 != 0 and types[name] == fb["actual"]
    assert meta["prediction_mismatches"] == []
    cfg = ls.ServerConfig(binary=ls.find_binary(llama_prefix), model=gguf, ctx_size=256, threads=2,
                          log_path=out / "server-test.log")
    with ls.LlamaServer(cfg) as server:
        body = json.dumps({"prompt": "The capital of France is", "n_predict": 8, "temperature": 0.0}).encode()
        req = urllib.request.Request(server.base_url + "/completion", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read().decode())
    assert answer["tokens_predicted"] > 0 and answer["content"].strip(), answer
