"""Rewrite: one proven Match -> one AdaptiveSparseAttention node (+ its model-local function).

    O = <attention subgraph>(Q, K, V, masks)
      ->  O = asa::AdaptiveSparseAttention(Q, K', V', key_padding_mask)   [overload = attribute hash]

K' / V' are the [B, Hkv, S, D] sources (a Transpose is added where the site only had K^T). The old
subgraph is left dangling and removed by dead-code elimination; values it shares with the rest of
the model (the mask, RoPE'd Q) stay.
"""

from __future__ import annotations

import onnx_ir as ir

from asa_export import contract
from asa_export.contract import AsaAttributes
from asa_export.passes import graph as g
from asa_export.passes.rules.base import KeySource, Match

# Function overloads (ONNX IR version 10) let one op_type carry one function per attribute set.
MIN_IR_VERSION = 10


def _materialize(graph: ir.Graph, source: KeySource, before: ir.Node, name: str) -> ir.Value:
    if source.perm is None:
        return source.value
    node = ir.node("Transpose", [source.value], {"perm": source.perm}, name=name)
    graph.insert_before(before, node)
    out = node.outputs[0]
    d = g.dims(source.value)
    if d is not None:
        out.shape = ir.Shape([d[p] for p in source.perm])
    out.dtype = source.value.dtype
    return out


def _concat_past(graph, past: ir.Value, new: ir.Value, before: ir.Node, name: str) -> ir.Value:
    node = ir.node("Concat", [past, new], {"axis": 2}, name=name)
    graph.insert_before(before, node)
    node.outputs[0].dtype = new.dtype
    return node.outputs[0]


def site_attributes(match: Match, options) -> AsaAttributes:
    """Contract attributes of a site: what the match proved plus the router options."""
    return AsaAttributes(
        scale=match.scale,
        causal=match.mask.causal,
        block_size=options.block_size,
        threshold=options.threshold,
        sink_blocks=options.sink_blocks,
        local_blocks=options.local_blocks,
        window=match.mask.window,
        softcap=match.softcap,
        select_per=options.select_per,
    )


def rewrite_site(model: ir.Model, match: Match, attrs: AsaAttributes, name: str) -> ir.Node:
    """Insert the ASA node for `match` and route the site's output through it.

    Returns:
        The new node. Its function is added by `add_functions`.
    """
    graph = model.graph
    if match.prepare is not None:
        match = match.prepare(graph, match, name)
    before = match.insert_before
    query = match.query
    key = _materialize(graph, match.key, before, f"{name}/key_transpose")
    value = _materialize(graph, match.value, before, f"{name}/value_transpose")
    if match.packed_heads is not None:
        hq, hkv = match.packed_heads
        query = _split_heads(graph, query, hq, before, f"{name}/query")
        key = _split_heads(graph, key, hkv, before, f"{name}/key")
        value = _split_heads(graph, value, hkv, before, f"{name}/value")
    if match.past is not None:
        past_key, past_value, presents = match.past
        key = _concat_past(graph, past_key, key, before, f"{name}/present_key")
        value = _concat_past(graph, past_value, value, before, f"{name}/present_value")
        for old, new in zip(presents, (key, value)):
            if old is not None:
                _replace(old, new, new.name)
    inputs = [query, key, value]
    if match.mask.padding is not None:
        inputs.append(match.mask.padding)
    node = ir.Node(
        contract.DOMAIN,
        contract.OP_TYPE,
        inputs,
        attributes=_node_attributes(attrs),
        name=name,
        num_outputs=1,
    )
    graph.insert_before(before, node)
    out = node.outputs[0]
    out.dtype = match.output.dtype
    if match.packed_heads is not None:
        out = _merge_heads(graph, out, before, f"{name}/merge_heads")
    _replace(match.output, out, f"{name}/output")
    return node


def _split_heads(graph, value: ir.Value, heads: int, before: ir.Node, name: str) -> ir.Value:
    """[B, S, H·D] -> [B, H, S, D] (a 4-D value is already split)."""
    if g.rank(value) == 4:
        return value
    shape = ir.tensor([0, 0, heads, -1], dtype=ir.DataType.INT64, name=f"{name}/split_shape")
    const = ir.node("Constant", [], {"value": shape}, name=f"{name}/split_shape")
    reshape = ir.node("Reshape", [value, const.outputs[0]], name=f"{name}/split_heads")
    trans = ir.node("Transpose", [reshape.outputs[0]], {"perm": [0, 2, 1, 3]},
                    name=f"{name}/to_bhsd")
    for node in (const, reshape, trans):
        graph.insert_before(before, node)
    trans.outputs[0].dtype = value.dtype
    return trans.outputs[0]


def _merge_heads(graph, value: ir.Value, before: ir.Node, name: str) -> ir.Value:
    """[B, H, S, D] -> [B, S, H·D]."""
    trans = ir.node("Transpose", [value], {"perm": [0, 2, 1, 3]}, name=f"{name}/to_bshd")
    shape = ir.tensor([0, 0, -1], dtype=ir.DataType.INT64, name=f"{name}/merge_shape")
    const = ir.node("Constant", [], {"value": shape}, name=f"{name}/merge_shape")
    reshape = ir.node("Reshape", [trans.outputs[0], const.outputs[0]], name=name)
    for node in (trans, const, reshape):
        graph.insert_before(before, node)
    reshape.outputs[0].dtype = value.dtype
    return reshape.outputs[0]


def _replace(old: ir.Value, new: ir.Value, name: str) -> None:
    """Route every use of `old` to `new`; a model output keeps its name (services bind by name)."""
    new.dtype = old.dtype
    new.shape = old.shape
    if old.is_graph_output():
        kept = old.name
        old.name = f"{kept}/replaced"
        new.name = kept
    else:
        new.name = name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


def _node_attributes(attrs: AsaAttributes) -> list[ir.Attr]:
    values = dict(attrs.as_onnx_attributes())
    values["plugin_namespace"] = contract.PLUGIN_NAMESPACE
    values["plugin_version"] = contract.PLUGIN_VERSION
    return list(ir.convenience.convert_attributes(values))


def add_functions(model: ir.Model, nodes: list[ir.Node]) -> None:
    """Give every ASA node a model-local function (one per distinct signature) as its overload."""
    from asa_export.contract.function import build_function

    opset = g.opset_version(model)
    for node in nodes:
        attrs = AsaAttributes.from_onnx_attributes(
            {k: a.value for k, a in node.attributes.items()}
        )
        present = tuple(
            len(node.inputs) > i and node.inputs[i] is not None for i in (3, 4, 5)
        )
        dtype = node.inputs[0].dtype
        proto = build_function(attrs, opset, present, len(node.outputs),
                               dtype=int(dtype) if dtype is not None else None)
        overload = proto.overload or proto.name
        proto.name, proto.overload = contract.OP_TYPE, overload
        node.overload = overload
        key = (contract.DOMAIN, contract.OP_TYPE, overload)
        if key not in model.functions:
            model.functions[key] = ir.serde.deserialize_function(proto)
    model.opset_imports[contract.DOMAIN] = contract.VERSION
    model.ir_version = max(model.ir_version or 0, MIN_IR_VERSION)
