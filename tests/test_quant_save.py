"""The streaming builder on tiny random checkpoints of each family: structure, protected tensors, quant
properties, error vs absmax, loadability, resume after SIGKILL, and one-line errors on bad input.

Expected axes and bits are derived here from the config and tensor names, independently of the adapters,
so a wrong adapter axis or role fails these tests.
"""
import hashlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moe_quant
import quant_save
import tiny_models

ROOT = Path(__file__).resolve().parents[1]
QUANT_SAVE = ROOT / "src" / "quant" / "quant_save.py"
RECIPE = dict(expert_bits=3.0, linear_bits=4.0, group=128, clip_steps=16)
# Names that must come out bit-identical: routers, norms, vision, SSM scalars/conv, biases, sinks, mtp (16 bits).
PROTECTED = re.compile(r"(norm|\.(mlp|block_sparse_moe)\.gate\.|shared_expert_gate|\.router\.|visual\.|A_log|dt_bias|conv1d|bias$|"
                       r"sinks$|^mtp\.)")


def quantize(src: Path, out: Path, **overrides) -> dict:
    return quant_save.build({"model": str(src), "out": str(out), "progress": False, **RECIPE, **overrides})


def headers(path: Path) -> dict:
    """name -> (shape, dtype, shard file) over every shard of a checkpoint dir."""
    found = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                found[k] = (tuple(sl.get_shape()), sl.get_dtype(), f.name)
    return found


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def expected_axis(name: str, shape: tuple, text_cfg: dict) -> int:
    """Contraction axis from the config alone: 2-D Linear -> -1; fused 3-D -> the axis of the input size."""
    if len(shape) == 2:
        return -1
    hidden = text_cfg["hidden_size"]
    inter = text_cfg.get("moe_intermediate_size") or text_cfg["intermediate_size"]
    want = hidden if name.endswith("gate_up_proj") else inter
    axes = [a for a in (-1, -2) if shape[a] == want]
    assert len(axes) == 1, f"test dims make the axis of {name} {shape} ambiguous"
    return axes[0]


def expected_bits(name: str) -> float:
    return 3.0 if (".experts." in name and "shared_expert" not in name) else 4.0


def check_groups(dq: torch.Tensor, bits: float, axis: int, group: int) -> None:
    """Each group along `axis`: <= 2^bits - 1 distinct values, all (integer <= qmax) x one scale (bf16 rounding)."""
    qmax = moe_quant.qmax_for_bits(bits)
    rows = dq.float().movedim(axis, -1).reshape(-1, dq.shape[axis])
    for g0 in range(0, rows.shape[1], group):
        block = rows[:, g0:g0 + group]
        srt = block.sort(dim=1).values
        distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)
        assert int(distinct.max()) <= 2 ** int(bits) - 1, f"{int(distinct.max())} levels in a {bits}-bit group"
        scale = block.abs().amax(dim=1, keepdim=True) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(block / safe)
        assert int(codes.abs().max()) <= qmax
        off = (block - codes * scale).abs()
        assert bool((off <= 2 ** -7 * block.abs() + 1e-12).all()), "values are not integer multiples of one scale"


def file_digests(path: Path, exclude=("_ptq_meta.json",)) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.is_file() and p.name not in exclude}


# ------------------------------------------------------------------------------- family checkpoints
CASES = [("qwen3_5_moe", "native"), ("qwen3_5_moe", "fused"), ("qwen3_moe", "native"), ("qwen3_moe", "fused"),
         ("mixtral", "native"), ("olmoe", "native"), ("deepseek_v3", "native"), ("gpt_oss", "native"),
         ("llama", "native"), ("qwen3_next", "native")]


