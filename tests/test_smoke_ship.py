"""The smoke's shipped-artifact rows (src/eval/smoke_ship.py and the table in smoke_report.py).

Fast: the rows a config plans, the per-sample agreement and gen tok/s computed from the real per-sample
files the smoke wrote (results/vllm_eval), cross-checked against numbers other code computed from the same
files, and the table printed from the real summary JSON of the last smoke run (results/smoke).
"""
import copy
import json
import re
from pathlib import Path

import pytest

import smoke
import smoke_ship

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DENSE = RESULTS / "smoke" / "smoke_smollm2-135m-instruct.json"
MOE = RESULTS / "smoke" / "smoke_moe_smollm2-135m-moe.json"


def _summary(path: Path) -> dict:
    doc = json.loads(path.read_text())
    if not doc.get("rows"):
        pytest.skip(f"{path.name} predates the shipped-artifact rows (run the smoke)")
    return doc


def _cfg(recipe: str) -> smoke.SmokeConfig:
    return smoke.config_from_args(smoke.build_parser().parse_args(["--default-recipe", recipe]), {})


# --------------------------------------------------------------------------------------------- planning
def test_ship_store_is_what_compressed_tensors_w4a16_and_q4_0_hold():
    """The dense recipe's plan has 6-bit tensors; the ship store drops it and puts every linear at int4 g32,
    keeping the method, grid, calibration and role bits."""
    cfg = _cfg("configs/smoke_eval.env")
    assert cfg.bits_plan and cfg.ship_exports == ("compressed-tensors", "gguf")
    ship = smoke_ship.ship_config(cfg)
    assert (ship.linear_bits, ship.expert_bits, ship.group, ship.bits_plan) == (4.0, 4.0, 32, "")
    assert (ship.method, ship.grid, ship.act_order, ship.calib, ship.role_bits) == (
        cfg.method, cfg.grid, cfg.act_order, cfg.calib, cfg.role_bits)
    assert smoke_ship.ship_emit(cfg) == "dequant,compressed-tensors,gguf"
    rows = smoke_ship.plan_rows(cfg, None, Path("/w"), "m", "smoke_m")
    assert [r.key for r in rows] == ["ship-dequant", "ship-ct"]
    dq, ct = rows
    assert ct.build == dq.build == dq.model and ct.model == dq.build + "/compressed-tensors"
    assert ct.paired_with == "ship-dequant" and not ct.may_fall_back  # dense: the acceptance needs it served
    assert len({dq.tag, ct.tag, smoke.tags_for(smoke.plan_smoke(cfg, _facts()), cfg)["quant"]}) == 3
    none = smoke_ship.plan_rows(smoke.SmokeConfig(ship_exports=()), None, Path("/w"), "m", "smoke_m")
    assert none == []


def _facts():
    return smoke.Facts(cuda=False, hub_offline_env=False, hub_reachable=None)


def test_moe_smoke_is_calibrated_with_the_reference_clip_as_comparison_row():
    cfg = _cfg("configs/smoke_moe.env")
    assert (cfg.method, cfg.grid, cfg.expert_bits, cfg.group) == ("gptq", "full", 3.0, 128)
    assert cfg.role_bits == "embed=8,lm_head=8" and cfg.calib == "pydoc-topics"
    ref = smoke_ship.compare_config(cfg, cfg.compare_recipe)
    assert (ref.method, ref.grid, ref.expert_bits, ref.group, ref.role_bits, ref.calib) == ("clip", "sym", 3.0, 128, "", "")
    rows = smoke_ship.plan_rows(cfg, ref, Path("/w"), "m", "smoke_moe_m")
    assert [r.key for r in rows] == ["ship-dequant", "ship-ct", "compare"]
    assert rows[1].may_fall_back and rows[2].tag == "smoke_moe_m_e3l4g128c8"


