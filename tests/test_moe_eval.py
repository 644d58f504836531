"""Tests for src/eval/moe_eval.py and src/eval/fidelity_math.py.

Pure math is checked against independent torch references on random logits; the pipeline is checked on
callable 'models' with known logits (cheap) and on the embedded SmolLM2 (KL(self)=0, PPL vs a direct
computation, int4 < int3 < int2, cache reuse/invalidation). Model tests use ctx=128 and ~400 tokens.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import fidelity_math as fm
import fidelity_text as ft
import moe_eval as me
import fidelity_cache

# Original prose (written for this test) so the model tests need no hub dataset.
PROSE = """\
The harbour town woke slowly on winter mornings. Fishing boats that had gone out before dawn came back
one by one, their decks crowded with crates of silver fish and coils of wet rope. Along the quay the
market stalls opened their shutters, and the smell of fresh bread drifted from the bakery at the corner
of the square. Children walked to school in pairs, carrying satchels and arguing about football, while
their grandparents sat on the benches near the church and watched the gulls circle above the water.

In the old library, which had once been a customs house, the librarian unlocked the heavy oak door and
switched on the lamps. She kept a record of every book that left the building, written by hand in a
ledger that was nearly a century old. Students came in the afternoon to study mathematics and history,
and a retired engineer visited every Tuesday to read about the bridges and railways that had been built
across the region during the last two hundred years. He liked to explain to anyone who would listen how
a suspension bridge carries its load through the cables to the towers and then down into the ground.

When the weather turned, storms arrived from the west with very little warning. The harbour master
would raise a red flag on the mast above his office, and the boats stayed tied to their moorings while
the waves broke over the sea wall. On those days the cafes filled with people drinking hot chocolate and
telling stories about the great storm of their childhood, when the lighthouse keeper had rowed out alone
to rescue the crew of a cargo ship that had lost its engine near the rocks.

Spring brought visitors. Painters set up their easels on the cliffs to capture the changing colours of
the sea, and walkers followed the coastal path that led north through meadows full of wild flowers. The
hotel on the hill reopened after its winter repairs, and the owner hired students from the city to wait
at tables and carry luggage. By the middle of summer the beaches were crowded, the ice cream van played
its cheerful tune every afternoon, and the ferry to the islands ran three times a day instead of once.

Autumn was the season the town liked best. The visitors went home, the evenings grew cooler, and the
apple orchards behind the houses were heavy with fruit. Families gathered for the harvest festival,
when the square was decorated with lanterns and everyone brought a dish to share at the long tables. The
brass band practised for weeks before the festival, and on the night itself they played until midnight
while couples danced on the cobblestones and the older people remembered the songs of their youth.
"""

CTX = 128
MAX_TOKENS = 384  # 3 windows of 127 scored tokens: enough for an interval, cheap on 2 shared cores


def reference_kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Unchunked float64 KL(softmax(t) || softmax(s)) per row, via torch's own kl_div."""
    lt, ls = F.log_softmax(t.double(), -1), F.log_softmax(s.double(), -1)
    return F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)


# ------------------------------------------------------------------------------------------ pure math

@pytest.mark.parametrize("chunk", [1, 7, 64, 333, 1000, 4096])
def test_logsumexp_chunked_matches_torch(chunk):
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0)) * 6
    x[0, 10:] = -math.inf  # a row that is mostly masked
    got = fm.logsumexp_chunked(x, chunk)
    torch.testing.assert_close(got, torch.logsumexp(x.double(), -1).float(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 64, 333, 1000, 4096])
def test_vocab_chunked_kl_equals_unchunked_kl(chunk):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 1000, generator=g) * 4
    s = t + torch.randn(6, 1000, generator=g) * 1.5
    got = fm.kl_from_logits(t, s, chunk)
    torch.testing.assert_close(got.double(), reference_kl(t, s), rtol=1e-5, atol=1e-6)
    assert got.min() > 0


