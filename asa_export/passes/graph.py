"""Small queries on onnx_ir graphs shared by the rule modules: producers, constants, shapes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

STANDARD_DOMAINS = ("", "ai.onnx")


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The node producing `value` if it is a standard-domain node of one of `op_types`."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.domain not in STANDARD_DOMAINS:
        return None
    if op_types and node.op_type not in op_types:
        return None
    return node


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array when it is a constant (initializer or Constant node)."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def const_scalar(value: ir.Value | None) -> float | None:
    """The value as a Python float when it is a constant holding one number (any shape of ones)."""
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def int_attr(node: ir.Node, name: str, default: int | None = None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def float_attr(node: ir.Node, name: str, default: float | None = None) -> float | None:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def ints_attr(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(x) for x in attr.value]


def axes_of(node: ir.Node) -> list[int] | None:
    """Axes of Unsqueeze / Squeeze / Reduce*: the attribute (old opsets) or the constant input."""
    axes = ints_attr(node, "axes")
    if axes is not None:
        return axes
    if len(node.inputs) > 1:
        array = const_array(node.inputs[1])
        if array is not None:
            return [int(x) for x in array.reshape(-1)]
    return None


def dims(value: ir.Value | None) -> list | None:
    """Shape as a list of ints (static), strings (symbolic) or None (unknown); None if rank unknown."""
    if value is None or value.shape is None:
        return None
    out = []
    for d in value.shape:
        out.append(d if isinstance(d, int) else d.value)
    return out


def rank(value: ir.Value | None) -> int | None:
    shape = dims(value)
    return None if shape is None else len(shape)


def same_dim(a, b) -> bool:
    """Two dims are provably equal: equal ints or equal symbolic names."""
    return a is not None and b is not None and a == b


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The only node using `value`, when it has exactly one use and is not a graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def consumers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def opset_version(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))