def test_compare_recipe_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "r.env"
    bad.write_text("METHOD=clip\nNOT_A_KNOB=1\n")
    with pytest.raises(smoke.SmokeError, match=r"r.env:2: unknown quant key"):
        smoke_ship.compare_config(smoke.SmokeConfig(), str(bad))
    with pytest.raises(smoke.SmokeError, match="no such file"):
        smoke_ship.compare_config(smoke.SmokeConfig(), str(tmp_path / "absent.env"))
    with pytest.raises(smoke.SmokeError, match="SMOKE_SHIP_EXPORTS"):
        smoke.SmokeConfig(ship_exports=("awq",))


# --------------------------------------------------------------------- agreement / tok/s on real files
def _real_eval(summary: dict, key: str):
    doc = json.loads((RESULTS / summary["files"][key]).read_text())
    return doc, smoke_ship.read_samples(RESULTS / "vllm_eval" / doc["samples_file"])


def test_agreement_on_the_real_teacher_and_quant_samples_matches_the_paired_comparison():
    """Same verdict count == n - discordant pairs that results_compare counted from the same files."""
    summary = json.loads(DENSE.read_text())
    _, teacher = _real_eval(summary, "teacher_eval")
    _, quant = _real_eval(summary, "quant_eval")
    ag = smoke_ship.agreement(teacher, quant)
    assert ag["n"] == len(teacher) == sum(c["n"] for c in summary["comparison"]["benchmarks"].values())
    discordant = sum(c["only_a_correct"] + c["only_b_correct"] for c in summary["comparison"]["benchmarks"].values())
    assert ag["same_verdict"] == ag["n"] - discordant
    assert ag["same_text"] <= ag["same_answer"] == ag["n"] - len(ag["differ"])
    assert all(d["answer_a"] != d["answer_b"] for d in ag["differ"])
    same = smoke_ship.agreement(teacher, teacher)
    assert (same["same_text"], same["differ"]) == (same["n"], [])
    changed = copy.deepcopy(teacher)
    changed[3]["extracted"], changed[3]["output"] = "zz", "zz"
    one = smoke_ship.agreement(teacher, changed)
    assert [d["id"] for d in one["differ"]] == [teacher[3]["id"]] and one["same_text"] == one["n"] - 1
    with pytest.raises(ValueError, match="share no sample"):
        smoke_ship.agreement(teacher, [{"id": "other"}])


def test_gen_tok_s_is_generated_tokens_over_generation_wall():
    summary = json.loads(DENSE.read_text())
    doc, samples = _real_eval(summary, "teacher_eval")
    rate = smoke_ship.gen_tok_s(doc, samples)
    assert rate == pytest.approx(sum(s["tokens"] for s in samples) / doc["timing"]["generate_s"])
    assert smoke_ship.gen_tok_s({"timing": {"generate_s": 0.0}}, samples) is None
    if "gen_tok_s" in summary:
        assert summary["gen_tok_s"]["teacher"] == pytest.approx(rate)


# -------------------------------------------------------------------------- the table from real JSON
def _rows_by_label(table: str) -> dict:
    return {line[:52].strip(): line[52:] for line in table.splitlines() if len(line) > 52}


@pytest.mark.parametrize("path", [DENSE, MOE], ids=["dense", "moe"])
def test_table_rows_are_the_real_json_numbers(path):
    assert_rows_match_json(_summary(path), path, smoke.render_table(smoke.load_outputs(path)))


