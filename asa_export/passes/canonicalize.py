"""Canonicalize: give every value the most precise shape we can prove, before matching.

    values with unknown or "-1"-derived dims  ->  values with symbolic / static dims

Rules check shapes against named dimensions (B, H, S, D), so head counts must be static where the
model allows it. TorchScript exports compute their reshape targets from Shape ops; ONNX Runtime's
symbolic shape inference resolves those. Weights play no part in shapes, so large initializers are
turned into typed graph inputs before inference: models over 2 GB never hit protobuf's limit.
The graph's nodes are not changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

# Initializers above this many elements are replaced by inputs for shape inference.
_SMALL_INITIALIZER = 1024


def _skeleton(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto with only small initializers (large ones become typed inputs)."""
    graph = model.graph
    large = {
        name: value
        for name, value in graph.initializers.items()
        if value.const_value is not None and value.const_value.size > _SMALL_INITIALIZER
    }
    saved = {name: value.const_value for name, value in large.items()}
    serde_logger = logging.getLogger("onnx_ir")
    level = serde_logger.level
    serde_logger.setLevel(logging.ERROR)  # it warns about each data-less initializer
    try:
        for value in large.values():
            value.const_value = None  # serialize without the data
        proto = ir.serde.serialize_model(model)
    finally:
        for name, value in large.items():
            value.const_value = saved[name]
        serde_logger.setLevel(level)
    existing = {i.name for i in proto.graph.input}
    kept = [init for init in proto.graph.initializer if init.name not in large]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    for name, value in large.items():
        if name not in existing:
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(
                    name, int(value.dtype), [d if isinstance(d, int) else None for d in value.shape]
                )
            )
    return proto


def _infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with _in_temporary_directory():
            return SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception as exc:  # unsupported op or failed merge: fall back to ONNX's inference
        logger.info("symbolic shape inference failed (%s); using onnx shape inference", exc)
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:
        logger.info("onnx shape inference failed (%s); keeping the model's own shapes", exc)
        return proto


@contextlib.contextmanager
def _in_temporary_directory():
    """Run the block with a fresh temporary directory as the working directory.

    ONNX Runtime's SymbolicShapeInference saves "sym_shape_infer_temp.onnx" into the current
    directory before raising when its inference is incomplete (any op it does not know); without
    this the tool would leave that file in the user's directory. The working directory is
    process-wide, so concurrent rewrites in other threads must not rely on relative paths.
    """
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="asa_shapes_") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(previous)


def _shape_from_proto(type_proto: onnx.TypeProto) -> ir.Shape | None:
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return None
    out = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return ir.Shape(out)


def _precision(shape) -> tuple[int, int]:
    """(static dims, known dims): a shape with more of either tells the rules more."""
    if shape is None:
        return (-1, -1)
    static = sum(1 for d in shape if isinstance(d, int))
    return static, sum(1 for d in shape if isinstance(d, int) or d.value is not None)


def infer_shapes(model: ir.Model) -> None:
    """Fill in value shapes and types of `model`'s main graph in place (nodes untouched)."""
    inferred = _infer(_skeleton(model))
    infos = {vi.name: vi for vi in inferred.graph.value_info}
    infos.update({vi.name: vi for vi in inferred.graph.output})
    for node in model.graph:
        for value in node.outputs:
            info = infos.get(value.name)
            if info is None:
                continue
            elem = info.type.tensor_type.elem_type
            if value.dtype is None and elem:
                value.dtype = ir.DataType(elem)
            shape = _shape_from_proto(info.type)
            if shape is not None and _precision(shape) > _precision(value.shape):
                value.shape = shape