def add_mtp_tensors(path: Path, hidden: int) -> None:
    """The hub's Qwen3.5 checkpoints carry mtp.* weights transformers does not load; add some by hand."""
    state = tensors(path)
    gen = torch.Generator().manual_seed(7)
    state["mtp.fc.weight"] = (0.02 * torch.randn(hidden, 2 * hidden, generator=gen)).bfloat16()
    state["mtp.norm.weight"] = torch.randn(hidden, generator=gen).bfloat16()
    state["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = (0.02 * torch.randn(96, hidden, generator=gen)).bfloat16()
    tiny_models.write_checkpoint(state, path, max_shard_bytes=400_000)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_save")
    cache = {}

    def get(model_type, layout):
        if (model_type, layout) not in cache:
            src = tiny_models.build_tiny_checkpoint(model_type, root / f"{model_type}-{layout}-src",
                                                    expert_layout=layout, max_shard_size="400KB")
            if model_type == "qwen3_5_moe" and layout == "native":
                add_mtp_tensors(src, hidden=160)
            before = file_digests(src)
            meta = quantize(src, root / f"{model_type}-{layout}-out")
            assert file_digests(src) == before, "the builder modified its input"
            cache[model_type, layout] = (src, root / f"{model_type}-{layout}-out", meta)
        return cache[model_type, layout]

    return get


@pytest.mark.parametrize("model_type,layout", CASES, ids=[f"{m}-{l}" for m, l in CASES])
def test_output_matches_source_structure_and_quant_properties(built, model_type, layout):
    src, out, meta = built(model_type, layout)
    src_h, out_h = headers(src), headers(out)
    assert out_h == src_h  # same names, shapes, dtypes, shard files
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    if (src / "model.safetensors.index.json").exists():
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == {k: v[2] for k, v in src_h.items()}
        assert index["metadata"]["total_size"] == sum(
            p.stat().st_size for p in out.glob("*.safetensors")) - sum(_header_len(p) for p in out.glob("*.safetensors"))
    else:
        assert not (out / "model.safetensors.index.json").exists()
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()

    config = json.loads((src / "config.json").read_text())
    text_cfg = config.get("text_config", config)
    a, b = tensors(src), tensors(out)
    n_protected = n_quantized = 0
    for name, w in a.items():
        dq = b[name]
        if PROTECTED.search(name) or w.ndim < 2:
            assert torch.equal(w.view(torch.uint8), dq.view(torch.uint8)), name
            n_protected += 1
            continue
        n_quantized += 1
        bits, axis = expected_bits(name), expected_axis(name, tuple(w.shape), text_cfg)
        assert not torch.equal(w, dq), f"{name} was not quantized"
        check_groups(dq, bits, axis, RECIPE["group"])
        absmax = moe_quant.fake_quant(w, moe_quant.QuantSpec(bits, group=128, clip_steps=0), axis)
        assert moe_quant.quant_error(w, dq) <= moe_quant.quant_error(w, absmax), f"{name}: clip search worse than absmax"
    assert n_protected and n_quantized
    roles = meta["footprint"]["roles"]
    assert sum(r["tensors"] for r in roles.values()) == len(a)
    assert sum(r["quantized_tensors"] for r in roles.values()) == n_quantized
    assert 3.0 < meta["footprint"]["total"]["effective_bits_quantized"] < 4.3
    if model_type in ("qwen3_5_moe",):
        assert roles["vision"]["quantized_tensors"] == 0 and roles["vision"]["tensors"] > 0
    if layout == "native" and model_type == "qwen3_5_moe":
        assert roles["mtp"]["tensors"] == 3 and roles["mtp"]["quantized_tensors"] == 0


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("model_type,layout", CASES, ids=[f"{m}-{l}" for m, l in CASES])
def test_output_loads_in_transformers_with_finite_logits(built, model_type, layout):
    import transformers

    src, out, _ = built(model_type, layout)
    cls = (getattr(transformers, tiny_models.MULTIMODAL[model_type][1]) if model_type in tiny_models.MULTIMODAL
           else transformers.AutoModelForCausalLM)
    model, info = cls.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]  # a missing key would be silently random-initialised
    teacher = cls.from_pretrained(src, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 200, 33, 7]])
    with torch.no_grad():
        logits, ref = model(input_ids=ids).logits.float(), teacher(input_ids=ids).logits.float()
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, ref)  # the quantized weights are the ones in use
    assert torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0) > 0.5


