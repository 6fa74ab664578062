"""The model-local ONNX function of the ASA op: contract v1 semantics in standard ONNX ops.

A rewritten model carries, beside each `asa::AdaptiveSparseAttention` node, a FunctionProto with
the same semantics (SPEC.md) so that any ONNX runtime can run the node without our library:

    AdaptiveSparseAttention(q, k, v, [mask], [bias], [thresholds], [gate_q, gate_k])
      -> visibility (Range / compare) -> block visibility (Pad, Reshape, ReduceMax)
      -> router: block means (and, with the learned gate, block max/min and the two gate
         projections), MatMul, masked softmax (float32)
      -> selection: TopK order, exclusive CumSum < tau, ScatterElements back
      -> dense masked softmax attention with the kept blocks (MatMul, GQA by reshaping Q)
      -> outputs (+ telemetry: TopK ascending, ReduceSum)

It is written independently of `reference.py` (tests hold one against the other).

Naming: a node calls a function by (domain, op_type, overload). The node's op_type must stay
`AdaptiveSparseAttention` (TensorRT matches plugins by op_type), so every function is named
`AdaptiveSparseAttention` and the per-attribute-set identity lives in the IR-10 `overload`
field: `function_overload()` = `attrs.function_name()` + a suffix for the present optional
inputs, the number of outputs and (opset 14 only) the element type. Models that carry these
functions need IR version >= 10 (ONNX Runtime >= 1.17).

Attributes: the body bakes the attribute values in as constants (one function per attribute set),
yet the function declares every node attribute, `plugin_namespace` and `plugin_version`
included, so the call node's attributes are declared ones; the body ignores them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from asa_export.contract import (DOMAIN, INPUTS, OP_TYPE, OUTPUTS, PLUGIN_NAMESPACE,
                                 PLUGIN_VERSION, SELECT_PER_KV_GROUP, AsaAttributes)
from asa_export.errors import AsaExportError

MIN_OPSET = 14
MAX_OPSET = 25
# ONNX IR version that introduced FunctionProto.overload / NodeProto.overload.
MIN_IR_VERSION = 10
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def function_overload(attrs: AsaAttributes, present_inputs: tuple[bool, ...],
                      num_outputs: int, dtype: int | None = None) -> str:
    """Unique identity of the function for one attribute set, input set and output count.

    Args:
        attrs: the node's attributes.
        present_inputs: (key_padding_mask, attn_bias, head_thresholds, gate_q_weight,
            gate_k_weight) given or not; 3 flags mean no learned gate.
        num_outputs: 1..4, outputs in contract order.
        dtype: element type baked into the final Cast (only needed below opset 15).

    Returns:
        `attrs.function_name()` + suffix, e.g. `AdaptiveSparseAttention_0123456789_m1b0t0_o4`,
        or `..._m1b0t0g1_o4` with the learned gate (no `g` flag without it, so overloads of
        gate-less nodes keep the names they had before the gate existed).
    """
    present = _present_flags(present_inputs)
    flags = "".join(f"{c}{int(p)}" for c, p in zip("mbt", present))
    if present[3]:
        flags += "g1"
    suffix = f"_{flags}_o{num_outputs}"
    if dtype is not None:
        suffix += f"_{TensorProto.DataType.Name(dtype).lower()}"
    return attrs.function_name() + suffix


def function_attributes(attrs: AsaAttributes) -> list[str]:
    """Names of the attributes the function declares (and a call node may carry)."""
    return [*attrs.as_onnx_attributes(), "plugin_namespace", "plugin_version"]


def build_function(attrs: AsaAttributes, opset: int, present_inputs: tuple[bool, ...],
                   num_outputs: int, dtype: int | None = None) -> onnx.FunctionProto:
    """Build the model-local function for one attribute set.

    Args:
        attrs: the node's attributes (baked into the body as constants).
        opset: the model's default-domain opset (14..25); the body uses ops of that version.
        present_inputs: (key_padding_mask, attn_bias, head_thresholds, gate_q_weight,
            gate_k_weight) given or not; 3 flags mean no learned gate.
        num_outputs: 1..4: output, block_indices, block_counts, visible_counts.
        dtype: TensorProto element type of query/output. Needed for opset 14 (no CastLike);
            from opset 15 the output type follows the query and dtype may stay None.

    Returns:
        FunctionProto in domain `asa`, name `AdaptiveSparseAttention`, overload
        `function_overload(...)`.
    """
    _check_args(opset, present_inputs, num_outputs, dtype)
    present = _present_flags(present_inputs)
    body = _Body(opset)
    outputs = _emit(body, attrs, present, num_outputs, dtype)
    for name, value in zip(OUTPUTS, outputs):
        body.add("Identity", [value], [name])
    # All eight inputs are declared (the body reads only the present ones), so a call node may
    # spell missing trailing inputs as "" or drop them: ONNX Runtime rejects only more actual
    # than formal inputs.
    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), list(OUTPUTS[:num_outputs]), body.nodes,
        [helper.make_opsetid("", opset)], attributes=function_attributes(attrs),
        overload=function_overload(attrs, present, num_outputs, dtype),
        doc_string="AdaptiveSparseAttention contract v1 reference semantics; "
                   f"attributes {attrs.as_onnx_attributes()}")


def make_node(inputs: list[str], outputs: list[str], attrs: AsaAttributes, name: str,
              dtype: int | None = None) -> onnx.NodeProto:
    """An ASA call node, bound to the function `build_function` makes for the same arguments.

    Args:
        inputs: query, key, value, then optional inputs in contract order ("" = missing;
            trailing missing ones may be dropped).
        outputs: output, then optional telemetry outputs ("" = not wanted; trailing dropped).
        attrs: the node's attributes.
        name: node name.
        dtype: as given to `build_function` (opset 14 only).

    Returns:
        NodeProto of op_type `AdaptiveSparseAttention`, domain `asa`, carrying the contract
        attributes plus plugin_namespace / plugin_version, and the matching overload.
    """
    if not 3 <= len(inputs) <= len(INPUTS) or not all(inputs[:3]):
        raise AsaExportError(f"ASA node {name!r} needs query, key, value and at most "
                             f"{len(INPUTS)} inputs, got {inputs}")
    if not 1 <= len(outputs) <= len(OUTPUTS) or not outputs[0]:
        raise AsaExportError(f"ASA node {name!r} needs the output and at most {len(OUTPUTS)} "
                             f"outputs, got {outputs}")
    optional = list(inputs[3:]) + [""] * (len(INPUTS) - len(inputs))
    present = tuple(bool(x) for x in optional)
    num_outputs = max(i for i, o in enumerate(outputs) if o) + 1
    # Trailing empty names carry nothing; they are dropped (the ONNX convention).
    num_inputs = 3 + max([i + 1 for i, p in enumerate(present) if p], default=0)
    node = helper.make_node(
        OP_TYPE, list(inputs[:num_inputs]), list(outputs[:num_outputs]), name=name, domain=DOMAIN,
        plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
        **attrs.as_onnx_attributes())
    node.overload = function_overload(attrs, present, num_outputs, dtype)
    return node


def selection_model(attrs: AsaAttributes, opset: int, has_thresholds: bool) -> onnx.ModelProto:
    """The function's selection step alone, as a model (tests compare it with
    `reference.select_blocks` on hand-made scores, ties included).

    Args:
        attrs: the node's attributes.
        opset: default-domain opset (14..25).
        has_thresholds: whether a `head_thresholds` [Hq] input is given.

    Returns:
        Model with inputs query [B, Hq, Sq, 1], key [B, Hkv, Skv, 1] (only their shapes are
        read), probs float32 [B, Hsel, NQ, NK], visible bool [B, NQ, NK] (and head_thresholds);
        output keep bool [B, Hsel, NQ, NK].
    """
    _check_args(opset, (False, False, has_thresholds, False, False), 1, TensorProto.FLOAT)
    g = _Body(opset)
    g.add("Identity", ["key"], ["value"])
    d = _Dims(g, attrs.block_size)
    keep = _select(g, d, attrs, "probs", "visible", has_thresholds)
    g.add("Identity", [keep], ["keep"])
    f32, boolean = TensorProto.FLOAT, TensorProto.BOOL
    inputs = [helper.make_tensor_value_info("query", f32, ["B", "Hq", "Sq", 1]),
              helper.make_tensor_value_info("key", f32, ["B", "Hkv", "Skv", 1]),
              helper.make_tensor_value_info("probs", f32, ["B", "Hsel", "NQ", "NK"]),
              helper.make_tensor_value_info("visible", boolean, ["B", "NQ", "NK"])]
    if has_thresholds:
        inputs.append(helper.make_tensor_value_info("head_thresholds", f32, ["Hq"]))
    output = helper.make_tensor_value_info("keep", boolean, ["B", "Hsel", "NQ", "NK"])
    graph = helper.make_graph(g.nodes, "asa_selection", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = max(MIN_IR_VERSION, helper.find_min_ir_version_for(
        [helper.make_opsetid("", opset)]))
    return model


# ---------------------------------------------------------------- graph building


class _Body:
    """Accumulates the function body; fresh value names; opset-aware helpers."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0
        self._consts: dict = {}

    def add(self, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))

    def op(self, op_type: str, *inputs: str, num_outputs: int = 1, **attrs):
        names = [f"{op_type.lower()}_{self._count}_{i}" for i in range(num_outputs)]
        self._count += 1
        self.add(op_type, list(inputs), names, **attrs)
        return names[0] if num_outputs == 1 else names

    def const(self, value, dtype) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.op("Constant", value=numpy_helper.from_array(array))
        return self._consts[key]

    def i64(self, *values: int) -> str:
        """1-D int64 constant."""
        return self.const(list(values), np.int64)

    def f32(self, value: float) -> str:
        """Scalar float32 constant."""
        return self.const(value, np.float32)

    def concat(self, *parts: str) -> str:
        return self.op("Concat", *parts, axis=0)

    def concat_last(self, *parts: str) -> str:
        return self.op("Concat", *parts, axis=-1)

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int) -> str:
        # ReduceSum takes axes as an input from opset 13, the other reductions from opset 18.
        schema = onnx.defs.get_schema(op_type, self.opset, "")
        if any(inp.name == "axes" for inp in schema.inputs):
            return self.op(op_type, x, self.i64(*axes), keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.i64(*axes))

    def squeeze0(self, x: str) -> str:
        """[1] -> scalar (Range wants scalars)."""
        return self.op("Squeeze", x, self.i64(0))

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)


