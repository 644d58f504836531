"""Bad checkpoints are refused in one line naming the tensor, with nothing written: a NaN/Inf in a tensor
that is copied unchanged (like one in a quantized tensor), and shard headers that contradict config.json."""
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_source
import quant_save
import shard_writer
import tiny_models

RECIPE = ["--expert-bits", "3", "--linear-bits", "4", "--group", "32", "--no-progress"]


@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    return tiny_models.build_tiny_checkpoint("llama", tmp_path_factory.mktemp("src") / "src")


def _copy_with(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _build(src: Path, out: Path, capsys) -> tuple:
    rc = quant_save.main(["--model", str(src), "--out", str(out), *RECIPE])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["copied norm", "quantized projection"])
def test_a_non_finite_tensor_is_refused_by_name_whether_copied_or_quantized(small_src, tmp_path, capsys, kind, value):
    names = sorted(load_file(str(small_src / "model.safetensors")))
    pick = "post_attention_layernorm.weight" if kind == "copied norm" else "mlp.down_proj.weight"
    name = next(n for n in names if n.endswith(pick))

    def poison(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[3] = value

    src = _copy_with(small_src, tmp_path / "bad", poison)
    rc, err = _build(src, tmp_path / "out", capsys)
    assert rc != 0 and len(err) == 1 and name in err[0] and "NaN/Inf" in err[0], err
    assert not (tmp_path / "out" / "_ptq_meta.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


def test_non_finite_count_reads_each_float_dtype():
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32"), (torch.float64, "F64")):
        t = torch.tensor([1.0, float("nan"), -float("inf"), 3.0, 0.0, -2.5], dtype=dtype)
        raw = t.view(torch.uint8).numpy().tobytes()
        assert shard_writer.non_finite_count(name, raw) == 2, name
    assert shard_writer.non_finite_count("I64", b"\xff" * 16) == 0


def _rewrite_header(shard: Path, edit) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


@pytest.mark.parametrize("case", ["embed shape", "layer index", "huge dimension"])
def test_a_header_that_contradicts_the_config_is_one_line_naming_the_tensor(small_src, tmp_path, capsys, case):
    src = _copy_with(small_src, tmp_path / "bad", lambda t: None)
    cfg = json.loads((src / "config.json").read_text())
    shard = src / "model.safetensors"

    def edit(header):
        if case == "embed shape":  # same bytes, rows and columns swapped
            entry = header["model.embed_tokens.weight"]
            entry["shape"] = entry["shape"][::-1]
            return "model.embed_tokens.weight"
        name = next(k for k in header if k.startswith("model.layers.0.") and k.endswith("mlp.down_proj.weight"))
        if case == "layer index":
            header[name.replace("layers.0.", f"layers.{cfg['num_hidden_layers']}.")] = header.pop(name)
        else:  # one huge dimension, the byte count unchanged: [a, b] -> [a*b*..., 1]
            entry = header[name]
            entry["shape"] = [entry["shape"][0] * entry["shape"][1], 1]
        return name

    names = []
    _rewrite_header(shard, lambda h: names.append(edit(h)))
    if case == "huge dimension":
        big = json.loads(shard.read_bytes()[8:8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]])
        if max(max(e["shape"]) for k, e in big.items() if k != "__metadata__") <= 2 * max(
                v for v in cfg.values() if isinstance(v, int) and not isinstance(v, bool)):
            pytest.skip("the tiny model's shapes are too small to exceed the bound")
    with pytest.raises(ckpt_source.BuildError, match="contradicts config.json"):
        ckpt_source.open_source(str(src))
    rc, err = _build(src, tmp_path / "out", capsys)
    assert rc != 0 and len(err) == 1 and "contradicts config.json" in err[0] and "tensor model." in err[0], err
    assert not (tmp_path / "out").exists()
