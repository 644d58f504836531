"""The calibration forward split across devices: each device runs a replica of the materialised layer on its
share of the batches, and the statistics are reduced onto the first device in batch order. Two "devices" that
are both the CPU make the split run here; the Hessians, the routed rows, the router mass and the output must
equal the one-device run exactly (the reduction adds every batch's x xᵀ in the one-device order, and each
batch's products are the same kernel on the same inputs, so no float tolerance is needed)."""
import hashlib
from pathlib import Path

import pytest
import torch

import calib_forward
import calib_quant
import quant_save
import tiny_models


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from pydoc_data import topics

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)[::3])[:60_000])
    return path


def shard_digests(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def build_capturing(src, out, calib_file, monkeypatch, devices):
    """A gptq build on `devices`; returns (meta, the statistics each stage quantized with)."""
    seen = {}
    real = calib_quant.quantize_stage

    def capture(ctx, names, linear, experts):
        for path, acc in linear.items():
            seen[path] = (acc.h.clone(), acc.n)
        for path, acc in experts.items():
            if acc.ran:
                seen[path] = (acc.hessian_sums(0, acc.num, "in"), acc.hessian_sums(0, acc.num, "mid"),
                              acc.pooled_in.clone(), acc.counts.clone(), acc.mass.clone(), acc.total)
        return real(ctx, names, linear, experts)

    monkeypatch.setattr(calib_quant, "quantize_stage", capture)
    monkeypatch.setattr(quant_save, "resolve_devices", lambda device: list(devices))
    meta = quant_save.build({"model": str(src), "out": str(out), "progress": False, "method": "gptq",
                             "calib_file": str(calib_file), "calib_tokens": 512, "calib_ctx": 64, "calib_batch": 2,
                             "min_expert_tokens": 20})
    return meta, seen


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "mixtral"])
def test_forward_split_over_two_devices_equals_one_device(tmp_path, calib_file, monkeypatch, model_type):
    src = tiny_models.build_tiny_checkpoint(model_type, tmp_path / "src", expert_layout="per_expert",
                                            byte_tokenizer=True, num_experts=6, num_local_experts=6)
    _, one = build_capturing(src, tmp_path / "one", calib_file, monkeypatch, ["cpu"])
    meta, two = build_capturing(src, tmp_path / "two", calib_file, monkeypatch, ["cpu", "cpu"])
    assert one and set(two) == set(one)
    assert any(len(v) == 6 for v in one.values()) and any(len(v) == 2 for v in one.values())  # experts and linears
    for path in one:
        assert _same(one[path], two[path]), path
    assert shard_digests(tmp_path / "two") == shard_digests(tmp_path / "one")
    stages = meta["timings"]["calibration_stage_seconds"]
    assert {"forward_stats", "forward_out", "replicate", "quantize_experts"} <= set(stages)


def test_batches_are_split_round_robin_and_recorded_outputs_land_by_batch():
    assert calib_forward.shares(5, 2) == [[0, 2, 4], [1, 3]]
    assert calib_forward.shares(1, 3) == [[0], [], []]
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    rep = calib_forward.replicate(layer, "cpu")
    assert rep is not layer and rep[0].weight.data_ptr() == layer[0].weight.data_ptr()  # same device: shared
    args = [((), {"m": torch.ones(2)}), ((), {})]
    moved = calib_forward.to_device(args, "cpu")
    assert moved[0][1]["m"] is args[0][1]["m"]


def test_reduction_adds_in_batch_order_not_device_order():
    """fp32 parts whose sum depends on the order: the reduced H is the one-device running sum bit for bit, while
    summing per device first (what a naive all-reduce does) is not."""
    from calib_accum import ForwardCache, LinearStats, reduce_linear_stats

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 8, generator=gen) * 10 ** (b % 3) for b in range(6)]
    ref = LinearStats()
    for b, x in enumerate(xs):
        ref.cache.clear(b)
        ref.hook(None, (x,))
    reps = [LinearStats(ForwardCache(), keep=True) for _ in range(2)]
    for d, batches in enumerate(calib_forward.shares(len(xs), 2)):
        for b in batches:
            reps[d].cache.clear(b)
            reps[d].hook(None, (xs[b],))
    got = reduce_linear_stats(reps, "cpu")
    assert torch.equal(got.h, ref.h) and got.n == ref.n == 96
    per_device = [sum((hh for _, hh in r.parts[1:]), r.parts[0][1].clone()) for r in reps]
    assert not torch.equal(per_device[0] + per_device[1], ref.h)


def test_refresh_copies_quantized_weights_into_a_replica_on_other_storage():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    import copy

    rep = copy.deepcopy(layer)  # what replicate gives on another device: its own storage
    with torch.no_grad():
        layer[1].weight.mul_(0).add_(3.0)
    assert not torch.equal(rep[1].weight, layer[1].weight)
    calib_forward.refresh(rep, layer)
    assert all(torch.equal(a, b) for a, b in zip(rep.parameters(), layer.parameters()))
