"""Rewrite: one proven Match -> one AdaptiveSparseAttention node (+ its model-local function).

    O = <attention subgraph>(Q, K, V, masks)
      ->  O = asa::AdaptiveSparseAttention(Q, K', V', key_padding_mask)   [overload = attribute hash]

Calibrated routers enter as initializers on the node's optional inputs (`set_router_inputs`):

    asa::AdaptiveSparseAttention(Q, K, V, mask, bias)
      ->  asa::AdaptiveSparseAttention(Q, K, V, mask, bias, head_thresholds [Hq],
                                       gate_q_weight [Hq, D, Dg], gate_k_weight [Hkv, 3D, Dg])

K' / V' are the [B, Hkv, S, D] sources (a Transpose is added where the site only had K^T). The old
subgraph is left dangling and removed by dead-code elimination; values it shares with the rest of
the model (the mask, RoPE'd Q) stay.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from asa_export import contract
from asa_export.contract import AsaAttributes
from asa_export.errors import AsaExportError
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
        attrs = node_attributes(node)
        # One flag per optional input the contract declares (3..len(INPUTS)-1).
        present = tuple(
            len(node.inputs) > i and node.inputs[i] is not None
            for i in range(3, len(contract.INPUTS))
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


def asa_nodes(model: ir.Model) -> list[ir.Node]:
    """The ASA nodes of the main graph, in graph order (site index = position in this list)."""
    return [n for n in model.graph if n.domain == contract.DOMAIN and n.op_type == contract.OP_TYPE]


def node_attributes(node: ir.Node) -> AsaAttributes:
    """The contract attributes an ASA node carries."""
    return AsaAttributes.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})


def set_router_inputs(model: ir.Model, node: ir.Node, *, head_thresholds=None, gate=None) -> None:
    """Wire calibrated router weights into an ASA node as initializers (contract inputs 5-7).

    The function overload is not updated here: call `refresh_functions` once afterwards.

    Args:
        model: the model holding `node`.
        node: an AdaptiveSparseAttention node.
        head_thresholds: per-query-head tau [Hq] (input `head_thresholds`), or None to leave it.
        gate: an object with `q_weight` [Hq, D, Dg] and `k_weight` [Hkv, 3*D, Dg] (e.g.
            asa_export.router.gate.Gate) for inputs `gate_q_weight` / `gate_k_weight`, or None.

    Raises:
        AsaExportError: wrong shapes or values, or a contract without the gate inputs.
    """
    heads_q, heads_kv, dim = _node_heads(node)
    if head_thresholds is not None:
        taus = np.asarray(head_thresholds, dtype=np.float32)
        if taus.ndim != 1 or (heads_q is not None and taus.shape[0] != heads_q):
            raise AsaExportError(f"{node.name}: head_thresholds must have shape [{heads_q}] "
                                 f"(one per query head), got {list(taus.shape)}")
        if not np.all(np.isfinite(taus) & (taus > 0)):
            raise AsaExportError(f"{node.name}: head_thresholds must be finite and > 0")
        _wire(model, node, "head_thresholds", taus)
    if gate is not None:
        q_weight, k_weight = _gate_arrays(node, gate, heads_q, heads_kv, dim)
        _wire(model, node, "gate_q_weight", q_weight)
        _wire(model, node, "gate_k_weight", k_weight)


def _node_heads(node: ir.Node) -> tuple[int | None, int | None, int | None]:
    """Static (Hq, Hkv, D) of an ASA node's query and key, None where unknown."""
    def dim(value, axis):
        d = g.dims(value) if value is not None else None
        return d[axis] if d is not None and len(d) == 4 and isinstance(d[axis], int) else None

    return dim(node.inputs[0], 1), dim(node.inputs[1], 1), dim(node.inputs[0], 3)


def _gate_arrays(node, gate, heads_q, heads_kv, dim) -> tuple[np.ndarray, np.ndarray]:
    if "gate_q_weight" not in contract.INPUTS:
        raise AsaExportError("this version of the ASA contract has no learned-gate inputs "
                             "(gate_q_weight / gate_k_weight); update asa_export")
    q_weight = np.asarray(gate.q_weight, dtype=np.float32)
    k_weight = np.asarray(gate.k_weight, dtype=np.float32)
    want_q = [heads_q, dim, None]
    want_k = [heads_kv, None if dim is None else 3 * dim, None]
    ok = (q_weight.ndim == 3 and k_weight.ndim == 3 and q_weight.shape[2] == k_weight.shape[2]
          and all(w is None or w == s for w, s in zip(want_q, q_weight.shape))
          and all(w is None or w == s for w, s in zip(want_k, k_weight.shape)))
    if not ok:
        raise AsaExportError(f"{node.name}: gate weights must be [Hq, D, Dg] = {want_q} and "
                             f"[Hkv, 3*D, Dg] = {want_k}, got {list(q_weight.shape)} and "
                             f"{list(k_weight.shape)}")
    if not (np.all(np.isfinite(q_weight)) and np.all(np.isfinite(k_weight))):
        raise AsaExportError(f"{node.name}: gate weights must be finite")
    return q_weight, k_weight


def _wire(model: ir.Model, node: ir.Node, input_name: str, array: np.ndarray) -> None:
    """Make `array` an initializer and the node's input `input_name` (replacing an old one)."""
    slot = contract.INPUTS.index(input_name)
    if len(node.inputs) <= slot:
        node.resize_inputs(slot + 1)
    graph = model.graph
    old = node.inputs[slot]
    if old is not None:
        node.replace_input_with(slot, None)
        # An initializer nothing else reads any more would be dead weight in the file.
        if old.is_initializer() and not old.uses() and old.name in graph.initializers:
            del graph.initializers[old.name]
    name = _free_name(graph, f"{node.name}/{input_name}")
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    node.replace_input_with(slot, value)


def _free_name(graph: ir.Graph, name: str) -> str:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    taken |= {v.name for v in graph.inputs}
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def refresh_functions(model: ir.Model) -> None:
    """Rebind every ASA node to the function of its current signature; drop unused functions.

    Needed after attributes or optional inputs of ASA nodes change (the overload encodes both).
    """
    nodes = asa_nodes(model)
    add_functions(model, nodes)
    used = {(n.domain, n.op_type, n.overload) for n in model.graph}
    for key in [k for k in model.functions if k[:2] == (contract.DOMAIN, contract.OP_TYPE)
                and k not in used]:
        del model.functions[key]
