"""RESULTS.md: regenerates identically from results/ alone, shows what exists and only that."""
import json
import shutil

import results_md
import results_schema
import vllm_eval8
from test_vllm_eval8 import DATA, OPTIONS

BENCHES = ("mmlu_pro", "gpqa", "mmmlu")


def replay_run(tmp_path, tag, right_every, model="/models/some-model", **kw):
    """A real run_eval over the fixture samples, replaying outputs that are right every k-th sample."""
    cfg = vllm_eval8.EvalConfig(model=model, tag=tag, backend="replay", benchmarks=kw.pop("benchmarks", BENCHES),
                                data_files=DATA, bench_options=OPTIONS, results_dir=str(tmp_path / "vllm_eval"),
                                grade_workers=0, progress=False, **kw)
    samples, _ = vllm_eval8.load_all_samples(cfg)
    tmp_path.mkdir(parents=True, exist_ok=True)
    replay = tmp_path / f"{tag}.replay.jsonl"
    replay.write_text("".join(json.dumps({
        "id": s.id, "output": f"The answer is ({s.gold if i % right_every == 0 else ('A' if s.gold != 'A' else 'B')})",
        "finish_reason": "stop", "tokens": 20}) + "\n" for i, s in enumerate(samples)))
    return vllm_eval8.run_eval(vllm_eval8.dataclasses.replace(cfg, replay_file=str(replay)))


def build(tmp_path):
    replay_run(tmp_path, "teacher-bf16", 1, model="/models/Qwen3.5-122B-A10B")
    replay_run(tmp_path, "quant-w3", 2)
    replay_run(tmp_path, "rtn", 3, role="baseline")
    return tmp_path


def test_regenerates_identically_from_results_alone(tmp_path):
    results = build(tmp_path / "a")
    assert results_md.main(["--results-dir", str(results), "--out", str(results / "RESULTS.md")]) == 0
    first = (results / "RESULTS.md").read_text()
    assert results_md.main(["--results-dir", str(results)]) == 0
    assert (results / "RESULTS.md").read_text() == first
    moved = tmp_path / "elsewhere" / "results"
    shutil.copytree(results / "vllm_eval", moved / "vllm_eval")  # JSONs only: no replay files, no runs
    assert results_md.main(["--results-dir", str(moved)]) == 0
    assert (moved / "RESULTS.md").read_text() == first
    assert results_md.main(["--results-dir", str(moved), "--check"]) == 0
    (moved / "RESULTS.md").write_text(first + "edited by hand\n")
    assert results_md.main(["--results-dir", str(moved), "--check"]) == 1


def test_headline_has_roles_deltas_gate_links_and_commands(tmp_path):
    results = build(tmp_path)
    text = results_md.render(results_md.load_results(results), results)
    assert "## Headline: teacher-bf16" in text
    head = next(line for line in text.splitlines() if line.startswith("| Benchmark"))
    assert "teacher [teacher-bf16](#run-teacher-bf16)" in head
    assert "quant [quant-w3](#run-quant-w3)" in head and "baseline [rtn](#run-rtn)" in head
    gpqa = next(line for line in text.splitlines() if line.startswith("| gpqa |"))
    # teacher 3/3 right, quant right on samples 0 and 2 of gpqa's (global index 4..6 -> 4, 6 even)
    teacher = json.loads((results / "vllm_eval" / "teacher-bf16.json").read_text())["benchmarks"]["gpqa"]
    quant = json.loads((results / "vllm_eval" / "quant-w3.json").read_text())["benchmarks"]["gpqa"]
    delta = quant["acc"] - teacher["acc"]
    assert f"[{teacher['acc']:.1f}](vllm_eval/teacher-bf16.json)" in gpqa
    assert f"[{delta:+.1f}](vllm_eval/quant-w3.json)" in gpqa and "p=" in gpqa
    assert "undecided (86.6)" in gpqa  # carded model, but 3 questions cannot decide the gate
    assert "## Validation gate" in text and "Qwen3.5-122B-A10B" in text
    assert "## Per-group breakdown" in text and "### mmmlu by group" in text and "| ES_LA |" in text
    assert '<a id="run-quant-w3"></a>quant-w3 (quant)' in text and "- command: `" in text
    assert "vllm_eval8 compare vllm_eval/teacher-bf16.json vllm_eval/quant-w3.json" in text