class _Dims:
    """Sizes as 1-D [1] int64 values (for Concat into shapes) and scalars (for Range)."""

    def __init__(self, g: _Body, block_size: int):
        shape_q = g.op("Shape", "query")
        shape_k = g.op("Shape", "key")
        shape_v = g.op("Shape", "value")

        def dim(shape, i):
            return g.op("Gather", shape, g.i64(i), axis=0)

        self.b = g.i64(block_size)
        self.B, self.Hq, self.Sq, self.D = (dim(shape_q, i) for i in range(4))
        self.Hkv, self.Skv = dim(shape_k, 1), dim(shape_k, 2)
        self.Dv = dim(shape_v, 3)
        self.G = g.op("Div", self.Hq, self.Hkv)
        self.NQ = g.op("Div", g.op("Add", self.Sq, g.i64(block_size - 1)), self.b)
        self.NK = g.op("Div", g.op("Add", self.Skv, g.i64(block_size - 1)), self.b)
        self.pad_q = g.op("Sub", g.op("Mul", self.NQ, self.b), self.Sq)
        self.pad_k = g.op("Sub", g.op("Mul", self.NK, self.b), self.Skv)
        self.sq, self.skv = g.squeeze0(self.Sq), g.squeeze0(self.Skv)
        self.nq, self.nk, self.hq = g.squeeze0(self.NQ), g.squeeze0(self.NK), g.squeeze0(self.Hq)


