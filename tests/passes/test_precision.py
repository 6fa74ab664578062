"""asa_export.passes.precision: fp16 / bf16 graphs for strongly typed TensorRT builds."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from asa_export.errors import AsaExportError
from asa_export.passes.canonicalize import infer_shapes
from asa_export.passes.precision import convert_precision
from tests.passes.attention_graphs import build


def _convert(proto: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    model = ir.from_proto(proto)
    infer_shapes(model)
    convert_precision(model, precision)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    # Strict type inference fails on any node whose inputs disagree in type.
    onnx.shape_inference.infer_shapes(out, strict_mode=True, check_type=True)
    return out


def _feeds(rng, s=97):
    return {"q": rng.standard_normal((2, 4, s, 16), dtype=np.float32),
            "k": rng.standard_normal((2, 2, s, 16), dtype=np.float32),
            "v": rng.standard_normal((2, 2, s, 16), dtype=np.float32),
            "attention_mask": (rng.random((2, s)) > 0.2).astype(np.int64)}


def _op_types(proto, dtype):
    """op_type of every node whose first output has `dtype`."""
    types = {v.name: v.type.tensor_type.elem_type for v in
             onnx.shape_inference.infer_shapes(proto).graph.value_info}
    return {n.op_type for n in proto.graph.node if types.get(n.output[0]) == dtype}


@pytest.mark.parametrize("precision,dtype", [("fp16", onnx.TensorProto.FLOAT16),
                                             ("bf16", onnx.TensorProto.BFLOAT16)])
def test_matmuls_go_low_softmax_stays_fp32_io_stays_fp32(precision, dtype):
    out = _convert(build(mask="causal+padding"), precision)
    assert "MatMul" in _op_types(out, dtype)
    assert "Softmax" in _op_types(out, onnx.TensorProto.FLOAT)
    assert {i.type.tensor_type.elem_type for i in out.graph.input if i.name != "attention_mask"} \
        == {onnx.TensorProto.FLOAT}
    assert out.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_graph_matches_fp32_in_onnx_runtime():
    proto = build(mask="causal+padding")
    out = _convert(proto, "fp16")
    feeds = _feeds(np.random.default_rng(0))
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]
    got = ort.InferenceSession(out.SerializeToString()).run(None, feeds)[0]
    assert got.dtype == np.float32
    # fp16 inputs carry ~5e-4 relative error; outputs are convex mixes of unit-normal values.
    assert np.abs(got - ref).max() < 5e-3


def test_fp16_constants_are_clipped_but_infinities_kept():
    """A mask's float min (-3.4e38) must stay finite in fp16; a real -inf stays -inf."""
    from onnx import TensorProto, helper, numpy_helper

    c = numpy_helper.from_array(np.array([-3.4e38, -np.inf, 1.5], np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [c])
    out = _convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), "fp16")
    (const,) = [numpy_helper.to_array(t) for t in out.graph.initializer]
    assert const.dtype == np.float16
    assert const.tolist() == [-65504.0, -np.inf, 1.5]


def test_fp32_is_a_no_op_and_bad_precision_is_refused():
    model = ir.from_proto(build())
    assert convert_precision(model, "fp32").casts == 0
    with pytest.raises(AsaExportError, match="unsupported precision"):
        convert_precision(model, "fp8")