def test_sections_appear_only_for_data_present(tmp_path):
    empty = results_md.render([], tmp_path)
    assert "No results yet." in empty and "Headline" not in empty
    replay_run(tmp_path, "solo", 1, benchmarks=("gpqa",))
    doc = json.loads((tmp_path / "vllm_eval" / "solo.json").read_text())
    block = doc["benchmarks"]["gpqa"]
    recs = [{"id": i, "correct": bool(c), "finish_reason": "stop", "no_answer": False, "tokens": 1, "group": None}
            for i, c in zip(block["paired"]["ids"], block["paired"]["correct"])]
    doc["benchmarks"]["gpqa"] = {**results_schema.summarize_bench(recs), "dataset": block["dataset"]}  # no groups
    (tmp_path / "vllm_eval" / "solo.json").write_text(json.dumps(doc))
    text = results_md.render(results_md.load_results(tmp_path), tmp_path)
    assert "## Runs" in text and "solo (other)" in text
    for absent in ("Headline", "Validation gate", "Per-group", "without a teacher"):
        assert absent not in text


def test_unpaired_runs_are_marked_and_teacherless_runs_listed(tmp_path):
    replay_run(tmp_path, "teacher-a", 1)
    replay_run(tmp_path, "quant-a", 2, n_default=2, reference_tag="teacher-a")  # fewer samples: unpaired
    replay_run(tmp_path, "teacher-b", 1)
    replay_run(tmp_path, "quant-b", 2, reference_tag="teacher-b")
    replay_run(tmp_path, "quant-orphan", 2)  # two teachers and no reference: cannot be attached
    text = results_md.render(results_md.load_results(tmp_path), tmp_path)
    assert "## Headline: teacher-a" in text and "## Headline: teacher-b" in text
    assert "unpaired: different samples" in text
    assert "## Runs without a teacher to compare with" in text and "[quant-orphan](#run-quant-orphan)" in text
    headline_b = text.split("## Headline: teacher-b")[1].split("##")[0]
    assert "quant-b" in headline_b and "quant-a" not in headline_b


def test_fidelity_and_llama_server_speed_sections_when_present(tmp_path):
    replay_run(tmp_path, "teacher-x", 1, benchmarks=("gpqa",))
    doc_path = tmp_path / "vllm_eval" / "teacher-x.json"
    doc = json.loads(doc_path.read_text())
    doc["llamacpp"] = {"throughput_run": {"prefill_tok_s": 812.25, "decode_tok_s": 41.5},
                       "probe": {"decode_tok_s": 44.0}, "peak_vram_mib": 20480}
    doc_path.write_text(json.dumps(doc))
    (tmp_path / "fidelity").mkdir()
    student = {"name": "w3g128", "ppl_teacher": 10.5, "ppl_teacher_interval": [10.0, 11.0], "ppl_student": 11.25,
               "ppl_student_interval": [10.7, 11.8], "ppl_ratio": 1.0714, "ppl_ratio_interval": [1.05, 1.09],
               "kl_mean": 0.0421, "kl_mean_interval": [0.04, 0.0442], "kl_kind": "exact", "kl_p99": 0.61,
               "top1_agree": 0.9312, "top1_agree_interval": [0.92, 0.94]}
    (tmp_path / "fidelity" / "qwen-w3.json").write_text(json.dumps(
        {"teacher": {"dir": "/m/t"}, "text": {"n_scored_tokens": 4096, "n_windows": 8, "ctx": 512},
         "provenance": {"command": "python moe_eval.py --teacher /m/t"}, "students": [student]}))
    assert results_md.main(["--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Fidelity vs the teacher" in text and "| w3g128 |" in text
    assert "[0.0421](fidelity/qwen-w3.json) [0.04, 0.0442] (exact)" in text
    assert "`python moe_eval.py --teacher /m/t`" in text
    assert "prefill 812.2 / decode 41.5 tok/s" in text and "peak VRAM 20480 MiB" in text
    (tmp_path / "fidelity" / "broken.json").write_text("{}")
    assert results_md.main(["--results-dir", str(tmp_path)]) == 2