def _emit(g: _Body, attrs: AsaAttributes, present, num_outputs: int, dtype) -> list[str]:
    """Emit the body; returns the value names of the outputs in contract order."""
    has_mask, has_bias, has_thr, has_gate = present[:4]
    d = _Dims(g, attrs.block_size)
    mask = g.cast("key_padding_mask", TensorProto.BOOL) if has_mask else None
    vis = _element_visibility(g, d, attrs, mask)                # bool [Bm, Sq, Skv]
    vis_blocks = _block_visibility(g, d, vis)                   # bool [Bm, NQ, NK]
    hsel = d.Hkv if attrs.select_per == SELECT_PER_KV_GROUP else d.Hq
    scale = _scale(g, d, attrs)
    dense = not has_thr and attrs.threshold >= 1.0
    if dense:  # tau >= 1 keeps every visible block: the router cannot change anything
        keep = g.op("Expand", g.unsqueeze(vis_blocks, 1), g.concat(d.B, hsel, d.NQ, d.NK))
    else:
        probs = _router_probs(g, d, attrs, mask, vis_blocks, scale, has_gate)
        keep = _select(g, d, attrs, probs, vis_blocks, has_thr)  # bool [B, Hsel, NQ, NK]
    elem_mask = g.unsqueeze(vis, 1)
    if not dense:
        elem_mask = g.op("And", elem_mask, _expand_keep(g, d, attrs, keep))
    out = _attention(g, d, attrs, elem_mask, has_bias, scale)
    out = g.cast(out, dtype) if dtype is not None else g.op("CastLike", out, "query")
    outputs = [out]
    if num_outputs > 1:
        outputs.extend(_telemetry(g, d, keep, vis_blocks))
    return outputs[:num_outputs]