def assert_rows_match_json(summary: dict, path: Path, table: str) -> None:
    """Every extra row of the printed table carries its JSON's numbers (also used by the pipeline test)."""
    docs = smoke.load_outputs(path)
    assert smoke.missing_numbers(docs) == []
    students = docs["fidelity"]["students"]
    rows = _rows_by_label(table)
    benches = list(summary["comparison"]["benchmarks"])
    for r in summary["rows"]:
        label = next(k for k in rows if k.startswith(r["label"][:40]))
        line = rows[label]
        if r["error"]:
            assert r["may_fall_back"] and "NOT SERVED" in line
            assert r["error"][:60] in table  # the error line itself is shown
            continue
        doc = docs["rows"][r["key"]]
        nums = re.findall(r"[-+]?\d+\.\d+", line)
        expect = []
        for b in benches:
            expect += [f"{doc['benchmarks'][b]['acc']:.1f}", f"{r['comparison']['benchmarks'][b]['delta']:+.1f}"]
        if r["fidelity_student"] is not None:
            expect.append(f"{students[r['fidelity_student']]['kl_mean']:.5f}")
        expect.append(f"{r['gen_tok_s']:.1f}")
        assert nums == expect, line
        ag = r["agreement"]
        if ag:  # the export against its own dequantized view, sample by sample
            assert ag["with"] == "ship-dequant" and ag["n"] == sum(doc["benchmarks"][b]["n"] for b in benches)
            assert (f"same answer {ag['same_answer']}/{ag['n']}, same text {ag['same_text']}/{ag['n']}" in table
                    and "kernel arithmetic" in table)
            for d in ag["differ"][:6]:
                assert d["id"] in table
        if r["export"]:
            assert r["export"]["verified"]["ok"] and "verify_export PASS" in table
    g = summary["gguf"]
    if g and g.get("fidelity"):
        st = docs["gguf_fidelity"]["students"][0]
        assert g["verified"]["ok"] and f"KLD {st['kl_mean']:.5f}" in table
        assert sum(g["types"].values()) == len(json.loads(Path(g["file"] + ".map.json").read_text())) \
            if Path(g["file"] + ".map.json").is_file() else True


def test_missing_row_numbers_block_smoke_ok_unless_the_row_may_fall_back():
    summary = _summary(DENSE)
    docs = smoke.load_outputs(DENSE)
    broken = copy.deepcopy(docs)
    ct = next(r for r in broken["summary"]["rows"] if r["key"] == "ship-ct")
    ct["gen_tok_s"] = None
    ct["export"]["verified"]["ok"] = False
    assert {"ship-ct gen tok/s", "ship-ct export verification"} <= set(smoke.missing_numbers(broken))
    ct["error"], ct["eval"] = "step eval-ship-ct exited with 1: ValueError: no kernel", None
    del broken["rows"]["ship-ct"]
    assert "ship-ct evaluation" in smoke.missing_numbers(broken)  # dense: it must be served
    ct["may_fall_back"] = True  # the MoE smoke: shown as not served, with the error line
    assert smoke.missing_numbers(broken) == []
    assert "NOT SERVED" in smoke.render_table(broken) and "no kernel" in smoke.render_table(broken)
    if summary.get("gguf"):
        broken["gguf_fidelity"]["students"][0]["kl_mean"] = float("nan")
        assert "GGUF KLD" in smoke.missing_numbers(broken)


def test_a_vllm_engine_failure_is_reported_with_its_root_cause_and_the_fix():
    """vLLM prints the worker's exception long before its summary; the table's error line names it."""
    tail = ["(Worker pid=1) ERROR 12-06 13:45:55 [multiproc_executor.py:953]     raise NotImplementedError(",
            "(Worker pid=1) ERROR 12-06 13:45:55 [multiproc_executor.py:953] NotImplementedError: No WNA16 MoE "
            "backend supports the deployment configuration.",
            *[f"(EngineCore pid=2) ERROR [core.py:1510]   frame {i}" for i in range(60)],
            "Exception: WorkerProc initialization failed due to an exception in a background process.",
            "vllm_eval8: Engine core initialization failed. See root cause above."]
    msg = smoke.explain_failure(tail)
    assert msg.startswith("NotImplementedError: No WNA16 MoE backend supports the deployment configuration.")
    assert "vllm_eval8: Engine core initialization failed" in msg and "AMX" in msg
    assert "AMX" not in smoke.explain_failure(["vllm_eval8: error: --model x: no such dir"])
