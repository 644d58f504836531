"""One config rule for every tool (base layer): a frozen dataclass is the source of the flags, the
PREFIX_* environment names, the --help text and the defaults, so none of them can drift.

    @dataclass(frozen=True)
    class DistillConfig:
        lr: float = option(1e-2, "learning rate")
    TOOL = Tool("distill_run", "OPD_", DistillConfig, "On-policy distillation ...")
    cfg = tool_config.resolve(TOOL, argv)

Precedence, lowest first: the dataclass default < the recipe file (configs/*.env, KEY=VALUE lines) <
a deprecated unprefixed environment name (read for one release, with a one-line notice naming the new
name) < PREFIX_FIELD in the environment < --field on the command line.

As in nanoGPT's configurator: an unknown key is refused (in the environment under the tool's prefix, or
in a recipe file, with its line), and a value keeps its default's type: one bool parser, one int rule.
Relative paths given on the command line or in the environment resolve against the caller's cwd; those
in a recipe file or a default are the project's own files and resolve against the repository.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import cache_paths

TRUE_WORDS, FALSE_WORDS = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
_RECIPE_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_BASH_DEFAULT = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):?-(.*)\}$")  # old recipes: KEY="${KEY:-value}"


class ConfigError(ValueError):
    """A bad key or value; the message names the key, where it came from, and what is accepted."""


def option(default: Any, help: str, *, legacy: Sequence[str] = (), path: bool = False,
           choices: Sequence[str] | None = None, kind: type | None = None, parse=None, repeat: bool = False,
           sep: str = ",", flag: str | None = None, factory=None, internal: bool = False) -> Any:
    """A config field. `legacy`: old env names still read (with a notice); `path`: resolved against the
    cwd; `kind`: the value type when the default is None (else the default's type); `parse`: a function
    for structured values (str -> value, or list of str -> value with `repeat`: a repeatable flag, and
    env/recipe values split on `sep`); `flag`: the flag when it is not --field-name; `factory`: a
    default_factory for mutable defaults; `internal`: derived from other fields, no flag and no env name."""
    meta = {"help": help, "legacy": tuple(legacy), "path": path, "choices": tuple(choices) if choices else None,
            "kind": kind, "parse": parse, "repeat": repeat, "sep": sep, "flag": flag, "internal": internal}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Tool:
    prog: str
    prefix: str  # e.g. "OPD_"
    config: type
    description: str = ""


def kind_of(f: dataclasses.Field) -> type:
    kind = f.metadata.get("kind")
    if kind is not None:
        return kind
    return str if f.default is None else type(f.default)


def parse_bool(raw: str, key: str) -> bool:
    v = str(raw).strip().lower()
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    raise ConfigError(f"{key}={raw!r}: expected one of {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}")


def convert(f: dataclasses.Field, raw: Any, key: str) -> Any:
    """RAW (a string from a flag, env or recipe) as the field's type; '' or 'none' keeps an optional unset."""
    parse = f.metadata.get("parse")
    if parse is not None:
        if f.metadata.get("repeat") and isinstance(raw, str):
            raw = [x for x in raw.split(f.metadata.get("sep") or ",") if x.strip()]
        try:
            return parse(raw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}={raw!r}: {e}") from None
    if not isinstance(raw, str):
        return raw
    if f.default is None and raw.strip().lower() in ("", "none"):
        return None
    kind = kind_of(f)
    if kind is bool:
        value = parse_bool(raw, key)
    else:
        try:
            value = kind(raw.strip()) if kind in (int, float) else raw
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: not a valid {kind.__name__}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: unknown {f.name.replace('_', ' ')} {value!r}; choose one of {', '.join(choices)}")
    return value


def env_name(tool: Tool, f: dataclasses.Field) -> str:
    return tool.prefix + f.name.upper()


def env_given(f: dataclasses.Field, environ: Mapping[str, str], key: str) -> bool:
    """Whether KEY in the environment sets F. An empty value is 'unset', except for an optional field
    (default None or ""), where it is the explicit 'none' (e.g. QUANT_BITS_PLAN= builds without a plan)."""
    if key not in environ:
        return False
    return environ[key] != "" or f.default in (None, "")


def read_recipe(path: Path, environ: Mapping[str, str] | None = None) -> dict:
    """KEY -> (value, line number) from a configs/*.env file; `$MOE_LOWBIT_*` roots are expanded."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("MOE_LOWBIT_MODELS", str(cache_paths.models_root(env)))
    env.setdefault("MOE_LOWBIT_CACHE", str(cache_paths.cache_root(env)))
    env.setdefault("MOE_LOWBIT_SCRATCH", str(cache_paths.scratch_root(env)))
    out = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path}: unreadable ({e})") from None
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _RECIPE_LINE.match(line)
        if not m:
            raise ConfigError(f"{path}:{no}: expected KEY=VALUE, got {line.strip()!r}")
        value = _strip_value(m.group(2))
        bash = _BASH_DEFAULT.match(value)
        if bash:
            value = _strip_value(bash.group(2))
        for root in ("MOE_LOWBIT_MODELS", "MOE_LOWBIT_CACHE", "MOE_LOWBIT_SCRATCH"):
            value = value.replace("${" + root + "}", env[root]).replace("$" + root, env[root])
        out[m.group(1)] = (value, no)
    return out


def _strip_value(raw: str) -> str:
    """Drop a trailing comment and one level of quotes."""
    raw = raw.strip()
    if raw.startswith("#"):
        return ""
    if raw[:1] in ("'", '"'):
        end = raw.find(raw[0], 1)
        return raw[1:end] if end > 0 else raw[1:]
    return raw.split(" #", 1)[0].split("\t#", 1)[0].strip()


def build_parser(tool: Tool, extra: Sequence[tuple[tuple, dict]] = ()) -> argparse.ArgumentParser:
    """--field-name per field; help shows the env name and the default. `extra`: run-only flags."""
    ap = argparse.ArgumentParser(prog=tool.prog, description=tool.description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None, help=f"a configs/*.env recipe file [env {tool.prefix}RECIPE]")
    for f in dataclasses.fields(tool.config):
        if f.metadata.get("internal"):
            continue
        kind = kind_of(f)
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default in (None, "") or f.metadata.get("parse") else f"; default {default}"
        extra_kw = {"action": "append"} if f.metadata.get("repeat") else {}
        if kind is bool and not f.metadata.get("parse"):  # `--flag` alone means on; `--flag off` works too
            extra_kw = {"nargs": "?", "const": "on", "metavar": "on|off"}
        ap.add_argument(f.metadata.get("flag") or "--" + f.name.replace("_", "-"), dest=f.name, default=None,
                        help=f"{f.metadata.get('help', '')} [env {env_name(tool, f)}{shown}]",
                        **({"metavar": f.name.upper()} | extra_kw))
    for args, kwargs in extra:
        ap.add_argument(*args, **kwargs)
    return ap


def resolve(tool: Tool, args: argparse.Namespace, environ: Mapping[str, str] | None = None,
            cwd: Path | None = None, notice=lambda m: print(m, file=sys.stderr), legacy: bool = True,
            default_recipe: str | Path | None = None, known_env: Sequence[str] = (), errors: list | None = None):
    """The config from defaults < recipe < legacy env < PREFIX_ env < flags; every bad key named at once.
    `legacy=False` ignores the old unprefixed env names (a module run directly, not through its pipeline,
    must not pick up a stray MODEL or OUT; an old name under the prefix, like SMOKE_TP, is always read);
    `default_recipe`: the recipe when none is named; `known_env`: other PREFIX_ names a companion tool reads;
    `errors`: a list that collects every bad key and value instead of raising (the config is then built from
    the good ones), for a tool that adds its own checks to one message."""
    env = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    fields = {f.name: f for f in dataclasses.fields(tool.config) if not f.metadata.get("internal")}
    problems, values, from_user = [], {}, set()
    recipe_path = getattr(args, "recipe", None) or env.get(tool.prefix + "RECIPE") or None
    if not recipe_path and legacy and env.get("RECIPE"):
        notice(f"{tool.prog}: RECIPE is deprecated; use {tool.prefix}RECIPE")
        recipe_path = env["RECIPE"]
    recipe_path = recipe_path or default_recipe
    if recipe_path:
        recipe_path = _absolute(recipe_path, cwd)
        for key, (raw, no) in read_recipe(recipe_path, env).items():
            name = _recipe_field(tool, fields, key)
            if name not in fields:
                problems.append(f"{recipe_path}:{no}: unknown key {key} (known: {', '.join(sorted(k.upper() for k in fields))})")
                continue
            values[name] = (raw, f"{recipe_path}:{no} {key}")
    for name, f in fields.items():
        for old in (o for o in f.metadata.get("legacy", ()) if legacy or o.startswith(tool.prefix)):
            if env_given(f, env, old) and not env_given(f, env, env_name(tool, f)) and getattr(args, name, None) is None:
                notice(f"{tool.prog}: {old} is deprecated; use {env_name(tool, f)}")
                values[name] = (env[old], old)
                from_user.add(name)
        if env_given(f, env, env_name(tool, f)):
            values[name] = (env[env_name(tool, f)], env_name(tool, f))
            from_user.add(name)
        if getattr(args, name, None) is not None:
            values[name] = (getattr(args, name), "--" + name.replace("_", "-"))
            from_user.add(name)
    known_env = ({env_name(tool, f) for f in fields.values()} | {tool.prefix + "RECIPE"} | set(known_env)
                 | {old for f in fields.values() for old in f.metadata.get("legacy", ())})
    unknown = sorted(k for k in env if k.startswith(tool.prefix) and k not in known_env)
    if unknown:
        problems.append(f"unknown environment key(s) {', '.join(unknown)} for {tool.prog}")
    out = {}
    for name, (raw, where) in values.items():
        if fields[name].metadata.get("path") and isinstance(raw, str) and raw:
            raw = str(_absolute(raw, cwd if name in from_user else cache_paths.REPO_ROOT))
        try:
            value = convert(fields[name], raw, where)
        except ConfigError as e:
            problems.append(str(e))
            continue
        out[name] = value
    if problems:
        if errors is None:
            raise ConfigError("; ".join(problems))
        errors.extend(problems)
    try:
        return tool.config(**out)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _recipe_field(tool: Tool, fields: Mapping[str, dataclasses.Field], key: str) -> str | None:
    """The field a recipe key names: PREFIX_FIELD, FIELD, or one of the field's old names."""
    if key.startswith(tool.prefix) and key[len(tool.prefix):].lower() in fields:
        return key[len(tool.prefix):].lower()
    if key.lower() in fields:
        return key.lower()
    return next((n for n, f in fields.items() if key in f.metadata.get("legacy", ())), None)


def _absolute(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p