def _element_visibility(g: _Body, d: _Dims, attrs: AsaAttributes, mask) -> str:
    """bool [Bm, Sq, Skv], Bm = B with a padding mask, else 1 (SPEC "Geometry")."""
    rows = g.op("Range", g.const(0, np.int64), d.sq, g.const(1, np.int64))
    keys = g.op("Range", g.const(0, np.int64), d.skv, g.const(1, np.int64))
    pos = g.unsqueeze(g.op("Add", rows, g.op("Sub", d.skv, d.sq)), 1)  # [Sq, 1]
    conds = []
    if attrs.causal:
        conds.append(g.op("LessOrEqual", keys, pos))
    if attrs.window > 0:
        w = g.const(attrs.window, np.int64)
        if attrs.causal:
            conds.append(g.op("Less", g.op("Sub", pos, w), keys))
        else:
            conds.append(g.op("Less", g.op("Abs", g.op("Sub", pos, keys)), w))
    geometry = conds[0] if conds else None
    for cond in conds[1:]:
        geometry = g.op("And", geometry, cond)
    if mask is not None:
        per_key = g.unsqueeze(mask, 1)  # [B, 1, Skv]
        if geometry is None:
            return g.op("Expand", per_key, g.concat(g.i64(1), d.Sq, g.i64(1)))
        return g.op("And", g.unsqueeze(geometry, 0), per_key)
    if geometry is None:
        return g.op("ConstantOfShape", g.concat(g.i64(1), d.Sq, d.Skv),
                    value=numpy_helper.from_array(np.array([True])))
    return g.unsqueeze(geometry, 0)


def _block_visibility(g: _Body, d: _Dims, vis: str) -> str:
    """bool [Bm, NQ, NK]: any visible element in the (query block, key block) tile."""
    zero = g.i64(0)
    pads = g.concat(zero, zero, zero, zero, d.pad_q, d.pad_k)
    tiles = g.op("Reshape", g.op("Pad", g.cast(vis, TensorProto.FLOAT), pads),
                 g.concat(zero, d.NQ, d.b, d.NK, d.b))
    return g.cast(g.reduce("ReduceMax", tiles, [2, 4], keepdims=0), TensorProto.BOOL)


