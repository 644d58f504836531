"""Run llama.cpp's own convert_hf_to_gguf.py, storing the MoE router (`ffn_gate_inp`) at a chosen type.

The converter forces the router to F32 and llama-quantize never touches it afterwards, so without this
the router can only ever be F32. The recipe ships it as f16: from a BF16 source that is lossless for
every weight above fp16's normal floor (6.1e-5; BF16's 8 significant bits fit in fp16's 11) at half the
bytes of F32, and it is what the shipped artifact carries. Everything else is the converter, unchanged:
we only answer its own per-model hook, `tensor_force_quant`, for router tensors, on a subclass of the
model class it picked. Tensors the converter treats as 1-D (the shared-expert gate `[hidden, 1]`,
SSM scalars) stay F32 whatever we answer: the converter overrides the hook for them.

    python -m gguf_convert --tree LLAMA_CPP_TREE --router-type f16 -- MODEL_DIR --outtype bf16 --outfile X.gguf
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

ROUTER_TYPES = ("f16", "bf16", "f32")


def router_type_override(gguf_module, router_type: str):
    """The GGMLQuantizationType the router should get, or None to leave the converter's F32."""
    if router_type == "f32":
        return None
    return {"f16": gguf_module.GGMLQuantizationType.F16, "bf16": gguf_module.GGMLQuantizationType.BF16}[router_type]


def with_router_type(model_class, gguf_module, qtype):
    """A subclass of the converter's model class whose tensor_force_quant answers `qtype` for routers."""

    def tensor_force_quant(self, name, new_name, bid, n_dims):
        if n_dims >= 2 and self.match_model_tensor_name(new_name, gguf_module.MODEL_TENSOR.FFN_GATE_INP, bid):
            return qtype
        return model_class.tensor_force_quant(self, name, new_name, bid, n_dims)

    # the converter's classes refuse a subclass that does not restate model_arch in its own body
    body = {"tensor_force_quant": tensor_force_quant, "model_arch": model_class.model_arch}
    return type(model_class.__name__, (model_class,), body)


def run_converter(tree: Path, router_type: str, converter_args: Sequence[str]) -> int:
    script = tree / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"gguf_convert: {script} not found (--tree must be the llama.cpp source tree)")
    sys.path[:0] = [str(tree / "gguf-py"), str(tree)]
    import gguf  # noqa: E402  (the tree's own gguf-py, matching its converter)
    import convert_hf_to_gguf as converter  # noqa: E402

    qtype = router_type_override(gguf, router_type)
    if qtype is not None:
        pick = converter.get_model_class
        converter.get_model_class = lambda *a, **k: with_router_type(pick(*a, **k), gguf, qtype)
    sys.argv = [str(script), *converter_args]
    converter.main()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gguf_convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, required=True, help="llama.cpp source tree (its converter and gguf-py)")
    ap.add_argument("--router-type", choices=ROUTER_TYPES, default="f16",
                    help="type of ffn_gate_inp (default f16; f32 = the converter's own choice)")
    ap.add_argument("converter_args", nargs=argparse.REMAINDER, help="-- then convert_hf_to_gguf.py's arguments")
    args = ap.parse_args(argv)
    rest = args.converter_args[1:] if args.converter_args[:1] == ["--"] else args.converter_args
    if not rest:
        ap.error("give convert_hf_to_gguf.py's arguments after --")
    return run_converter(args.tree, args.router_type, rest)


if __name__ == "__main__":
    sys.exit(main())
