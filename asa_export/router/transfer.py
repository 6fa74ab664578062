"""Carry a calibrated router from one rewritten model onto another export of the same model.

`asa-export calibrate` writes its fitted router into the ASA nodes of the model it calibrated
(contract attributes `threshold` / `sink_blocks` / `local_blocks` / `select_per`, and the optional
inputs `head_thresholds`, `gate_q_weight`, `gate_k_weight` as initializers). Decoding needs a
different export of the same network (with a KV cache), rewritten separately. This module reads
the router of every site of the calibrated model and writes it onto the sites of the other one:

    calibrated.asa.onnx (no KV)  --read_routers-->  [SiteRouter per site, graph order]
    rewritten KV-cache export    <--apply_routers--  (sites matched by position, names and shapes)

Sites correspond when both models have the same number of ASA nodes, the same node names in the
same (graph = layer) order, the same attention attributes (scale, causal, block size, window,
softcap) and the same static head counts / head size where both graphs know them; anything else
raises AsaExportError rather than guessing a mapping.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np

from asa_export.errors import AsaExportError

# Router attributes are the calibration's result: they are copied onto the target site.
ROUTER_ATTRIBUTES = ("threshold", "sink_blocks", "local_blocks", "select_per")
# Attention attributes describe the network itself: they must already agree.
ATTENTION_ATTRIBUTES = ("scale", "causal", "block_size", "window", "softcap")


@dataclasses.dataclass
class SiteRouter:
    """The router of one ASA site.

    Args:
        index: position of the site among the model's ASA nodes (graph order = layer order).
        name: the node's name.
        attributes: the node's contract attributes (asa_export.contract.AsaAttributes).
        heads: static (Hq, Hkv, D) of the node's query / key, None where unknown.
        head_thresholds: float32 [Hq] or None (contract input 5).
        gate_q_weight: float32 [Hq, D, Dg] or None (input 6).
        gate_k_weight: float32 [Hkv, 3*D, Dg] or None (input 7).
    """

    index: int
    name: str
    attributes: object
    heads: tuple
    head_thresholds: np.ndarray | None = None
    gate_q_weight: np.ndarray | None = None
    gate_k_weight: np.ndarray | None = None


def _constant_input(node, slot: int, what: str):
    """The array of a node's optional input `slot` (an initializer), None if the input is absent."""
    if len(node.inputs) <= slot or node.inputs[slot] is None:
        return None
    value = node.inputs[slot]
    if value.const_value is None:
        # A router computed at run time cannot be copied as a constant.
        raise AsaExportError(f"{node.name}: input {what} ({value.name}) is not an initializer; "
                             "only calibrated routers stored as initializers can be transferred")
    return np.asarray(value.const_value.numpy(), dtype=np.float32).copy()


def read_routers(model) -> list[SiteRouter]:
    """The router of every ASA site of a rewritten (e.g. calibrated) model.

    Args:
        model: onnx_ir model with AdaptiveSparseAttention nodes.

    Returns:
        One SiteRouter per ASA node, in graph order.

    Raises:
        AsaExportError: the model has no ASA node, or a router input is not an initializer.
    """
    from asa_export import contract
    from asa_export.passes import rewrite

    nodes = rewrite.asa_nodes(model)
    if not nodes:
        raise AsaExportError("the calibrated model has no AdaptiveSparseAttention node: pass the "
                             "model written by `asa-export calibrate`")
    slots = {name: contract.INPUTS.index(name) for name in contract.INPUTS}
    routers = []
    for index, node in enumerate(nodes):
        gate = [_constant_input(node, slots[n], n) if n in slots else None
                for n in ("gate_q_weight", "gate_k_weight")]
        routers.append(SiteRouter(index, node.name or f"asa_{index}", rewrite.node_attributes(node),
                                  rewrite._node_heads(node),
                                  _constant_input(node, slots["head_thresholds"], "head_thresholds"),
                                  *gate))
    return routers