# ----------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def multishard(tmp_path_factory):
    """~11 MB over ~6 shards of ~1M weights: each shard takes long enough (~0.1 s) to kill the builder between them."""
    root = tmp_path_factory.mktemp("resume")
    src = tiny_models.build_tiny_checkpoint(
        "qwen3_moe", root / "src", max_shard_size="2MB", hidden_size=256, head_dim=64, num_hidden_layers=6,
        num_experts=4, moe_intermediate_size=256)
    reference = root / "reference"
    quantize(src, reference)
    return root, src, reference


def comparable_meta(path: Path) -> dict:
    meta = json.loads((path / "_ptq_meta.json").read_text())
    return {k: v for k, v in meta.items() if k not in ("timings", "provenance")}


def assert_same_build(a: Path, b: Path) -> None:
    assert file_digests(a) == file_digests(b)
    assert comparable_meta(a) == comparable_meta(b)
    assert not (b / quant_save.PROGRESS_DIR).exists()


def test_killed_build_resumes_to_byte_identical_output(multishard):
    root, src, reference = multishard
    n_shards = len(list(src.glob("*.safetensors")))
    assert n_shards >= 4
    out = root / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / "src" / d) for d in ("quant", "eval", "distill"))}
    cmd = [sys.executable, str(QUANT_SAVE), "--model", str(src), "--out", str(out), "--no-progress",
           *[f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = out / quant_save.PROGRESS_DIR
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(progress.glob("*.done.json")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(progress.glob("*.done.json"))
    assert not (out / "_ptq_meta.json").exists(), "builder finished before it could be killed; make shards bigger"
    assert 1 <= len(done) < n_shards

    assert quant_save.main(["--model", str(src), "--out", str(out), "--no-progress",
                            *[f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()]]) == 0
    meta = json.loads((out / "_ptq_meta.json").read_text())
    assert len(meta["timings"]["resumed_shards"]) == len(done)  # the completed shards were reused, not redone
    assert_same_build(reference, out)


class Interrupt(Exception):
    pass


def interrupted_build(src: Path, out: Path, monkeypatch, after: int, **recipe) -> None:
    """Run the builder until `after` shards are written, then crash inside the next one, mid-write."""
    real = quant_save.quantize_shard
    calls = []

    def crash(n_bytes):
        raise Interrupt()

    def flaky(shard, rows, out_path, tmp_path, device, on_bytes, **kw):
        calls.append(shard.file)
        return real(shard, rows, out_path, tmp_path, device, crash if len(calls) > after else on_bytes, **kw)

    monkeypatch.setattr(quant_save, "quantize_shard", flaky)
    with pytest.raises(Interrupt):
        quantize(src, out, **recipe)
    monkeypatch.setattr(quant_save, "quantize_shard", real)
    assert not (out / "_ptq_meta.json").exists()
    assert len(calls) == after + 1
    assert not list(out.glob(f"{quant_save.PROGRESS_DIR}/*.partial"))  # the crashed shard left no temp file
    assert not (out / calls[-1]).exists() and all((out / f).exists() for f in calls[:-1])


def test_a_recipe_change_never_reuses_old_shards(multishard, monkeypatch, tmp_path):
    _, src, _ = multishard
    out = tmp_path / "out"
    interrupted_build(src, out, monkeypatch, after=2, expert_bits=4.0)
    meta = quantize(src, out)  # the shipped 3/4 recipe
    assert meta["timings"]["resumed_shards"] == []
    assert_same_build(multishard[2], out)


def test_a_tampered_completed_shard_is_redone(multishard, monkeypatch, tmp_path):
    _, src, reference = multishard
    out = tmp_path / "out"
    interrupted_build(src, out, monkeypatch, after=2)
    first = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    meta = quantize(src, out)
    assert first.name not in meta["timings"]["resumed_shards"] and len(meta["timings"]["resumed_shards"]) == 1
    assert_same_build(reference, out)


def test_rerun_of_a_complete_build_is_a_no_op_and_other_recipes_need_force(multishard, tmp_path):
    _, src, reference = multishard
    meta = quantize(src, reference)
    assert meta == json.loads((reference / "_ptq_meta.json").read_text())
    with pytest.raises(quant_save.BuildError, match="different source/recipe"):
        quantize(src, reference, linear_bits=8.0)


# ------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    return tiny_models.build_tiny_checkpoint("llama", tmp_path_factory.mktemp("bad") / "src")


def _corrupt(src: Path, tmp: Path, how: str) -> Path:
    bad = tmp / f"bad-{how}"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "model.safetensors"
    if how == "no-config":
        (bad / "config.json").unlink()
    elif how == "no-safetensors":
        shard.unlink()
    elif how == "garbage-shard":
        shard.write_bytes(b"this is not a safetensors file at all")
    elif how == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:-1000])
    return bad


@pytest.mark.parametrize("case,args,message", [
    ("bits", ["--expert-bits", "3.5"], "expert-bits: bits must be one of"),
    ("linear-bits", ["--linear-bits", "7"], "linear-bits: bits must be one of"),
    ("group", ["--group", "0"], "group must be a positive integer, got 0"),
    ("no-config", [], "missing config.json"),
    ("no-safetensors", [], "no *.safetensors files"),
    ("garbage-shard", [], "unreadable shard"),
    ("truncated-shard", [], "unreadable shard"),
    ("out-inside-input", [], "is inside the input"),
    ("out-is-input", [], "is inside the input"),
    ("missing-model", [], "no such directory"),
    ("foreign-out", [], "is not empty and holds no quant_save build"),
    ("no-out", [], "--out is required"),
    ("bad-device", ["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_input_gives_one_error_line_and_writes_nothing(small_src, tmp_path, capsys, case, args, message):
    src = small_src
    out = tmp_path / "out"
    if case in ("no-config", "no-safetensors", "garbage-shard", "truncated-shard"):
        src = _corrupt(small_src, tmp_path, case)
    if case == "out-inside-input":
        out = src / "quantized"
    if case == "out-is-input":
        out = src
    if case == "missing-model":
        src = tmp_path / "does-not-exist"
    if case == "foreign-out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = file_digests(src) if src.exists() else None
    argv = ["--model", str(src), "--no-progress", *args] + ([] if case == "no-out" else ["--out", str(out)])
    rc = quant_save.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("quant_save: error:") and message in err[0], err
    assert not (out / "_ptq_meta.json").exists()
    if case != "foreign-out" and case != "out-is-input":
        assert not out.exists()
    if before is not None:
        assert file_digests(src) == before


def test_dry_run_prints_roles_and_footprint_and_writes_nothing(small_src, tmp_path, capsys):
    out = tmp_path / "never"
    assert quant_save.main(["--model", str(small_src), "--out", str(out), "--dry-run", "--list-tensors"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "LlamaAdapter" in text or "DenseAdapter" in text
    for role in ("attention", "dense_mlp", "embed", "lm_head", "norm", "TOTAL"):
        assert role in text
    assert re.search(r"dense_mlp\s+4 axis -1\s+BF16\s+\[200, 160\]", text)


def test_cli_help_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src" / "quant")}
    res = subprocess.run([sys.executable, str(QUANT_SAVE), "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "--expert-bits" in res.stdout and "--dry-run" in res.stdout


# ------------------------------------------------------------------------------------------- vLLM
VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="bfloat16", max_model_len=128, enforce_eager=True, seed=0)
    out = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=8, temperature=0.0))
    print("RESULT " + json.dumps({"tokens": list(out[0].outputs[0].token_ids), "text": out[0].outputs[0].text}))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_dequantized_qwen3_moe_generates_in_vllm(smollm2_dir, tmp_path):
    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    src = tiny_models.build_tiny_checkpoint("qwen3_moe", tmp_path / "src", tokenizer_dir=smollm2_dir,
                                            vocab_size=vocab, head_dim=64, bos_token_id=1, eos_token_id=2)
    out = tmp_path / "out"
    quantize(src, out)
    assert (out / "tokenizer.json").exists()
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env, timeout=600)
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert len(result["tokens"]) == 8 and all(0 <= t < vocab for t in result["tokens"])


# ------------------------------------------------------------------------------ pipeline + recipes
def recipe_values(recipe: str) -> dict:
    """The values a configs/*.env recipe sets, as quant_config reads them (with an empty environment)."""
    import tool_config

    return {k: v for k, (v, _line) in tool_config.read_recipe(ROOT / recipe, {"MOE_LOWBIT_MODELS": "/m"}).items()}


def test_every_recipe_key_is_a_quant_config_field():
    """configs/*.env quant recipes and quant_config.QuantConfig cannot drift: every key is a field."""
    import quant_config

    for recipe in ("configs/clip_122b.env", "configs/gptq_122b.env", "configs/smoke.env", "configs/smoke_moe_quant.env"):
        cfg = quant_config.from_recipe(ROOT / recipe, environ={})
        assert cfg.expert_bits == 3.0 and cfg.linear_bits == 4.0, recipe
    names = {f.name.upper() for f in dataclasses.fields(quant_config.QuantConfig)}
    assert set(recipe_values("configs/gptq_122b.env")) <= names


def test_shipped_recipe_is_the_builder_default():
    shipped = recipe_values("configs/clip_122b.env")
    assert shipped["MODEL"] == "Qwen/Qwen3.5-122B-A10B" and shipped["OUT"] == "/m/q122_ptq3b_clip"
    assert shipped["DEVICE"] == "cuda"
    defaults = quant_save.BuildConfig(model="x")
    for key in ("expert_bits", "linear_bits", "mtp_bits", "clip_lo"):
        assert float(shipped[key.upper()]) == getattr(defaults.recipe, key), key
    for key in ("group", "clip_steps"):
        assert int(shipped[key.upper()]) == getattr(defaults.recipe, key), key
    smoke = recipe_values("configs/smoke.env")
    assert (smoke["MODEL"], smoke["CLIP_STEPS"], smoke["LINEAR_BITS"], smoke["DEVICE"]) == (
        "embedded:smollm2", "8", "4.0", "cpu")


def test_pipeline_passes_recipe_and_environment_overrides_to_the_builder(small_src, tmp_path):
    env = {**os.environ, "MOE_LOWBIT_VENV": sys.prefix, "RECIPE": "configs/smoke.env", "MODEL": str(small_src),
           "OUT": str(tmp_path / "out"), "LINEAR_BITS": "8"}
    res = subprocess.run(["bash", str(ROOT / "pipelines" / "quantize.sh"), "--dry-run"], capture_output=True,
                         text=True, env=env, timeout=300)  # smoke.env's bits plan names SmolLM2's 30 layers
    assert res.returncode == 2 and "configs/plans/smollm2_smoke.json names tensor" in res.stderr, res.stderr[-2000:]
    env["BITS_PLAN"] = ""  # the recipe's plan is overridable like every other knob
    res = subprocess.run(["bash", str(ROOT / "pipelines" / "quantize.sh"), "--dry-run"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    recipe = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("recipe: "))[len("recipe: "):])
    assert {k: recipe[k] for k in ("expert_bits", "linear_bits", "mtp_bits", "group", "clip_steps", "clip_lo")} == {
        "expert_bits": 3.0, "linear_bits": 8.0, "mtp_bits": 16.0, "group": 32, "clip_steps": 8, "clip_lo": 0.65}
    assert (recipe["method"], recipe["role_bits"], recipe["act_order"]) == ("gptq", {"embed": 8.0}, True)  # smoke.env
    assert not (tmp_path / "out").exists()
    res = subprocess.run(["bash", str(ROOT / "pipelines" / "quantize.sh"), "--dry-run"], capture_output=True,
                         text=True, env={**env, "METHOD": "awq", "ROLE_BITS": "lm_head=8", "GRID": "asym"}, timeout=300)
    recipe = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("recipe: "))[len("recipe: "):])
    assert (recipe["method"], recipe["role_bits"], recipe["grid"]) == ("awq", {"lm_head": 8.0}, "asym")  # smoke.env: full
    probe = subprocess.run(["bash", str(ROOT / "pipelines" / "quantize.sh")], capture_output=True, text=True,
                           env={**env, "PROBE": "1"}, timeout=60)
    assert probe.returncode != 0 and "--probe needs --probe-calib FILE" in probe.stderr
    assert "PROBE is deprecated; use QUANT_PROBE" in probe.stderr
