"""OPD on a tiny real checkpoint: scorer alignment, merged logits == training logits, kill -9 resume,
FSDP2 2 processes == 1 process, and the bad-input errors.

Fixture: two tiny random qwen3_moe checkpoints with the SmolLM2 tokenizer (seed 0 = the student's source,
seed 1 = a different "teacher", so the divergences are far from 0), a real quant_save student built from
seed 0 through its CLI, and rollouts of random tokens (the trainer never assumes they are fluent).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import atomic_io
import opd_data
import opd_score
import quant_save

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src/distill/opd_train_fsdp.py"
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(ROOT / d) for d in ("src/quant", "src/eval", "src/distill"))
    env["OMP_NUM_THREADS"] = "1"
    return env


def write_rollouts(path: Path, n: int, seed: int, vocab: int = 49152) -> None:
    rng = random.Random(seed)
    jsonl = opd_data.ResumableJsonl(path, opd_data.header_for("opd-rollouts", {"model": "test", "seed": seed}))
    jsonl.open(fresh=True)
    recs = []
    for i in range(n):
        samples = [{"completion_ids": [rng.randrange(vocab) for _ in range(rng.randint(5, 12))], "text": "",
                    "finish_reason": "stop" if i % 3 else "length", "n_tokens": 0}]
        recs.append({"key": f"p{i}", "prompt_ids": [1] + [rng.randrange(vocab) for _ in range(rng.randint(2, 6))],
                     "n_sampled": 1, "n_truncated": 0, "samples": samples})
    jsonl.append(recs)
    atomic_io.write_json(opd_data.complete_marker(path), {"prompts": n})


@pytest.fixture(scope="module")
def opd_setup(smollm2_dir, tmp_path_factory):
    import smoke_models

    root = tmp_path_factory.mktemp("opd")
    source = smoke_models.tiny_moe_dir(smollm2_dir, seed=0, log=lambda m: None)
    teacher = smoke_models.tiny_moe_dir(smollm2_dir, seed=1, log=lambda m: None)
    student = root / "student"
    assert quant_save.main(["--model", str(source), "--out", str(student), "--clip-steps", "4", "--no-progress"]) == 0
    rollouts = root / "rollouts.jsonl"
    write_rollouts(rollouts, 8, seed=0)
    scores = root / "scores"
    opd_score.score(opd_score.ScoreConfig(teacher=str(teacher), rollouts=(str(rollouts),), out=str(scores),
                                          student=str(student), k=8, shard_size=3))
    return {"root": root, "source": source, "teacher": teacher, "student": student, "rollouts": rollouts,
            "scores": scores}


def train_args(s, out, *extra):
    return ["--student", str(s["student"]), "--scores", str(s["scores"]), "--out", str(out), "--steps", "4",
            "--batch-seqs", "4", "--micro-seqs", "1", "--lr", "5e-2", "--rank", "4", "--alpha", "8",
            "--lora-roles", "routed_expert,attention", "--save-every", "1", "--no-progress", *extra]


def test_scores_are_the_teacher_forced_distribution_for_the_next_token(opd_setup):
    from transformers import AutoModelForCausalLM

    _, records = opd_data.read_rollouts(opd_setup["rollouts"])
    items = opd_data.flatten_samples(records)
    index, by_uid = opd_score.load_scores(opd_setup["scores"])
    assert index["k"] == 8 and len(by_uid) == len(items) and len(index["shards"]) == 3
    model = AutoModelForCausalLM.from_pretrained(str(opd_setup["teacher"]), dtype=torch.float32).eval()
    for it in items[:3]:
        seq = torch.tensor([it["prompt_ids"] + it["completion_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
        P, C = len(it["prompt_ids"]), len(it["completion_ids"])
        stored = by_uid[it["uid"]]
        rows = logp[P - 1:P - 1 + C]  # position P-1+i predicts completion token i
        assert torch.allclose(stored["target_logp"], rows.gather(-1, torch.tensor(it["completion_ids"])[:, None])[:, 0],
                              atol=1e-4)
        assert torch.allclose(stored["topk_logp"], rows.topk(8, -1).values, atol=1e-4)
        assert torch.equal(stored["topk_ids"].long(), rows.topk(8, -1).indices)
        rest = torch.logsumexp(rows.scatter(-1, rows.topk(8, -1).indices, float("-inf")), -1)
        assert torch.allclose(stored["rest_logp"], rest, atol=1e-4)
        shifted = logp[P:P + C - 1]  # the upstream off-by-one: must NOT match
        assert not torch.allclose(stored["topk_logp"][:C - 1], shifted.topk(8, -1).values, atol=1e-3)


def test_merged_checkpoint_logits_equal_the_training_forward(opd_setup, tmp_path):
    import merge_adapter
    import opd_model
    import opd_train_fsdp
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert opd_train_fsdp.main(train_args(opd_setup, run)) == 0
    log = json.loads((run / "train_log.json").read_text())
    assert log["steps"] == 4 and log["tokens_trained"] > 0
    rec = merge_adapter.merge(run, tmp_path / "merged")
    assert rec["same_names_shapes_dtypes_shards"] and rec["same_footprint"] and rec["tensors"]["changed"] > 0
    # the training forward with the trained adapter loaded ...
    root, targets, mods = opd_model.build_student(opd_setup["student"], opd_setup["source"],
                                                  ("routed_expert", "attention"), 4, 8.0, 0, torch.float32,
                                                  )
    model = root.lm
    ad = load_file(str(run / "adapter.safetensors"))
    with torch.no_grad():
        for name, m in mods.items():
            m.A.copy_(ad[f"{name}::A"])
            m.B.copy_(ad[f"{name}::B"])
    ids = torch.tensor([[1, 200, 3000, 45, 9, 777, 12, 5]])
    with torch.no_grad():
        train_logits = model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        merged_logits = merged(input_ids=ids).logits
        student = AutoModelForCausalLM.from_pretrained(str(opd_setup["student"]), dtype=torch.float32).eval()
        student_logits = student(input_ids=ids).logits
    assert torch.allclose(train_logits, merged_logits, atol=2e-2, rtol=2e-2)  # bf16 tolerance (in fact equal)
    assert not torch.allclose(student_logits, merged_logits, atol=1e-3)  # and training did change the model


def test_killed_training_resumes_with_the_same_loss_curve(opd_setup, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    args = train_args(opd_setup, "{}", "--steps", "6")
    cmd = lambda out: [sys.executable, str(TRAIN), *[a.replace("{}", str(out)) for a in args]]
    subprocess.run(cmd(ref), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        state = killed / "state.pt"
        if state.is_file():
            try:
                if torch.load(state, weights_only=False)["step"] >= 2:
                    break
            except Exception:  # being replaced right now
                pass
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "train_log.json").exists()
    out = subprocess.run(cmd(killed), env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming" in out.stderr
    a = json.loads((ref / "train_log.json").read_text())
    b = json.loads((killed / "train_log.json").read_text())
    assert b["resumed_from_step"] >= 2
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5, abs=1e-7)
    # resume with another hyperparameter is refused, naming the fix
    bad = subprocess.run([*cmd(killed), "--lr", "1e-3"], env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and f"delete {killed} or pass --fresh" in bad.stderr and "lr" in bad.stderr


def test_fsdp2_two_processes_give_the_one_process_loss(opd_setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = train_args(opd_setup, "{}", "--steps", "2")
    subprocess.run([sys.executable, str(TRAIN), *[a.replace("{}", str(one)) for a in args]], check=True, env=_env(),
                   capture_output=True)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(TRAIN), *[a.replace("{}", str(two)) for a in args]], env=_env(), capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    a = json.loads((one / "train_log.json").read_text())
    b = json.loads((two / "train_log.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4)
    assert b["losses"][1] != pytest.approx(b["losses"][0], rel=1e-6)  # the step did move the adapter


def test_bad_inputs_get_one_line_errors(opd_setup, tmp_path, capsys):
    import opd_gen
    import opd_train_fsdp
    from tiny_models import build_tiny_checkpoint

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert opd_gen.main(["--model", str(opd_setup["student"]), "--prompts", str(empty), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "no prompts" in capsys.readouterr().err
    # a teacher with another vocabulary
    other = tmp_path / "other"
    build_tiny_checkpoint("qwen3_moe", other)
    with pytest.raises(opd_data.OpdInputError, match="vocab_size"):
        opd_data.check_same_vocab(other, opd_setup["student"])
    # a student that is not a quant_save output
    assert opd_train_fsdp.main(train_args({**opd_setup, "student": opd_setup["source"]}, tmp_path / "x")) == 2
    assert "_ptq_meta.json" in capsys.readouterr().err


class _Payload:
    """Unpickling this runs code: what a planted state.pt would do under torch.load(weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_pickle_state_is_refused_without_running_it(opd_setup, tmp_path, capsys):
    import opd_train_fsdp

    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    torch.save({"config": {}, "step": 1, "payload": _Payload(marker)}, run / "state.pt")
    assert opd_train_fsdp.main(train_args(opd_setup, run)) == 2
    err = capsys.readouterr().err
    assert "weights_only" in err and "state.pt" in err
    assert not marker.exists()  # the payload never ran