def _scale(g: _Body, d: _Dims, attrs: AsaAttributes) -> str:
    """float32 scale; 0.0 resolves to 1/sqrt(D), computed in double then rounded once."""
    if attrs.scale > 0.0:
        return g.f32(attrs.scale)
    root = g.op("Sqrt", g.cast(d.D, TensorProto.DOUBLE))
    return g.cast(g.op("Reciprocal", root), TensorProto.FLOAT)


def _block_counts(g: _Body, n_blocks_scalar: str, length: str, b: str) -> str:
    """float32 [N, 1]: rows in each block of b over `length` rows (the last one may be short)."""
    starts = g.op("Mul", g.op("Range", g.const(0, np.int64), n_blocks_scalar,
                              g.const(1, np.int64)), b)
    counts = g.op("Min", g.op("Sub", length, starts), b)
    return g.unsqueeze(g.cast(counts, TensorProto.FLOAT), 1)


def _block_sums(g: _Body, d: _Dims, x: str, pad: str, n_blocks: str) -> str:
    """float32 [B, H, N, D]: x [B, H, S, D] summed over each block of b rows (zero padded)."""
    zero = g.i64(0)
    padded = g.op("Pad", x, g.concat(zero, zero, zero, zero, zero, zero, pad, zero))
    tiles = g.op("Reshape", padded, g.concat(zero, zero, n_blocks, d.b, g.i64(-1)))
    return g.reduce("ReduceSum", tiles, [3], keepdims=0)


def _router_probs(g: _Body, d: _Dims, attrs: AsaAttributes, mask, vis_blocks: str,
                  scale: str, has_gate: bool) -> str:
    """float32 [B, Hsel, NQ, NK] router probabilities (SPEC "Router")."""
    q = g.cast("query", TensorProto.FLOAT)
    k = g.cast("key", TensorProto.FLOAT)
    q_mean = g.op("Div", _block_sums(g, d, q, d.pad_q, d.NQ), _block_counts(g, d.nq, d.Sq, d.b))
    k_raw = k
    if mask is None:
        k_count = _block_counts(g, d.nk, d.Skv, d.b)              # [NK, 1]
    else:
        keep = g.cast(mask, TensorProto.FLOAT)                     # [B, Skv]
        k = g.op("Mul", k, g.unsqueeze(keep, 1, 3))
        zero = g.i64(0)
        tiles = g.op("Reshape", g.op("Pad", keep, g.concat(zero, zero, zero, d.pad_k)),
                     g.concat(zero, d.NK, d.b))
        k_count = g.reduce("ReduceSum", tiles, [2], keepdims=0)   # [B, NK]
        k_count = g.unsqueeze(g.op("Max", k_count, g.f32(1.0)), 1, 3)
    k_mean = g.op("Div", _block_sums(g, d, k, d.pad_k, d.NK), k_count)  # [B, Hkv, NK, D]
    if has_gate:
        q_emb = g.op("MatMul", q_mean, g.cast("gate_q_weight", TensorProto.FLOAT))
        k_feat = g.concat_last(k_mean, *_block_extrema(g, d, k_raw, mask))  # [B, Hkv, NK, 3D]
        k_vec = g.op("MatMul", k_feat, g.cast("gate_k_weight", TensorProto.FLOAT))
        logits = _grouped_logits(g, d, q_emb, k_vec)  # no scale: the gate is trained without
    else:
        logits = g.op("Mul", _grouped_logits(g, d, q_mean, k_mean), scale)
    probs = _masked_softmax(g, logits, g.unsqueeze(vis_blocks, 1))
    if attrs.select_per == SELECT_PER_KV_GROUP:
        grouped = g.op("Reshape", probs, g.concat(d.B, d.Hkv, d.G, d.NQ, d.NK))
        probs = g.op("Div", g.reduce("ReduceSum", grouped, [2], keepdims=0),
                     g.cast(d.G, TensorProto.FLOAT))
    return probs


