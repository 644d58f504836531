"""tool_config: one dataclass -> flags, PREFIX_* env, help, defaults; unknown keys refused; typed values."""
from dataclasses import dataclass, fields

import pytest

import tool_config
from tool_config import ConfigError, option


@dataclass(frozen=True)
class Demo:
    model: str = option("embedded:smollm2", "the model", legacy=("MODEL",))
    bits: float = option(3.0, "bits")
    steps: int = option(16, "steps")
    eager: bool = option(False, "eager")
    limit: int | None = option(None, "optional int", kind=int)
    out: str = option("models/x", "output dir", path=True, legacy=("OUT",))
    grid: str = option("sym", "grid", choices=("sym", "full"))


TOOL = tool_config.Tool("demo", "DEMO_", Demo, "a demo tool")


def resolve(argv=(), env=None, cwd="/work/cwd", notices=None):
    args = tool_config.build_parser(TOOL).parse_args(list(argv))
    return tool_config.resolve(TOOL, args, env or {}, cwd=cwd,
                               notice=(notices.append if notices is not None else lambda m: None))


def test_defaults_and_precedence(tmp_path):
    assert resolve() == Demo()
    recipe = tmp_path / "r.env"
    recipe.write_text('# comment\nBITS=2.5\nexport DEMO_STEPS="${DEMO_STEPS:-8}"   # bash form still read\n'
                      'OUT=${MOE_LOWBIT_MODELS}/q\n')
    env = {"DEMO_RECIPE": str(recipe), "MOE_LOWBIT_MODELS": "/m"}
    cfg = resolve(env=env)
    assert (cfg.bits, cfg.steps, cfg.out) == (2.5, 8, "/m/q")
    cfg = resolve(["--steps", "4"], env={**env, "DEMO_BITS": "2.0", "DEMO_STEPS": "6"})
    assert (cfg.bits, cfg.steps) == (2.0, 4)  # env beats recipe, flag beats env


def test_types_follow_the_default():
    cfg = resolve(env={"DEMO_EAGER": "yes", "DEMO_LIMIT": "7"})
    assert cfg.eager is True and cfg.limit == 7 and isinstance(cfg.limit, int)
    assert resolve(["--eager", "off", "--limit", "none"]).eager is False
    assert resolve(["--limit", "none"]).limit is None
    with pytest.raises(ConfigError, match="DEMO_EAGER='maybe'"):
        resolve(env={"DEMO_EAGER": "maybe"})
    with pytest.raises(ConfigError, match="--steps='1.5': not a valid int"):
        resolve(["--steps", "1.5"])
    with pytest.raises(ConfigError, match="--grid: unknown grid .diag.; choose one of sym, full"):
        resolve(["--grid", "diag"])


def test_unknown_keys_are_named_all_at_once(tmp_path):
    recipe = tmp_path / "r.env"
    recipe.write_text("BITS=3\nEXPERT_BTIS=2\n")
    with pytest.raises(ConfigError) as e:
        resolve(env={"DEMO_RECIPE": str(recipe), "DEMO_STPES": "3", "DEMO_BITS": "x"})
    msg = str(e.value)
    assert f"{recipe}:2: unknown key EXPERT_BTIS" in msg and "DEMO_STPES" in msg and "DEMO_BITS='x'" in msg
    recipe.write_text("BITS=3\nif [ x ]; then\n")
    with pytest.raises(ConfigError, match=r"r.env:2: expected KEY=VALUE"):
        resolve(env={"DEMO_RECIPE": str(recipe)})


def test_old_names_work_once_with_a_notice():
    notices = []
    cfg = resolve(env={"MODEL": "/ckpt", "OUT": "rel/out"}, notices=notices)
    assert cfg.model == "/ckpt"
    assert notices == ["demo: MODEL is deprecated; use DEMO_MODEL", "demo: OUT is deprecated; use DEMO_OUT"]
    assert resolve(env={"MODEL": "/old", "DEMO_MODEL": "/new"}).model == "/new"


def test_paths_resolve_against_the_callers_cwd_or_the_repo(tmp_path):
    assert resolve(["--out", "rel"], cwd="/here").out == "/here/rel"
    assert resolve(env={"DEMO_OUT": "rel"}, cwd="/here").out == "/here/rel"
    recipe = tmp_path / "r.env"
    recipe.write_text("OUT=models/from_recipe\n")
    out = resolve(env={"DEMO_RECIPE": str(recipe)}, cwd="/here").out
    assert out == str(tool_config.cache_paths.REPO_ROOT / "models/from_recipe")


def test_help_names_env_and_default():
    text = tool_config.build_parser(TOOL).format_help()
    assert "[env DEMO_BITS; default 3.0]" in text and "--limit" in text


def test_opd_recipe_and_distill_config_agree():
    """configs/opd.env holds exactly DistillConfig's keys, at its defaults (no drift between the two)."""
    import distill_run

    recipe = tool_config.read_recipe(distill_run.RECIPE)
    names = {f.name for f in fields(distill_run.DistillConfig)}
    keys = {k[len("OPD_"):].lower() for k in recipe}
    assert keys == names, (keys ^ names)
    args = distill_run.build_parser().parse_args([])
    assert distill_run.config_from(args, {}) == tool_config.resolve(
        distill_run.TOOL, args, {"OPD_RECIPE": str(distill_run.RECIPE)})
    defaults = distill_run.DistillConfig()
    for key, (raw, _line) in recipe.items():
        f = next(f for f in fields(distill_run.DistillConfig) if f.name == key[4:].lower())
        if not f.metadata.get("path"):
            assert tool_config.convert(f, raw, key) == getattr(defaults, f.name), key
