"""Sizing and preflight at the 122B's scale: a sparse 48-layer checkpoint (real headers, no data) is sized in
seconds, a build that does not fit refuses in one line before it reads a weight, and the cost model's
flop counts do not depend on the experts' on-disk layout."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sizing
import sizing_run
import sparse_ckpt
import tiny_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sparse_122b(tmp_path_factory):
    return sparse_ckpt.write_sparse_checkpoint(tmp_path_factory.mktemp("q122") / "ckpt")


def _headers(path: Path) -> dict:
    import ckpt_source

    src = ckpt_source.open_source(str(path))
    return {t.name: tuple(t.shape) for s in src.shards for t in s.tensors}


def test_sparse_names_and_shapes_match_what_transformers_saves(tmp_path):
    """The generator at tiny dims writes exactly the tensors transformers 5.17 saves for qwen3_5_moe (per expert)."""
    tiny = tiny_models.build_tiny_checkpoint("qwen3_5_moe", tmp_path / "tiny", expert_layout="per_expert")
    text = {**{k: v for k, v in tiny_models._TEXT.items()}, **tiny_models.TINY_CONFIGS["qwen3_5_moe_text"],
            "full_attention_interval": 2, "mtp_num_hidden_layers": 0}
    vision = {**tiny_models._VISION, "in_channels": 3}
    sparse = sparse_ckpt.write_sparse_checkpoint(tmp_path / "sparse", layers=2, experts=4, vision=True,
                                                 shard_bytes=10**6)
    assert sparse_ckpt.layer_types(2, 2) == text["layer_types"]
    table = {name: shape for name, shape, _ in sparse_ckpt.tensor_table(text, vision)}
    assert table == _headers(tiny)
    assert len(list(sparse.glob("*.safetensors"))) > 1  # the reader walks a real index over several shards


def test_sparse_122b_is_full_size_on_paper_and_empty_on_disk(sparse_122b):
    files = list(sparse_122b.iterdir())
    apparent = sum(f.stat().st_size for f in files)
    on_disk = sum(f.stat().st_blocks * 512 for f in files)
    assert 240e9 < apparent < 260e9 and on_disk < 100e6
    heads = _headers(sparse_122b)
    assert heads["model.language_model.layers.47.mlp.experts.255.down_proj.weight"] == (3072, 1024)
    assert heads["lm_head.weight"] == (248320, 3072)
    assert heads["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"] == (2 * 16 * 128 + 64 * 128, 3072)
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in heads  # every 4th layer is full attention


def test_quantize_dry_run_prints_sizing_in_seconds(sparse_122b):
    env = {**os.environ, "MODEL": str(sparse_122b), "RECIPE": "configs/gptq_122b.env"}
    t0 = time.perf_counter()
    out = subprocess.run(["bash", str(ROOT / "pipelines" / "quantize.sh"), "--dry-run", "--size-for", "4xH100"],
                         capture_output=True, text=True, env=env, timeout=180)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sizing for 4xH100" in out.stdout and "calibrate + gptq" in out.stdout
    store = next(line for line in out.stdout.splitlines() if line.startswith("store:"))
    assert "of BF16" in store and " 250.2 GB BF16" in store
    assert wall < 90, f"dry run took {wall:.0f} s"


def test_real_run_refuses_in_one_line_before_reading_a_weight(sparse_122b, tmp_path):
    out_dir = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "src" / "quant" / "quant_save.py"), "--model", str(sparse_122b), "--out",
           str(out_dir), "--max-disk", "10G", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 2
    errors = [x for x in res.stderr.splitlines() if "error" in x]
    assert len(errors) == 1 and "needs 250.2 GB of disk but 10.0 GB are free" in errors[0], res.stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing written, not even the progress dir


def test_preflight_runs_before_any_weight_is_read(sparse_122b, tmp_path, monkeypatch):
    """In process: the step that reads weights is never reached when the disk is short."""
    import quant_save
    import shard_writer

    def read_attempt(*a, **k):
        raise AssertionError("a weight was read before the preflight refused")
    monkeypatch.setattr(shard_writer, "run_shards", read_attempt)
    monkeypatch.setattr(quant_save, "quantize_shard", read_attempt)
    rc = quant_save.main(["--model", str(sparse_122b), "--out", str(tmp_path / "p"), "--max-disk", "5G", "--no-progress"])
    assert rc == 2


def test_flops_do_not_depend_on_the_expert_layout():
    """Per-expert 2-D tensors and one fused [E, R, K] tensor cost the same GPTQ, Hessian and forward flops."""
    e, r, k = 8, 64, 96
    per_expert = [(f"model.layers.0.mlp.experts.{i}.{p}.weight", (r, k), r * k * 2, True, -1, True)
                  for i in range(e) for p in ("gate_proj", "up_proj")]
    fused = [("model.layers.0.mlp.experts.gate_up_proj", (e, 2 * r, k), e * 2 * r * k * 2, True, -1, True)]
    a = sizing.model_work(per_expert, tokens=1000, top_k=2, n_experts=e).layers["0"]
    b = sizing.model_work(fused, tokens=1000, top_k=2, n_experts=e).layers["0"]
    assert (a.gptq_flops, a.hessian_flops, a.hessian_bytes) == (b.gptq_flops, b.hessian_flops, b.hessian_bytes)
    assert a.gptq_flops == e * (k**3 + 2 * 2 * r * k * k)  # one Cholesky per expert, shared by gate and up


def test_check_fit_names_the_short_resource():
    stages = [sizing.Stage("x", disk_write=300e9, host_ram=20e9, gpu_mem=90e9)]
    h100x4 = sizing.Devices.parse("4xH100")
    with pytest.raises(sizing.SizingError, match=r"needs 300.0 GB of disk but 200.0 GB"):
        sizing.check_fit(stages, 200e9, 0, h100x4, "the build")
    with pytest.raises(sizing.SizingError, match=r"needs 20.0 GB of host RAM"):
        sizing.check_fit(stages, 400e9, 16e9, h100x4, "the build")
    with pytest.raises(sizing.SizingError, match=r"needs 90.0 GB per GPU"):
        sizing.check_fit(stages, 400e9, 64e9, h100x4, "the build")
    sizing.check_fit(stages, 200e9, 64e9, sizing.Devices.parse("2xH200"), "resume", existing=150e9)
    assert sizing.parse_bytes("1.5T") == 1.5e12 and sizing.parse_bytes("500G") == 5e11
    with pytest.raises(sizing.SizingError, match="--max-disk"):
        sizing.parse_bytes("lots")


def test_cost_tables_say_where_they_come_from():
    assert "ASSUMED" in sizing.load_costs("h100").source
    cpu = sizing.load_costs("cpu")
    assert "MEASURED" in cpu.source and cpu.gptq_gflops > 0 and cpu.clip_s_per_gparam > 0


@pytest.mark.parametrize("stage", ["pack", "eval", "distill"])
def test_stage_dry_runs_print_a_table(sparse_122b, stage, capsys):
    assert sizing_run.main(["--stage", stage, "--model", str(sparse_122b), "--size-for", "4xH100",
                            "--tensor-parallel-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "sizing for 4xH100" in out and "TOTAL" in out
    if stage == "eval":
        assert "62.5 GB per GPU" in out  # 250 GB of weights over TP 4


@pytest.mark.parametrize("script,env_key", [("pack_gguf.sh", "MODEL"), ("distill.sh", "OPD_STUDENT")])
def test_pipeline_dry_runs_print_sizing_and_exit(sparse_122b, script, env_key, tmp_path):
    env = {**os.environ, env_key: str(sparse_122b), "OUT": str(tmp_path / "out")}
    res = subprocess.run(["bash", str(ROOT / "pipelines" / script), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sizing for" in res.stdout and "250.2 GB" in res.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_hub_ids_are_sized_from_headers_before_the_download(tmp_path):
    calls = []

    def opener(model, revision, headers_only=False, fail_headers=False):
        calls.append(headers_only)
        if headers_only and fail_headers:
            raise RuntimeError("offline")
        return f"source({model}, headers_only={headers_only})"
    assert sizing_run.open_for_sizing(opener, "org/model", None, dry_run=False) == (
        "source(org/model, headers_only=True)", True)  # the download waits for the preflight
    offline = lambda m, r, headers_only=False: opener(m, r, headers_only, fail_headers=True)  # noqa: E731
    assert sizing_run.open_for_sizing(offline, "org/model", None, dry_run=False)[1] is False
    with pytest.raises(RuntimeError, match="offline"):
        sizing_run.open_for_sizing(offline, "org/model", None, dry_run=True)
    assert sizing_run.open_for_sizing(opener, str(tmp_path), None, dry_run=False)[1] is False


def test_calibrated_memory_counts_one_chunk_of_expert_hessians_not_every_expert():
    """The build forms routed experts' H a chunk at a time (16 on CPU, experts / GPUs on GPUs): quadrupling the
    experts adds their bf16 weights and nothing per-expert fp32 on the CPU, and a GPU's share shrinks with more GPUs."""
    r, k = 64, 96

    def layer(e):
        return [(f"model.layers.0.mlp.experts.{i}.{p}.weight", (r, k) if p != "down_proj" else (k, r),
                 r * k * 2, True, -1, True) for i in range(e) for p in ("gate_proj", "up_proj", "down_proj")]

    def ram(e, dev):
        work = sizing.model_work(layer(e), tokens=1000, top_k=2, n_experts=e)
        st = sizing.quantize_stages(work, work.source_bytes, True, 1000, k, dev, sizing.H100, batched=True)[0]
        return st.host_ram, st.gpu_mem, work.source_bytes

    cpu = sizing.Devices("cpu")
    (h64, _, b64), (h256, _, b256) = ram(64, cpu), ram(256, cpu)
    assert h256 - h64 == pytest.approx(2 * (b256 - b64))  # the bf16 layer twice (skeleton + pages); no H per expert
    _, g1, _ = ram(256, sizing.Devices("gpu", 1, 80 << 30))
    _, g4, _ = ram(256, sizing.Devices("gpu", 4, 80 << 30))
    chunk_bytes = lambda c: c * (4 * 4 * (k * k + r * r) + 6 * 4 * r * k)  # noqa: E731
    assert g1 - g4 == pytest.approx(chunk_bytes(256) - chunk_bytes(64) + 1000 * k * 4 * 3 * (1 - 1 / 4))