def _grouped_logits(g: _Body, d: _Dims, q_vec: str, k_vec: str) -> str:
    """float32 [B, Hq, NQ, NK]: q_vec [B, Hq, NQ, E] . k_vec [B, Hkv, NK, E] (GQA by reshape)."""
    q_grouped = g.op("Reshape", q_vec, g.concat(d.B, d.Hkv, d.G, d.NQ, g.i64(-1)))
    k_t = g.op("Transpose", g.unsqueeze(k_vec, 2), perm=[0, 1, 2, 4, 3])
    logits = g.op("MatMul", q_grouped, k_t)                    # [B, Hkv, G, NQ, NK]
    return g.op("Reshape", logits, g.concat(d.B, d.Hq, d.NQ, d.NK))


def _block_extrema(g: _Body, d: _Dims, k: str, mask) -> tuple[str, str]:
    """float32 [B, Hkv, NK, D] each: element-wise max and min over each block's kept keys.

    Padding (masked keys, the tail of the last block) is -inf for the max and +inf for the
    min; a block with no kept key gets zeros (it is invisible; zeros keep inf out of MatMul).
    """
    zero = g.i64(0)
    pads = g.concat(zero, zero, zero, zero, zero, zero, d.pad_k, zero)
    shape = g.concat(zero, zero, d.NK, d.b, g.i64(-1))
    result = []
    for op_type, fill in (("ReduceMax", -np.inf), ("ReduceMin", np.inf)):
        x = k
        if mask is not None:
            x = g.op("Where", g.unsqueeze(mask, 1, 3), k, g.f32(fill))
        tiles = g.op("Reshape", g.op("Pad", x, pads, g.f32(fill)), shape)
        result.append(g.reduce(op_type, tiles, [3], keepdims=0))
    if mask is None:
        return tuple(result)
    any_key = g.op("Pad", g.cast(mask, TensorProto.FLOAT), g.concat(zero, zero, zero, d.pad_k))
    any_key = g.reduce("ReduceMax", g.op("Reshape", any_key, g.concat(zero, d.NK, d.b)), [2],
                       keepdims=0)                              # [B, NK]
    any_key = g.cast(g.unsqueeze(any_key, 1, 3), TensorProto.BOOL)
    return tuple(g.op("Where", any_key, x, g.f32(0.0)) for x in result)


def _masked_softmax(g: _Body, x: str, mask: str) -> str:
    """float32 softmax over the last axis restricted to mask; rows without any give zeros."""
    top = g.reduce("ReduceMax", g.op("Where", mask, x, g.f32(-np.inf)), [-1], keepdims=1)
    # A row with nothing visible has top = -inf, so x - top = +inf there; Where drops it.
    e = g.op("Where", mask, g.op("Exp", g.op("Sub", x, top)), g.f32(0.0))
    total = g.reduce("ReduceSum", e, [-1], keepdims=1)
    safe = g.op("Where", g.op("Greater", total, g.f32(0.0)), total, g.f32(1.0))
    return g.op("Div", e, safe)


def _thresholds(g: _Body, d: _Dims, attrs: AsaAttributes, has_thr: bool) -> str:
    """float32 tau, scalar or [1, Hsel, 1, 1] (a KV group takes the max of its heads)."""
    if not has_thr:
        return g.f32(attrs.threshold)
    tau = g.cast("head_thresholds", TensorProto.FLOAT)
    if attrs.select_per == SELECT_PER_KV_GROUP:
        tau = g.reduce("ReduceMax", g.op("Reshape", tau, g.concat(d.Hkv, g.i64(-1))), [1],
                       keepdims=0)
    return g.op("Reshape", tau, g.i64(1, -1, 1, 1))