def _check_site(router: SiteRouter, node, attrs, heads) -> None:
    """Raise unless `node` (target) is the same attention as `router`'s site."""
    where = f"site {router.index} ({router.name!r} in the calibrated model, {node.name!r} here)"
    if node.name != router.name:
        raise AsaExportError(f"{where}: site names differ; the models' ASA sites do not "
                             "correspond (rewrite both from exports of the same network)")
    for field in ATTENTION_ATTRIBUTES:
        mine, theirs = getattr(attrs, field), getattr(router.attributes, field)
        if mine != theirs:
            raise AsaExportError(f"{where}: attribute {field} is {mine} here but {theirs} in the "
                                 "calibrated model; the sites do not correspond")
    for label, mine, theirs in zip(("query heads", "KV heads", "head size"), heads, router.heads):
        if mine is not None and theirs is not None and mine != theirs:
            raise AsaExportError(f"{where}: {label} {mine} here but {theirs} in the calibrated "
                                 "model; the sites do not correspond")


def _set_router_attributes(node, attrs, router: SiteRouter) -> None:
    """Write the router attributes of `router` onto `node` (the other attributes stay)."""
    import onnx_ir as ir

    values = {f: getattr(router.attributes, f) for f in ROUTER_ATTRIBUTES}
    # AsaAttributes validates the combination before anything is written.
    merged = dataclasses.replace(attrs, **values)
    for name, value in merged.as_onnx_attributes().items():
        if name in ROUTER_ATTRIBUTES:
            node.attributes[name] = next(iter(ir.convenience.convert_attributes({name: value})))


def apply_routers(model, routers: list[SiteRouter]) -> list[str]:
    """Write calibrated routers onto the ASA sites of another rewritten export of the same network.

    Router attributes (threshold, sink_blocks, local_blocks, select_per) are copied; the optional
    inputs head_thresholds / gate weights become initializers of the target's nodes (absent in
    the source = removed from the target, so the result routes exactly like the source); the
    function overloads are refreshed.

    Args:
        model: onnx_ir model already rewritten (e.g. `asa-export rewrite` of a KV-cache export).
        routers: `read_routers` of the calibrated model.

    Returns:
        The target's site names, in order.

    Raises:
        AsaExportError: the sites do not correspond (count, names, attention attributes or head
            shapes differ), or the router values are invalid for the target.
    """
    from asa_export import contract
    from asa_export.passes import rewrite

    nodes = rewrite.asa_nodes(model)
    if len(nodes) != len(routers):
        raise AsaExportError(f"the calibrated model has {len(routers)} ASA sites, this model "
                             f"{len(nodes)}; the sites do not correspond (rewrite both from "
                             "exports of the same network with the same rules)")
    for router, node in zip(routers, nodes):
        attrs = rewrite.node_attributes(node)
        _check_site(router, node, attrs, rewrite._node_heads(node))
        _set_router_attributes(node, attrs, router)
        for slot_name in ("head_thresholds", "gate_q_weight", "gate_k_weight"):
            _clear_input(model, node, contract, slot_name)
        gate = None
        if router.gate_q_weight is not None or router.gate_k_weight is not None:
            gate = types.SimpleNamespace(q_weight=router.gate_q_weight, k_weight=router.gate_k_weight)
        rewrite.set_router_inputs(model, node, head_thresholds=router.head_thresholds, gate=gate)
    rewrite.refresh_functions(model)
    return [n.name for n in nodes]


def _clear_input(model, node, contract, slot_name: str) -> None:
    """Remove the optional input `slot_name` from `node` (and its initializer if now unused)."""
    if slot_name not in contract.INPUTS:
        return
    slot = contract.INPUTS.index(slot_name)
    if len(node.inputs) <= slot or node.inputs[slot] is None:
        return
    old = node.inputs[slot]
    node.replace_input_with(slot, None)
    if old.is_initializer() and not old.uses() and old.name in model.graph.initializers:
        del model.graph.initializers[old.name]
    # Trailing absent inputs are dropped so the node's signature (overload) matches the source's.
    while node.inputs and node.inputs[-1] is None:
        node.resize_inputs(len(node.inputs) - 1)


def transfer_routers(calibrated_path, model) -> list[str]:
    """Load a calibrated model (`asa-export calibrate` output) and apply its routers to `model`.

    Args:
        calibrated_path: path of the calibrated .asa.onnx.
        model: onnx_ir model, rewritten, of the same network (e.g. its KV-cache export).

    Returns:
        The site names that received a router.

    Raises:
        AsaExportError: see `read_routers` / `apply_routers`.
    """
    import onnx_ir as ir

    return apply_routers(model, read_routers(ir.load(str(calibrated_path))))