def test_kl_of_identical_logits_is_exactly_zero_and_bf16_inputs_work():
    t = torch.randn(4, 777, generator=torch.Generator().manual_seed(2)) * 5
    assert torch.equal(fm.kl_from_logits(t, t, 100), torch.zeros(4))
    tb, sb = t.bfloat16(), (t + 0.5 * torch.randn_like(t)).bfloat16()
    torch.testing.assert_close(fm.kl_from_logits(tb, sb, 100).double(), reference_kl(tb.float(), sb.float()),
                               rtol=1e-4, atol=1e-6)


def test_kl_masked_entries():
    t = torch.tensor([[0.0, 1.0, -math.inf, 2.0]])
    s = torch.tensor([[0.5, 0.5, 3.0, 1.0]])
    assert torch.isfinite(fm.kl_from_logits(t, s, 2)).all()  # teacher zero-probability entries add 0
    s_masked = torch.tensor([[0.5, -math.inf, 3.0, 1.0]])
    assert torch.isinf(fm.kl_from_logits(t, s_masked, 2)).all()  # student gives 0 where teacher does not


@pytest.mark.parametrize("k", [1, 5, 50])
def test_topk_kl_is_a_lower_bound_and_exact_at_full_vocab(k):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(6, 300, generator=g) * 3
    s = t + torch.randn(6, 300, generator=g)
    exact = fm.kl_from_logits(t, s, 64)

    def bound(kk):
        lse = fm.logsumexp_chunked(t, 64)
        vals, ids = t.topk(kk, -1)
        return fm.kl_topk_lower_bound(vals - lse[:, None], ids, fm.rest_log_mass(t, ids, 64, lse), s, 64)

    lb = bound(k)
    assert (lb <= exact + 1e-6).all() and (lb >= -1e-6).all()
    assert (bound(50) >= bound(1) - 1e-6).all()  # a finer partition never lowers the bound
    torch.testing.assert_close(bound(300), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 16, 100, 1000])
def test_rest_log_mass_equals_masked_logsumexp(chunk):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 100, generator=g) * 3
    ids = torch.stack([torch.randperm(100, generator=g)[:7] for _ in range(4)])
    ids[0, 1] = ids[0, 0]  # a repeated id must be excluded once, not break the mask
    lse = torch.logsumexp(x, -1)
    keep = torch.ones_like(x, dtype=torch.bool).scatter(1, ids, False)
    expected = torch.logsumexp(x.masked_fill(~keep, -math.inf), -1) - lse
    torch.testing.assert_close(fm.rest_log_mass(x, ids, chunk), expected, rtol=1e-5, atol=1e-5)


def test_nll_matches_cross_entropy():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(9, 500, generator=g) * 3, torch.randint(0, 500, (9,), generator=g)
    torch.testing.assert_close(fm.nll_from_logits(x, y, 37), F.cross_entropy(x, y, reduction="none"))


def test_interval_over_windows():
    vals = [0.2, 0.5, 0.1, 0.4, 0.3]
    iv = fm.interval_over_windows(vals, z=1.96)
    se = statistics.stdev(vals) / math.sqrt(5)
    assert iv.mean == pytest.approx(0.3) and iv.stderr == pytest.approx(se)
    assert (iv.lo, iv.hi) == (pytest.approx(0.3 - 1.96 * se), pytest.approx(0.3 + 1.96 * se))
    one = fm.interval_over_windows([0.7])
    assert one.lo is None and one.stderr is None  # no fake zero-width interval from one window
    with pytest.raises(ValueError, match="at least one"):
        fm.interval_over_windows([])


def test_windows_from_ids_layout():
    cfg = me.FidelityConfig(ctx=4, max_tokens=100)
    w = ft.windows_from_ids(list(range(10, 20)), cfg, bos_id=1)
    assert w.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]  # tail token 19 dropped
    assert ft.windows_from_ids(list(range(8)), cfg, None).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="fewer than one window"):
        ft.windows_from_ids([5, 6], cfg, bos_id=1)


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="ctx must be >= 2"):
        me.FidelityConfig(ctx=1)
    with pytest.raises(ValueError, match="cache_dtype"):
        me.FidelityConfig(cache_dtype="int8")


