"""Probes: evaluate a few values of a graph in ONNX Runtime on generated inputs.

The matcher proves what a mask subgraph computes by running it, not by recognising how one
exporter or one transformers version happens to build it: the backward slice of the mask (from the
graph inputs) is cut out, run on several generated feeds (batch, length and padding varied), and the
results are compared against the contract's mask hypotheses (asa_export.passes.masks).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# A probe slice that computes with a weight larger than this is refused: masks depend on shapes
# and on the padding input, never on weights, and probing must stay cheap on large models. A
# large table that the slice only indexes (the token embedding, whose output's shape and type
# some exports read) is allowed: a Gather of a few rows costs nothing.
_MAX_WEIGHT_ELEMENTS = 1 << 20


class ProbeError(Exception):
    """The slice could not be cut out or run; the message says why."""


def backward_slice(values: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]]:
    """Nodes, graph inputs and initializers that `values` depend on (nodes in graph order)."""
    seen_nodes: set[int] = set()
    nodes: list[ir.Node] = []
    inputs: dict[str, ir.Value] = {}
    initializers: dict[str, ir.Value] = {}
    stack = list(values)
    visited: set[int] = set()
    while stack:
        value = stack.pop()
        if value is None or id(value) in visited:
            continue
        visited.add(id(value))
        if value.is_graph_input():
            inputs[value.name] = value
            continue
        if value.is_initializer():
            initializers[value.name] = value
            continue
        node = value.producer()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        nodes.append(node)
        stack.extend(node.inputs)
        for attr in node.attributes.values():  # outer-scope values used by subgraphs
            if attr.type == ir.AttributeType.GRAPH:
                for inner in attr.value:
                    stack.extend(v for v in inner.inputs if v is not None and v.graph is not inner.graph)
    graph = values[0].graph
    order = {id(n): i for i, n in enumerate(graph)}
    nodes.sort(key=lambda n: order.get(id(n), 0))
    return nodes, list(inputs.values()), list(initializers.values())


def depends_on(values: list[ir.Value], graph_input: ir.Value) -> bool:
    _, inputs, _ = backward_slice(values)
    return any(v is graph_input for v in inputs)


class Probe:
    """One ONNX Runtime session computing `values` from the graph inputs they depend on."""

    def __init__(self, model: ir.Model, values: list[ir.Value]):
        import onnxruntime as ort

        nodes, inputs, initializers = backward_slice(values)
        in_slice = {id(n) for n in nodes}
        for init in initializers:
            if init.const_value is None or init.const_value.size <= _MAX_WEIGHT_ELEMENTS:
                continue
            uses = [u for u in init.uses() if id(u.node) in in_slice]
            if not all(u.node.op_type == "Gather" and u.idx == 0 for u in uses):
                raise ProbeError(f"the probed values compute with the weight {init.name!r}")
        view = ir.GraphView(
            inputs, values, nodes=nodes, initializers=initializers,
            opset_imports=model.graph.opset_imports,
        )
        graph = view.clone()
        probe_model = ir.Model(
            graph, ir_version=model.ir_version, functions=list(model.functions.values())
        )
        try:
            proto = ir.serde.serialize_model(probe_model)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = 1
            self._session = ort.InferenceSession(
                proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ProbeError(f"could not build the probe: {exc}") from exc
        self.input_names = [v.name for v in inputs]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Values in the order given to the constructor."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ProbeError(f"no generated input for {missing}")
        try:
            return self._session.run(None, {n: feeds[n] for n in self.input_names})
        except Exception as exc:
            raise ProbeError(f"probe run failed: {exc}") from exc
