"""passes.canonicalize.infer_shapes: nothing is written to the user's working directory."""

from __future__ import annotations

import os

import onnx_ir as ir
from onnx import TensorProto, helper

from asa_export.passes import canonicalize


def test_incomplete_symbolic_inference_leaves_no_file_in_the_working_directory(tmp_path,
                                                                               monkeypatch):
    # ONNX Runtime's symbolic inference saves sym_shape_infer_temp.onnx into the current
    # directory before raising on an op it does not know.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Mystery", ["x"], ["t"], domain="custom.x"),
             helper.make_node("Relu", ["t"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("custom.x", 1)])
    monkeypatch.chdir(tmp_path)
    canonicalize.infer_shapes(ir.serde.deserialize_model(proto))
    assert os.getcwd() == str(tmp_path)
    assert os.listdir(tmp_path) == []