# --------------------------------------------------------------- pipeline on callables with known logits

def _fake_model(vocab: int, noise: float, seed: int):
    """tokens -> deterministic logits (a fixed random table indexed by token) plus fixed noise."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(64, vocab, generator=torch.Generator().manual_seed(0)) * 3
    bump = torch.randn(64, vocab, generator=g) * noise
    return lambda toks: table[toks % 64] + bump[toks % 64]


@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
def test_scores_equal_direct_computation_on_known_logits(tmp_path, cache_dtype):
    vocab = 300
    cfg = me.FidelityConfig(ctx=16, max_tokens=1000, vocab_chunk=70, token_chunk=5, cache_root=str(tmp_path),
                        cache_dtype=cache_dtype)
    tokens = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(5))
    windows = me.TokenWindows(tokens, {"kind": "test"})
    teacher, student = _fake_model(vocab, 0.0, 1), _fake_model(vocab, 1.0, 2)
    res = me.compare_loaded(teacher, {"s": student, "t": teacher}, windows, cfg, teacher_id="fake")
    s, t = res["students"]["s"], res["students"]["t"]
    lt = torch.stack([teacher(w)[:-1] for w in tokens])  # [4, 15, V]
    ls = torch.stack([student(w)[:-1] for w in tokens])
    tol = 1e-5 if cache_dtype == "float32" else 2e-3
    assert s["kl_mean"] == pytest.approx(float(reference_kl(lt.reshape(-1, vocab), ls.reshape(-1, vocab)).mean()),
                                         rel=tol)
    agree = (lt.argmax(-1) == ls.argmax(-1)).double().mean()
    assert s["top1_agree"] == pytest.approx(float(agree))
    nll = F.cross_entropy(ls.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    assert s["ppl_student"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert t["top1_agree"] == 1.0 and abs(t["kl_mean"]) < (1e-7 if cache_dtype == "float32" else 1e-5)
    assert s["kl_mean_interval"][0] < s["kl_mean"] < s["kl_mean_interval"][1]


def test_topk_cache_gives_a_labelled_lower_bound(tmp_path):
    vocab = 300
    tokens = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(6))
    windows = me.TokenWindows(tokens, {"kind": "test"})
    teacher, student = _fake_model(vocab, 0.0, 1), _fake_model(vocab, 1.0, 2)
    full = me.compare_loaded(teacher, {"s": student}, windows,
                             me.FidelityConfig(ctx=16, cache_root=str(tmp_path), cache_dtype="float32"), "fake")
    topk = me.compare_loaded(teacher, {"s": student}, windows,
                             me.FidelityConfig(ctx=16, cache_root=str(tmp_path), cache_topk=8), "fake")
    assert topk["fidelity_cache"]["key"] != full["fidelity_cache"]["key"]  # the format is part of the key
    assert topk["students"]["s"]["kl_kind"] == "topk_lower_bound" and full["students"]["s"]["kl_kind"] == "exact"
    assert 0 < topk["students"]["s"]["kl_mean"] < full["students"]["s"]["kl_mean"]


def test_vocab_mismatch_fails_early(tmp_path):
    windows = me.TokenWindows(torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(7)))
    cfg = me.FidelityConfig(ctx=8, cache_root=str(tmp_path))
    with pytest.raises(ValueError, match="vocabulary of 60 logits but the teacher has 50"):
        me.compare_loaded(_fake_model(50, 0, 1), {"s": _fake_model(60, 0, 1)}, windows, cfg, "fake")


def test_full_cache_size_guard_names_the_fix(tmp_path):
    windows = me.TokenWindows(torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(7)))
    cfg = me.FidelityConfig(ctx=8, cache_root=str(tmp_path), cache_max_gb=1e-9)
    with pytest.raises(ValueError, match="--cache-topk"):
        me.compare_loaded(_fake_model(50, 0, 1), {}, windows, cfg, "fake")


# ----------------------------------------------------------------------------- the embedded SmolLM2

@pytest.fixture(scope="module")
def teacher(smollm2_dir):
    return me.load_hf_model(smollm2_dir, me.FidelityConfig(dtype="float32"))


@pytest.fixture(scope="module")
def prose_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "prose.txt"
    path.write_text(PROSE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prose_windows(smollm2_dir, prose_file):
    cfg = me.FidelityConfig(ctx=CTX, max_tokens=MAX_TOKENS)
    text, record = ft.read_text(me.TextSpec(kind="file", path=str(prose_file)))
    return ft.text_windows(text, me.load_tokenizer(smollm2_dir), cfg, record)


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory):
    return me.FidelityConfig(ctx=CTX, max_tokens=MAX_TOKENS, dtype="float32",
                         cache_root=str(tmp_path_factory.mktemp("fidelity_cache")))


@pytest.fixture(scope="module")
def self_result(teacher, prose_windows, model_cfg):
    return me.compare_loaded(teacher, {"self": teacher}, prose_windows, model_cfg)


def test_prose_gives_enough_windows(prose_windows):
    assert prose_windows.tokens.shape == (MAX_TOKENS // (CTX - 1), CTX)
    assert prose_windows.source["text_sha256"] == hashlib.sha256(PROSE.encode()).hexdigest()


@pytest.mark.slow
def test_teacher_against_itself_kl_zero_top1_one(self_result):
    s = self_result["students"]["self"]
    assert s["kl_kind"] == "exact"
    assert abs(s["kl_mean"]) < 1e-5 and s["kl_max"] < 1e-4  # fp16-rounded cache: second-order small
    assert s["top1_agree"] == 1.0
    assert s["ppl_student"] == pytest.approx(s["ppl_teacher"], rel=1e-5)


@pytest.mark.slow
def test_ppl_equals_direct_computation(self_result, teacher, prose_windows):
    total, count = 0.0, 0
    with torch.no_grad():
        for w in prose_windows.tokens:
            logits = teacher(w[None]).logits[0, :-1].double()
            total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
            count += w.numel() - 1
    direct = math.exp(total / count)
    s = self_result["students"]["self"]
    assert s["n_scored_tokens"] == count
    assert s["ppl_teacher"] == pytest.approx(direct, rel=1e-5)
    assert s["ppl_student"] == pytest.approx(direct, rel=1e-5)
    assert s["ppl_teacher_interval"][0] < direct < s["ppl_teacher_interval"][1]


def fake_quantized_copy(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """Every Linear weight but lm_head (tied to the embeddings here) fake-quantized at g128, clip search on."""
    from moe_quant import QuantSpec, fake_quant

    spec = QuantSpec(bits=bits, group=128, clip_steps=16, grid="full" if bits == 2 else "sym")  # sym refuses 2 bits
    q = copy.deepcopy(model)
    n = 0
    for name, mod in q.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            mod.weight.data = fake_quant(mod.weight.data, spec)
            n += 1
    assert n == 7 * q.config.num_hidden_layers, f"expected q/k/v/o/gate/up/down per layer, quantized {n}"
    return q


@pytest.mark.slow
def test_kl_grows_as_bits_shrink(teacher, prose_windows, model_cfg, self_result):
    kls = {}
    for bits in (4, 3, 2):
        student = fake_quantized_copy(teacher, bits)
        res = me.compare_loaded(teacher, {f"int{bits}": student}, prose_windows, model_cfg)
        assert res["fidelity_cache"]["hit"]  # self_result built it; students never re-run the teacher
        s = res["students"][f"int{bits}"]
        kls[bits] = s["kl_mean"]
        print(f"int{bits}: KL {s['kl_mean']:.5f} {s['kl_mean_interval']} top1 {s['top1_agree']:.4f} "
              f"ppl {s['ppl_student']:.3f} vs teacher {s['ppl_teacher']:.3f}")
        del student
    assert 1e-4 < kls[4] < kls[3] < kls[2], kls


@pytest.mark.slow
def test_teacher_cache_reused_and_invalidated(teacher, prose_windows, tmp_path):
    calls = {"forward": 0, "load": 0}
    hook = teacher.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    small = me.TokenWindows(prose_windows.tokens[:2, :32].clone(), prose_windows.source)
    cfg = me.FidelityConfig(ctx=32, dtype="float32", cache_root=str(tmp_path))

    def loader():
        calls["load"] += 1
        return me.hf_logits_fn(teacher)

    try:
        first = fidelity_cache.build_teacher_cache(loader, "smollm2", small, cfg)
        assert (first.hit, first.computed_windows, calls["forward"], calls["load"]) == (False, 2, 2, 1)
        again = fidelity_cache.build_teacher_cache(loader, "smollm2", small, cfg)
        assert (again.hit, again.computed_windows, calls["forward"], calls["load"]) == (True, 0, 2, 1)
        assert again.path == first.path
        other_text = me.TokenWindows(prose_windows.tokens[1:3, :32].clone(), prose_windows.source)
        changed = fidelity_cache.build_teacher_cache(loader, "smollm2", other_text, cfg)
        assert not changed.hit and changed.path != first.path and calls["forward"] == 4
        shorter = me.TokenWindows(prose_windows.tokens[:2, :16].clone(), prose_windows.source)
        ctx_changed = fidelity_cache.build_teacher_cache(loader, "smollm2", shorter, me.FidelityConfig(
            ctx=16, dtype="float32", cache_root=str(tmp_path)))
        assert not ctx_changed.hit and calls["forward"] == 6
        other_teacher = fidelity_cache.build_teacher_cache(loader, "another-model", small, cfg)
        assert not other_teacher.hit and calls["forward"] == 8
    finally:
        hook.remove()


@pytest.mark.slow
def test_teacher_sample_is_seeded_and_cached(teacher, smollm2_dir, tmp_path):
    tok = me.load_tokenizer(smollm2_dir)
    cfg = me.FidelityConfig(ctx=6, dtype="float32", cache_root=str(tmp_path))
    spec = me.TextSpec(kind="teacher-sample", n_tokens=10, seed=3)
    loads = []

    def load():
        loads.append(1)
        return teacher

    a, hit_a = ft.teacher_sample_windows(load, "smollm2", tok, spec, cfg)
    b, hit_b = ft.teacher_sample_windows(load, "smollm2", tok, spec, cfg)
    assert (hit_a, hit_b, len(loads)) == (False, True, 1) and torch.equal(a.tokens, b.tokens)
    assert a.tokens.shape == (2, 6) and (a.tokens[:, 0] == ft.sample_start_id(tok)).all()
    fresh = ft.sample_windows(teacher, ft.sample_start_id(tok), 2, 6, seed=3)
    assert torch.equal(fresh, a.tokens)  # same seed, recomputed: same text
    other, hit_c = ft.teacher_sample_windows(load, "smollm2", tok, me.TextSpec(kind="teacher-sample", n_tokens=10,
                                                                                seed=4), cfg)
    assert not hit_c and not torch.equal(other.tokens, a.tokens)
    assert a.source["kind"] == "teacher-sample" and a.source["seed"] == 3


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        me.main(["--help"])
    assert e.value.code == 0 and "--teacher" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_writes_json_with_provenance(smollm2_dir, prose_file, tmp_path):
    out = tmp_path / "fid" / "self.json"
    rc = me.main(["--teacher", str(smollm2_dir), "--student", str(smollm2_dir), "--text-file", str(prose_file),
                  "--ctx", "32", "--max-tokens", "64", "--dtype", "float32", "--cache-root", str(tmp_path / "c"),
                  "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["schema"] == me.SCHEMA and res["provenance"]["git_sha"]
    assert res["text"]["kind"] == "file" and res["text"]["text_sha256"] == hashlib.sha256(PROSE.encode()).hexdigest()
    assert res["text"]["ctx"] == 32 and res["text"]["n_scored_tokens"] == 2 * 31
    (s,) = res["students"]
    assert abs(s["kl_mean"]) < 1e-5 and s["top1_agree"] == 1.0
    assert s["ppl_student"] == pytest.approx(s["ppl_teacher"], rel=1e-5)
    assert not res["fidelity_cache"]["hit"] and res["teacher"]["id"].startswith("dir:")