def _forced(g: _Body, d: _Dims, attrs: AsaAttributes) -> str:
    """bool [NQ, NK]: sink blocks and the local band around c_i (SPEC "Selection")."""
    one = g.const(1, np.int64)
    blocks_q = g.op("Range", g.const(0, np.int64), d.nq, one)
    last_row = g.op("Sub", g.op("Min", g.op("Mul", g.op("Add", blocks_q, one), d.b), d.Sq), one)
    last_pos = g.op("Add", last_row, g.op("Sub", d.Skv, d.Sq))
    # Negative positions clamp to block 0 whichever way integer Div rounds them.
    centre = g.op("Min", g.op("Max", g.op("Div", last_pos, d.b), g.const(0, np.int64)),
                  g.op("Sub", d.NK, one))
    centre = g.unsqueeze(centre, 1)                                      # [NQ, 1]
    kb = g.op("Range", g.const(0, np.int64), d.nk, one)                  # [NK]
    sink = g.op("Less", kb, g.const(attrs.sink_blocks, np.int64))
    width = g.const(attrs.local_blocks, np.int64)
    if attrs.causal:
        local = g.op("And", g.op("Less", g.op("Sub", centre, width), kb),
                     g.op("LessOrEqual", kb, centre))
    else:
        local = g.op("Less", g.op("Abs", g.op("Sub", kb, centre)), width)
    return g.op("Or", sink, local)


def _select(g: _Body, d: _Dims, attrs: AsaAttributes, probs: str, vis_blocks: str,
            has_thr: bool) -> str:
    """bool [B, Hsel, NQ, NK]: kept blocks (SPEC "Selection")."""
    vis = g.unsqueeze(vis_blocks, 1)                                     # [Bm, 1, NQ, NK]
    forced = g.op("And", _forced(g, d, attrs), vis)
    # Walk order: forced (key 2), visible by P (in [0, 1]), invisible (key -1). ONNX TopK
    # breaks ties by the lower index, which gives forced blocks ascending and P ties by index.
    order_key = g.op("Where", forced, g.f32(2.0), g.op("Where", vis, probs, g.f32(-1.0)))
    _, order = g.op("TopK", order_key, d.NK, axis=-1, largest=1, sorted=1, num_outputs=2)
    sorted_p = g.op("GatherElements", probs, order, axis=-1)
    before = g.op("CumSum", sorted_p, g.const(-1, np.int64), exclusive=1)  # float32, in order
    tau = _thresholds(g, d, attrs, has_thr)
    under_sorted = g.op("Less", before, tau)
    none = g.op("ConstantOfShape", g.op("Shape", order_key),
                value=numpy_helper.from_array(np.array([False])))
    under = g.op("ScatterElements", none, order, under_sorted, axis=-1)
    # acc never decreases, so "acc < tau" per position equals "stop at the first failure".
    dense_head = g.op("GreaterOrEqual", tau, g.f32(1.0))
    return g.op("And", vis, g.op("Or", forced, g.op("Or", under, dense_head)))


def _expand_keep(g: _Body, d: _Dims, attrs: AsaAttributes, keep: str) -> str:
    """bool [B, Hq, Sq, Skv] element mask of the kept blocks (GQA group -> its query heads)."""
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    if attrs.select_per == SELECT_PER_KV_GROUP:
        heads = g.op("Div", g.op("Range", zero, d.hq, one), d.G)
        keep = g.op("Gather", keep, heads, axis=1)
    rows = g.op("Div", g.op("Range", zero, d.sq, one), d.b)
    cols = g.op("Div", g.op("Range", zero, d.skv, one), d.b)
    return g.op("Gather", g.op("Gather", keep, rows, axis=2), cols, axis=3)


