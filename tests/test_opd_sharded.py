"""The sharded trainer on a layer-heavy fixture: 2 ranks (gloo, frozen weights sharded) give the 1-rank loss
curve, and each rank's model-state memory is <= 0.6x the single process's.

Why another fixture: in the SmolLM2-vocab tiny MoE the embedding and LM head (49152 x 160 each) are 94 % of
the weights, and FSDP gathers those whole while they run, so no sharding can halve its peak. Here the vocab
is 512 and 32 decoder layers of 64 experts hold 99 % of the weights, as in the 122B (48 layers, embedding + head ~1 %).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src/distill/opd_train_fsdp.py"
pytestmark = pytest.mark.slow
LAYER_HEAVY = dict(vocab_size=512, hidden_size=128, num_hidden_layers=32, num_experts=64, moe_intermediate_size=128,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=128)


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(str(ROOT / d) for d in ("src/quant", "src/eval", "src/distill"))
    e["OMP_NUM_THREADS"] = "1"
    return e


def build_layer_heavy(root: Path) -> dict:
    """source (seed 0), teacher (seed 1), a quant_save student of the source, 8 random rollouts scored."""
    import opd_score
    import quant_save
    from test_opd_train import write_rollouts
    from tiny_models import build_tiny_checkpoint

    source = build_tiny_checkpoint("qwen3_moe", root / "source", seed=0, byte_tokenizer=True, **LAYER_HEAVY)
    teacher = build_tiny_checkpoint("qwen3_moe", root / "teacher", seed=1, byte_tokenizer=True, **LAYER_HEAVY)
    student = root / "student"
    assert quant_save.main(["--model", str(source), "--out", str(student), "--clip-steps", "4", "--no-progress"]) == 0
    write_rollouts(root / "rollouts.jsonl", 8, seed=0, vocab=256)
    opd_score.score(opd_score.ScoreConfig(teacher=str(teacher), rollouts=(str(root / "rollouts.jsonl"),),
                                          out=str(root / "scores"), student=str(student), k=8))
    return {"student": student, "scores": root / "scores"}


def run_train(s: dict, out: Path, nproc: int, steps: int = 2) -> dict:
    args = ["--student", str(s["student"]), "--scores", str(s["scores"]), "--out", str(out), "--steps", str(steps),
            "--batch-seqs", "4", "--micro-seqs", "1", "--lr", "1e-2", "--rank", "4", "--alpha", "8",
            "--shard-frozen", "--activation-checkpointing", "--no-progress"]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    p = subprocess.run([*launcher, str(TRAIN), *args], env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "train_log.json").read_text())


def model_state_mib(log: dict) -> list[float]:
    """Per rank: peak RSS over the run minus the RSS after imports, before any load."""
    m = log["memory"]
    return [max(step[r] for step in m["peak_rss_mib_per_step"]) - m["rss_after_imports_mib"][r]
            for r in range(log["world_size"])]


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    return build_layer_heavy(tmp_path_factory.mktemp("opd_heavy"))


def test_two_sharded_ranks_match_one_and_hold_at_most_0_6x_the_model_state(heavy, tmp_path):
    one, two = run_train(heavy, tmp_path / "one", 1), run_train(heavy, tmp_path / "two", 2)
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["memory"]["shard_frozen"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["losses"][1] != pytest.approx(two["losses"][0], rel=1e-6)  # the step did move the adapter
    m1, m2 = model_state_mib(one)[0], max(model_state_mib(two))
    print(f"model-state RSS: 1 rank {m1:.1f} MiB, 2 ranks {model_state_mib(two)} MiB (ratio {m2 / m1:.2f})")
    assert m2 <= 0.6 * m1, (one["memory"], two["memory"])
