"""Routed experts stored per expert (as on the hub) are quantized as [E, R, K] batches, one call per projection
kind per chunk, and scattered back: the output is byte-identical to one call per expert tensor, codes stay on
the grid, and each calibrated tensor is written to disk once."""
import hashlib
from pathlib import Path

import pytest
import torch

import quant_save
import shard_writer
import tiny_models


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from pydoc_data import topics

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)[1::2])[:100_000])
    return path


def shard_digests(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def build(src, out, calib_file, **kw):
    return quant_save.build({"model": str(src), "out": str(out), "progress": False, "method": "gptq",
                             "calib_file": str(calib_file), "calib_tokens": 512, "calib_ctx": 64,
                             "min_expert_tokens": 200, **kw})


@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "mixtral"])
def test_batched_experts_equal_unbatched_bit_for_bit(tmp_path, calib_file, model_type):
    src = tiny_models.build_tiny_checkpoint(model_type, tmp_path / "src", expert_layout="per_expert",
                                            byte_tokenizer=True, num_experts=6, num_local_experts=6)
    metas = {n: build(src, tmp_path / f"out{n}", calib_file, expert_batch=n) for n in (0, 4, 1)}
    ref = shard_digests(tmp_path / "out1")
    assert shard_digests(tmp_path / "out0") == ref and shard_digests(tmp_path / "out4") == ref
    for n, meta in metas.items():
        assert meta["experts"]
        rules = {r for rec in meta["experts"].values() for r in rec["rule"]}
        assert "blend" in rules or "pooled" in rules  # the blended statistics are exercised too
        for rec in meta["experts"].values():
            sizes = {kind: c["batch_sizes"] for kind, c in rec["calls"].items()}
            assert set(sizes) == {"gate_up_proj:gate", "gate_up_proj:up", "down_proj"}
            want = {0: [6], 4: [4, 2], 1: [1] * 6}[n]
            assert all(v == want for v in sizes.values()), (n, sizes)
    # the per-expert stats of the batched build are the unbatched ones
    a, b = metas[0]["tensor_stats"], metas[1]["tensor_stats"]
    for name in a:
        if ".experts." in name and "shared" not in name:
            assert a[name]["tokens"] == b[name]["tokens"]
            assert a[name]["proxy"] == pytest.approx(b[name]["proxy"], rel=1e-5, abs=1e-9)
            assert a[name]["proxy"] <= a[name]["proxy_clip"] * (1 + 1e-6)


def test_expert_codes_obey_the_grid(tmp_path, calib_file):
    src = tiny_models.build_tiny_checkpoint("qwen3_5_moe", tmp_path / "src", expert_layout="per_expert",
                                            byte_tokenizer=True)
    build(src, tmp_path / "out", calib_file, expert_bits=2, grid="full", group=32)
    from safetensors.torch import load_file

    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(f))
    routed = [n for n in out if ".experts." in n and "shared" not in n]
    assert routed
    for name in routed:
        groups = out[name].float().reshape(out[name].shape[0], -1, 32).reshape(-1, 32)
        levels = max(len(torch.unique(g)) for g in groups)
        assert levels <= 4, (name, levels)  # 2 bits, full grid: at most 4 levels per group


def test_each_calibrated_tensor_is_written_once(tmp_path, calib_file, monkeypatch):
    src = tiny_models.build_tiny_checkpoint("qwen3_5_moe", tmp_path / "src", expert_layout="per_expert",
                                            byte_tokenizer=True)
    writes = []
    real_write = shard_writer.InPlaceShards.write

    def write(self, name, t):
        writes.append(name)
        return real_write(self, name, t)

    monkeypatch.setattr(shard_writer.InPlaceShards, "write", write)
    meta = build(src, tmp_path / "out", calib_file)
    calibrated = {n for n, s in meta["tensor_stats"].items() if s.get("statistics")}
    assert calibrated and len(writes) == len(set(writes))  # once each
    assert calibrated <= set(writes)
    assert not (tmp_path / "out" / ".ptq_progress").exists()  # no second copy left behind either


def test_a_large_head_is_quantized_in_row_blocks_each_no_worse_than_clip(monkeypatch):
    import build_plan
    import calib_stats
    import model_adapters
    from ckpt_source import TensorEntry

    monkeypatch.setattr(calib_stats, "HEAD_SPLIT_ELEMENTS", 1000)
    monkeypatch.setattr(calib_stats, "HEAD_ROWS", 48)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 64, generator=gen).to(torch.bfloat16)
    x = torch.randn(256, 64, generator=gen)
    h = x.T @ x / 256
    recipe = model_adapters.Recipe(method="gptq", group=32)
    role = model_adapters.TensorRole(model_adapters.Role.LM_HEAD, axis=-1)
    plan = build_plan.TensorPlan(TensorEntry("lm_head.weight", "BF16", (200, 64), 0, 0), role,
                                 recipe.spec_for(role, True, 2))
    res = calib_stats.quantize_head("lm_head.weight", w, plan, recipe, h, "cpu")
    assert res.dequant.shape == w.shape and res.dequant.dtype == w.dtype
    for r0 in range(0, 200, 48):  # each block is exactly a standalone call on its rows
        part = calib_stats.weight_quant.quantize_weight("b", w[r0:r0 + 48], plan, recipe, hessian=h)
        assert torch.equal(res.dequant[r0:r0 + 48], part.dequant)
    assert res.proxy <= res.proxy_clip * (1 + 1e-6)
    levels = max(len(torch.unique(g)) for g in res.dequant.float().reshape(-1, 32))
    assert levels <= 2 ** plan.spec.bits


def test_expert_chunks_spread_over_devices_give_the_same_bytes(tmp_path, calib_file, monkeypatch):
    """Two "devices" (both the CPU here, so it runs without a GPU): chunks go round-robin to one thread each."""
    src = tiny_models.build_tiny_checkpoint("qwen3_5_moe", tmp_path / "src", expert_layout="per_expert",
                                            byte_tokenizer=True, num_experts=6)
    build(src, tmp_path / "one", calib_file, expert_batch=2)
    monkeypatch.setattr(quant_save, "resolve_devices", lambda device: ["cpu", "cpu"])
    meta = build(src, tmp_path / "two", calib_file, expert_batch=2)
    assert shard_digests(tmp_path / "two") == shard_digests(tmp_path / "one")
    for rec in meta["experts"].values():
        assert all(c["batch_sizes"] == [2, 2, 2] for c in rec["calls"].values())