def _attention(g: _Body, d: _Dims, attrs: AsaAttributes, mask: str, has_bias: bool,
               scale: str) -> str:
    """float32 [B, Hq, Sq, Dv]: masked softmax attention; GQA by reshaping Q to its groups."""
    q = g.op("Reshape", g.cast("query", TensorProto.FLOAT), g.concat(d.B, d.Hkv, d.G, d.Sq, d.D))
    k_t = g.op("Transpose", g.unsqueeze(g.cast("key", TensorProto.FLOAT), 2),
               perm=[0, 1, 2, 4, 3])                                       # [B, Hkv, 1, D, Skv]
    scores = g.op("Reshape", g.op("MatMul", q, k_t), g.concat(d.B, d.Hq, d.Sq, d.Skv))
    scores = g.op("Mul", scores, scale)
    if attrs.softcap > 0.0:
        cap = g.f32(attrs.softcap)
        scores = g.op("Mul", g.op("Tanh", g.op("Div", scores, cap)), cap)
    if has_bias:
        scores = g.op("Add", scores, g.cast("attn_bias", TensorProto.FLOAT))
    weights = _masked_softmax(g, scores, mask)
    weights = g.op("Reshape", weights, g.concat(d.B, d.Hkv, d.G, d.Sq, d.Skv))
    v = g.unsqueeze(g.cast("value", TensorProto.FLOAT), 2)                 # [B, Hkv, 1, Skv, Dv]
    return g.op("Reshape", g.op("MatMul", weights, v), g.concat(d.B, d.Hq, d.Sq, d.Dv))


def _telemetry(g: _Body, d: _Dims, keep: str, vis_blocks: str) -> list[str]:
    """block_indices, block_counts, visible_counts (int32)."""
    kb = g.op("Range", g.const(0, np.int64), d.nk, g.const(1, np.int64))
    slot = g.op("Where", keep, kb, d.NK)  # not kept -> NK, sorted last
    ascending, _ = g.op("TopK", slot, d.NK, axis=-1, largest=0, sorted=1, num_outputs=2)
    indices = g.op("Where", g.op("Equal", ascending, d.NK), g.i64(-1), ascending)
    counts = g.reduce("ReduceSum", g.cast(keep, TensorProto.INT64), [-1], keepdims=0)
    visible = g.reduce("ReduceSum", g.cast(vis_blocks, TensorProto.INT64), [-1], keepdims=0)
    visible = g.op("Expand", visible, g.concat(d.B, g.i64(1)))
    return [g.cast(x, TensorProto.INT32) for x in (indices, counts, visible)]


def _present_flags(present_inputs) -> tuple[bool, bool, bool, bool, bool]:
    """5 bools; 3 given flags mean no learned gate (callers from before the gate existed)."""
    flags = tuple(bool(p) for p in present_inputs)
    if len(flags) == 3:
        flags += (False, False)
    if len(flags) != 5 or flags[3] != flags[4]:
        _check_args(MIN_OPSET, flags, 1, TensorProto.FLOAT)  # raises the explanatory error
    return flags


def _check_args(opset: int, present, num_outputs: int, dtype) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise AsaExportError(f"the ASA function supports opsets {MIN_OPSET}..{MAX_OPSET}, got "
                             f"{opset}; convert the model with onnx.version_converter first")
    if len(present) not in (3, 5):
        raise AsaExportError("present_inputs must be 5 flags (key_padding_mask, attn_bias, "
                             "head_thresholds, gate_q_weight, gate_k_weight) or the first 3")
    if len(present) == 5 and bool(present[3]) != bool(present[4]):
        raise AsaExportError("gate_q_weight and gate_k_weight come together: give both inputs "
                             "(a learned gate) or neither")
    if not 1 <= num_outputs <= len(OUTPUTS):
        raise AsaExportError(f"num_outputs must be 1..{len(OUTPUTS)}, got {num_outputs}")
    if dtype is not None and dtype not in _FLOAT_TYPES:
        raise AsaExportError(f"dtype must be FLOAT, FLOAT16 or BFLOAT16, got {dtype}")
    if dtype is None and opset < 15:
        raise AsaExportError(f"opset {opset} has no CastLike: pass dtype (the query's element "
                             "type) to build_function and make_node")
