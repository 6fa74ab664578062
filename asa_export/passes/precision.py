"""Precision: turn an fp32 graph into an fp16 / bf16 one for strongly typed TensorRT builds.

    x:fp32 -> MatMul -> Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul -> ASA -> Softmax -> y:fp32
      ==>
    x:fp32 -> Cast(lo) -> MatMul[lo] -> Cast(f32) -> Pow[f32] -> ReduceMean[f32] -> Add[f32]
           -> Sqrt[f32] -> Div[f32] -> Mul[f32] -> Cast(lo) -> ASA[lo] -> Cast(f32) -> Softmax[f32]
           -> y:fp32

TensorRT 10.12+ and TensorRT-RTX build strongly typed networks: the types written in the ONNX
graph are the precisions the engine runs in, so `--precision fp16|bf16` is a graph rewrite, not a
builder flag. Each node gets a compute type:

- LOW_OPS (matrix products and the ASA node) run in the target type: the speed is there, and the
  kernels accumulate in fp32 anyway.
- FP32_OPS (softmax, normalizations, reductions, powers, position ranges) run in fp32: they sum
  many terms or need integer-exact positions beyond fp16's 2048.
- Every other op follows its inputs: fp32 if any non-constant float input is fp32, else the target
  type. A norm's fp32 result thus flows through the elementwise ops after it (scale, residual
  mix) until the next matrix product casts it down.

Constants (initializers, Constant nodes) do not vote; they are converted to whatever type their
consumer computes in (fp16 copies clipped to +-65504, so masks' float min stays finite). Graph
inputs and outputs keep their fp32 type (services bind fp32 buffers); casts sit just inside.
ASA inputs that the contract fixes (key_padding_mask, head_thresholds fp32) are left as they are.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from asa_export import contract
from asa_export.errors import AsaExportError

PRECISIONS = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}

LOW_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger", contract.OP_TYPE,
})
FP32_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "SimplifiedLayerNormalization",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization",
    "GroupNormalization", "InstanceNormalization", "BatchNormalization", "ReduceMean", "ReduceSum",
    "ReduceSumSquare", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "Pow",
    "CumSum", "Range",
})
# Ops whose float output type is set by an attribute, not by their inputs.
_TYPED_BY_ATTRIBUTE = frozenset({
    "Cast", "ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "EyeLike", "Multinomial", "Bernoulli",
})
# ASA input slots that keep their own type (SPEC.md: mask is bool/int, head_thresholds and the
# learned gate weights float32).
_ASA_FIXED_SLOTS = frozenset({3, 5, 6, 7})
_FP16_MAX = float(np.finfo(np.float16).max)
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclasses.dataclass
class PrecisionReport:
    """What the conversion did.

    Args:
        precision: "fp32", "fp16" or "bf16".
        low_nodes: nodes computing in the target type.
        fp32_nodes: nodes kept in fp32.
        casts: Cast nodes inserted.
        converted_initializers: initializers given a target-type copy.
    """

    precision: str
    low_nodes: int = 0
    fp32_nodes: int = 0
    casts: int = 0
    converted_initializers: int = 0


def check_precision(precision: str) -> ir.DataType:
    """The ONNX data type of `precision`, or an AsaExportError naming the choices."""
    if precision not in PRECISIONS:
        raise AsaExportError(
            f"unsupported precision {precision!r}: choose one of {', '.join(PRECISIONS)}"
        )
    return PRECISIONS[precision]


def convert_precision(model: ir.Model, precision: str) -> PrecisionReport:
    """Rewrite the fp32 parts of `model` in place to compute in `precision` (see module doc).

    Args:
        model: a model whose values carry dtypes (after asa_export.passes.pipeline.rewrite_model
            or shape inference).
        precision: "fp32" (no change), "fp16" or "bf16".

    Returns:
        A PrecisionReport with node and cast counts.

    Raises:
        AsaExportError: unknown precision, or a graph with control-flow subgraphs.
    """
    low = check_precision(precision)
    report = PrecisionReport(precision)
    if low == ir.DataType.FLOAT:
        return report
    _Converter(model, low, report).run()
    return report


class _Converter:
    def __init__(self, model: ir.Model, low: ir.DataType, report: PrecisionReport):
        self.model, self.graph, self.low, self.report = model, model.graph, low, report
        self.casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        self.const_copies: dict[tuple[str, ir.DataType], ir.Value] = {}
        self.constants = {id(v) for v in self.graph.initializers.values()}
        # Graph inputs keep fp32 and vote for the target type: each consumer casts as it needs.
        self.inputs = {id(v) for v in self.graph.inputs}
        self.out_types = {id(v): v.dtype for v in self.graph.outputs}

    def run(self) -> None:
        self._check_no_subgraphs()
        for node in list(self.graph):
            if node.op_type == "Constant":
                self.constants.update(id(o) for o in node.outputs)
        for node in list(self.graph):
            if node.op_type != "Constant" and not self._inserted(node):
                self._convert_node(node)
        self._restore_output_types()
        self._drop_unused_originals()

    def _check_no_subgraphs(self) -> None:
        for node in self.graph.all_nodes() if hasattr(self.graph, "all_nodes") else self.graph:
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                   for a in node.attributes.values()):
                raise AsaExportError(
                    f"precision conversion does not handle control flow ({node.op_type} node "
                    f"{node.name!r}); build with --precision fp32"
                )

    def _inserted(self, node: ir.Node) -> bool:
        return node.meta.get("asa_export.precision_cast", False)

    def _cast(self, value: ir.Value, dtype: ir.DataType, before: ir.Node) -> ir.Value:
        """`value` as `dtype`: a converted constant copy or a (shared) Cast node."""
        key = (id(value), dtype)
        if key in self.casts:
            return self.casts[key]
        if value.const_value is not None and id(value) in self.constants and value.is_initializer():
            return self._const_copy(value, dtype)
        cast = ir.node("Cast", [value], attributes={"to": dtype},
                       name=f"{value.name}/cast_{dtype.name.lower()}")
        cast.meta["asa_export.precision_cast"] = True
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = f"{value.name}/{dtype.name.lower()}", dtype, value.shape
        self.graph.insert_before(before, cast)
        self.report.casts += 1
        self.casts[key] = out
        return out

    def _const_copy(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        key = (value.name, dtype)
        if key not in self.const_copies:
            array = value.const_value.numpy().astype(np.float32)
            if dtype == ir.DataType.FLOAT16:
                # Finite values beyond fp16's range (a mask's float min) stay finite; inf stays inf.
                clipped = np.clip(array, -_FP16_MAX, _FP16_MAX)
                array = np.where(np.isfinite(array), clipped, array).astype(np.float16)
            elif dtype == ir.DataType.BFLOAT16:
                array = array.astype(ml_dtypes.bfloat16)
            name = f"{value.name}/{dtype.name.lower()}"
            copy = ir.Value(name=name, shape=value.shape, type=ir.TensorType(dtype),
                            const_value=ir.Tensor(array, name=name))
            self.graph.register_initializer(copy)
            self.constants.add(id(copy))
            self.const_copies[key] = copy
            self.report.converted_initializers += 1
        return self.const_copies[key]

    def _compute_type(self, node: ir.Node, float_inputs: list[tuple[int, ir.Value]]) -> ir.DataType:
        if node.op_type in LOW_OPS:
            return self.low
        if node.op_type in FP32_OPS:
            return ir.DataType.FLOAT
        votes = [self.low if id(v) in self.inputs else v.dtype
                 for _, v in float_inputs if id(v) not in self.constants]
        return ir.DataType.FLOAT if ir.DataType.FLOAT in votes else self.low

    def _float_inputs(self, node: ir.Node) -> list[tuple[int, ir.Value]]:
        fixed = _ASA_FIXED_SLOTS if node.op_type == contract.OP_TYPE else frozenset()
        if node.op_type == "Cast":
            return []
        return [(i, v) for i, v in enumerate(node.inputs)
                if v is not None and v.dtype in _FLOATS and i not in fixed]

    def _convert_node(self, node: ir.Node) -> None:
        float_inputs = self._float_inputs(node)
        compute = self._compute_type(node, float_inputs)
        for idx, value in float_inputs:
            if value.dtype != compute:
                node.replace_input_with(idx, self._cast(value, compute, node))
        if node.op_type in _TYPED_BY_ATTRIBUTE:
            return
        if not float_inputs and node.op_type not in LOW_OPS:
            return  # e.g. Shape, integer ops: outputs keep their types
        for out in node.outputs:
            if out.dtype == ir.DataType.FLOAT:
                out.dtype = compute
        if compute == ir.DataType.FLOAT:
            self.report.fp32_nodes += 1
        else:
            self.report.low_nodes += 1

    def _drop_unused_originals(self) -> None:
        for name, _ in list(self.const_copies):
            value = self.graph.initializers.get(name)
            if value is not None and not value.uses() and not value.is_graph_output():
                del self.graph.initializers[name]

    def _restore_output_types(self) -> None:
        for i, value in enumerate(list(self.graph.outputs)):
            want = self.out_types.get(id(value))
            if want is None or value.dtype == want or value.dtype not in _FLOATS:
                continue
            name = value.name
            value.name = f"{name}/{value.dtype.name.lower()}"
            cast = ir.node("Cast", [value], attributes={"to": want}, name=f"{name}/cast_out")
            out = cast.outputs[0]
            out.name, out.dtype, out.shape = name, want, value.shape
            self.graph.append(cast)
            self.graph.outputs[i] = out
            self.report.casts += 1
