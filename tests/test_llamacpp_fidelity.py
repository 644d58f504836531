"""Tests for src/eval/llamacpp_fidelity.py: parsing llama-perplexity's KL summary (its exact printf
formats), the mapping into moe_eval's fidelity fields, the orchestration on a fake llama-perplexity, and
(llamacpp) a real run: KL(BF16 || BF16) is 0 and the IQ3 GGUF's KL is positive.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import gguf_fixtures as gf
import llamacpp_fidelity as lf

ROOT = Path(__file__).resolve().parents[1]


def kld_output(kl=0.0421, kl_se=0.0012, ppl_q=13.5, ppl_b=12.25, same=91.234, chunks=4, ctx=128) -> str:
    """llama-perplexity --kl-divergence output, built with the printf formats of tools/perplexity."""
    return "\n".join([
        "kl_divergence: computing over %d chunks, n_ctx=%u, batch_size=%d, n_seq=%d" % (chunks, ctx, ctx, 1),
        "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p",
        "   1       13.1000 ±    1.2000       0.01000 ±    0.00100       0.04000 ±    0.00300",
        "Mean PPL(Q)                   : %10.6f ± %10.6f" % (ppl_q, 0.5),
        "Mean PPL(base)                : %10.6f ± %10.6f" % (ppl_b, 0.4),
        "Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%" % 99.1,
        "Mean ln(PPL(Q)/PPL(base))     : %10.6f ± %10.6f" % (0.097, 0.01),
        "Mean PPL(Q)/PPL(base)         : %10.6f ± %10.6f" % (ppl_q / ppl_b, 0.011),
        "Mean PPL(Q)-PPL(base)         : %10.6f ± %10.6f" % (ppl_q - ppl_b, 0.1),
        "====== KL divergence statistics ======",
        "Mean    KLD: %10.6f ± %10.6f" % (kl, kl_se),
        "Maximum KLD: %10.6f" % 1.5,
        "99.9%%   KLD: %10.6f" % 1.2,
        "99.0%%   KLD: %10.6f" % 0.6,
        "Median  KLD: %10.6f" % 0.02,
        "Minimum KLD: %10.6f" % 0.0,
        "Same top p: %6.3f ± %5.3f %%" % (same, 0.4),
    ])


def test_kld_summary_is_parsed():
    p = lf.parse_kld_output(kld_output())
    assert p["kl_mean"] == pytest.approx(0.0421) and p["kl_mean_stderr"] == pytest.approx(0.0012)
    assert p["ppl_student"] == pytest.approx(13.5) and p["ppl_teacher"] == pytest.approx(12.25)
    assert p["ppl_ratio"] == pytest.approx(13.5 / 12.25, abs=1e-6)
    assert p["top1_agree"] == pytest.approx(0.91234) and p["top1_agree_stderr"] == pytest.approx(0.004)
    assert p["kl_p99"] == pytest.approx(0.6) and p["kl_max"] == pytest.approx(1.5) and p["kl_median"] == 0.02
    assert (p["n_chunks"], p["ctx"]) == (4, 128)


def test_missing_summary_is_an_error_naming_the_field():
    text = "\n".join(line for line in kld_output().splitlines() if "Same top p" not in line)
    with pytest.raises(lf.FidelityError, match="top1_agree"):
        lf.parse_kld_output(text)


def test_student_block_has_moe_eval_fields():
    block = lf.student_block(lf.parse_kld_output(kld_output(chunks=4, ctx=128)), z=2.0)
    for key in ("ppl_teacher", "ppl_student", "kl_mean", "top1_agree", "kl_mean_interval", "kl_p99", "ppl_ratio"):
        assert key in block
    assert block["kl_mean_interval"] == pytest.approx([0.0421 - 0.0024, 0.0421 + 0.0024])
    assert block["n_scored_tokens"] == 4 * 63 == lf.scored_tokens(128, 4)


FAKE = '''#!{py}
import sys
a = sys.argv[1:]
model = a[a.index("-m") + 1]
base = a[a.index("--kl-divergence-base") + 1]
if "--kl-divergence" not in a:
    open(base, "w").write("logits")
    print("Final estimate: PPL = 12.2500 +/- 0.40000")
else:
    assert open(base).read() == "logits"
    kl = 0.0 if "bf16" in model else 0.05
    sys.stdout.write({out!r}.replace("KLVALUE", "%10.6f" % kl))
'''


def test_run_fidelity_orchestrates_base_then_students(tmp_path):
    fake = tmp_path / "llama-perplexity"
    fake.write_text(FAKE.format(py=sys.executable, out=kld_output().replace("%10.6f ±" % 0.0421, "KLVALUE ±")))
    fake.chmod(0o755)
    files = {n: tmp_path / n for n in ("base.gguf", "bf16-copy.gguf", "iq3.gguf", "text.txt")}
    for f in files.values():
        f.write_text("x")
    doc = lf.run_fidelity(fake, files["base.gguf"], {"self": files["bf16-copy.gguf"], "iq3": files["iq3.gguf"]},
                          files["text.txt"], ctx=128, chunks=4, workdir=tmp_path / "w")
    assert doc["schema"] == "moe-lowbit/fidelity/v1" and doc["teacher"]["ppl_base_run"] == 12.25
    assert [(s["name"], s["kl_mean"]) for s in doc["students"]] == [("self", 0.0), ("iq3", 0.05)]
    assert doc["text"]["n_scored_tokens"] == 252 and not (tmp_path / "w" / "base_logits.bin").exists()
    assert len(doc["provenance"]["commands"]) == 3


def test_cli_rejects_a_malformed_student(tmp_path, capsys):
    assert lf.main(["--base", "b", "--student", "noequals", "--text-file", "t", "--out", str(tmp_path / "o.json")]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.llamacpp
def test_real_kl_of_bf16_is_zero_and_of_iq3_is_positive(smollm2_dir, tmp_path):
    prefix = gf.llama_cpp_prefix()
    out, _ = gf.packed("smollm2", smollm2_dir, prefix)
    text = gf.calibration_file(tmp_path / "text.txt", repeats=4)
    binary = prefix / "bin" / "llama-perplexity"
    doc = lf.run_fidelity(binary, out / "smollm2-BF16.gguf",
                          {"bf16": out / "smollm2-BF16.gguf", "iq3": out / "smollm2-IQ3_XXS.gguf"},
                          text, ctx=128, chunks=4, threads=2)
    by = {s["name"]: s for s in doc["students"]}
    assert by["bf16"]["kl_mean"] == pytest.approx(0.0, abs=1e-3) and by["bf16"]["top1_agree"] > 0.99
    assert by["iq3"]["kl_mean"] > 0.01 and by["iq3"]["top1_agree"] < by["bf16"]["top1_agree"]
    json.dumps(doc)  # serialisable as written
