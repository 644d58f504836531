"""The router-type hook around llama.cpp's converter (src/quant/gguf_convert.py); the real conversion
runs in test_gguf_pack.py's tiny qwen3_5_moe pack, which reads the router back as f16."""
import gguf
import pytest

import gguf_convert as gc


class FakeModel:
    """Stands in for a convert_hf_to_gguf model class: the two methods the hook touches, and the
    converter's rule that every subclass restates model_arch."""

    model_arch = gguf.MODEL_ARCH.QWEN35MOE

    def __init_subclass__(cls):
        if "model_arch" not in cls.__dict__:
            raise TypeError(f"Missing property 'model_arch' for {cls.__name__!r}")

    def match_model_tensor_name(self, name, key, bid, suffix=".weight"):
        return key == gguf.MODEL_TENSOR.FFN_GATE_INP and name == f"blk.{bid}.ffn_gate_inp{suffix}"

    def tensor_force_quant(self, name, new_name, bid, n_dims):
        return gguf.GGMLQuantizationType.Q8_0 if new_name.startswith("forced.") else False


def test_router_gets_the_requested_type_and_everything_else_keeps_the_converters_answer():
    cls = gc.with_router_type(FakeModel, gguf, gc.router_type_override(gguf, "f16"))
    model = cls()
    assert issubclass(cls, FakeModel) and cls.__name__ == "FakeModel" and cls.model_arch == FakeModel.model_arch
    assert model.tensor_force_quant("x", "blk.3.ffn_gate_inp.weight", 3, 2) == gguf.GGMLQuantizationType.F16
    assert model.tensor_force_quant("x", "blk.3.ffn_gate_inp_shexp.weight", 3, 2) is False
    assert model.tensor_force_quant("x", "blk.3.ffn_gate_inp.weight", 3, 1) is False  # 1-D: converter decides
    assert model.tensor_force_quant("x", "forced.attn.weight", 0, 2) == gguf.GGMLQuantizationType.Q8_0


def test_f32_means_no_override_and_bf16_is_offered():
    assert gc.router_type_override(gguf, "f32") is None
    assert gc.router_type_override(gguf, "bf16") == gguf.GGMLQuantizationType.BF16


def test_cli_refuses_a_tree_without_the_converter_and_missing_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit, match="convert_hf_to_gguf.py not found"):
        gc.main(["--tree", str(tmp_path), "--", "model", "--outtype", "bf16"])
    with pytest.raises(SystemExit):
        gc.main(["--tree", str(tmp_path)])
    assert "after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gc.main(["--tree", str(tmp_path), "--router-type", "q8_0", "--", "m"])
