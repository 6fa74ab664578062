"""What every rule module returns, and the layout peeling they share.

A rule module exposes `NAME`, `anchors(model) -> nodes` and `match(model, node) -> Match`; a
failed check raises `NoMatch(reason)`. The rewrite pass turns a Match into one ASA node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir

from asa_export.passes import graph as g
from asa_export.passes.masks import MaskSpec


class NoMatch(Exception):
    """The region is not rewritten; str(exc) is the reason a user reads."""


@dataclasses.dataclass
class KeySource:
    """A [B, H, S, D] tensor, possibly still to be made: `value` transposed by `perm` (None = as is)."""

    value: ir.Value
    perm: list[int] | None = None


@dataclasses.dataclass
class Match:
    """A proven attention site, ready to be rewritten.

    `output` is the value the ASA node's output replaces; every other field maps onto a contract
    input or attribute.
    """

    rule: str
    anchor: ir.Node
    insert_before: ir.Node
    query: ir.Value
    key: KeySource
    value: KeySource
    output: ir.Value
    scale: float
    softcap: float
    mask: MaskSpec
    q_heads: int | None
    kv_heads: int | None
    head_dim: int | None
    head_dim_v: int | None
    past_kv: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)
    # (past_key, past_value, [present_key, present_value]) when the op itself appends a KV cache:
    # the rewrite concatenates the past in front of key / value and routes the presents to it.
    past: tuple | None = None
    # (Hq, Hkv) when Q / K / V and the output are packed [B, S, H·D] (3-D op forms): the rewrite
    # splits heads before the ASA node and merges them after it.
    packed_heads: tuple[int, int] | None = None
    # Nodes a site needs before its ASA node (a packed QKV split, a key padding mask built from
    # sequence lengths): called by the rewrite as prepare(graph, match, name) -> the Match to
    # rewrite. Matching never changes the graph, so `inspect` stays read-only.
    prepare: Callable[[ir.Graph, "Match", str], "Match"] | None = None


def peel_scalar_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """Strip Mul/Div by constant scalars: returns (unscaled value, accumulated factor)."""
    factor = 1.0
    while True:
        node = g.producer(value, "Mul", "Div")
        if node is None:
            return value, factor
        a, b = node.inputs[0], node.inputs[1]
        cb, ca = g.const_scalar(b), g.const_scalar(a)
        if node.op_type == "Div" and cb is not None and cb != 0.0:
            factor /= cb
            value = a
        elif node.op_type == "Mul" and cb is not None:
            factor *= cb
            value = a
        elif node.op_type == "Mul" and ca is not None:
            factor *= ca
            value = b
        else:
            return value, factor


def key_from_transposed(kt: ir.Value) -> KeySource:
    """K [B, H, Skv, D] from the QK MatMul's right operand K^T [B, H, D, Skv]."""
    node = g.producer(kt, "Transpose")
    if node is not None and g.rank(node.inputs[0]) == 4:
        perm = g.ints_attr(node, "perm") or [3, 2, 1, 0]
        perm_k = [perm[0], perm[1], perm[3], perm[2]]
        return KeySource(node.inputs[0], None if perm_k == [0, 1, 2, 3] else perm_k)
    source = _undo_merged_heads_transpose(kt)
    if source is not None:
        return KeySource(source)
    return KeySource(kt, [0, 1, 3, 2])


def _undo_merged_heads_transpose(kt: ir.Value) -> ir.Value | None:
    """Reshape([B,H,S,D] -> [B*H,S,D]) -> Transpose(0,2,1) -> Reshape(-> [B,H,D,S]): the source."""
    outer = g.producer(kt, "Reshape")
    if outer is None:
        return None
    trans = g.producer(outer.inputs[0], "Transpose")
    if trans is None or g.ints_attr(trans, "perm") != [0, 2, 1]:
        return None
    inner = g.producer(trans.inputs[0], "Reshape")
    if inner is None:
        return None
    source = inner.inputs[0]
    src, merged, out = g.dims(source), g.dims(inner.outputs[0]), g.dims(kt)
    if src is None or merged is None or out is None or len(src) != 4 or len(out) != 4:
        return None
    same = all(g.same_dim(a, b) for a, b in zip(out, [src[0], src[1], src[3], src[2]]))
    if same and len(merged) == 3 and g.same_dim(merged[1], src[2]) and g.same_dim(merged[2], src[3]):
        return source
    return None


def peel_repeat_kv(source: KeySource) -> tuple[KeySource, int]:
    """Undo transformers' repeat_kv (Unsqueeze(2) -> Expand -> Reshape) on a [B, Hq, S, D] tensor.

    Returns:
        (the [B, Hkv, S, D] source, group size G); G = 1 when no repeat is proven.
    """
    if source.perm is not None:
        return source, 1
    reshape = g.producer(source.value, "Reshape")
    expand = reshape and g.producer(reshape.inputs[0], "Expand")
    unsq = expand and g.producer(expand.inputs[0], "Unsqueeze")
    if unsq is None or g.axes_of(unsq) != [2]:
        return source, 1
    kv = unsq.inputs[0]
    src, expanded, out = g.dims(kv), g.dims(expand.outputs[0]), g.dims(source.value)
    if src is None or out is None or len(src) != 4 or len(out) != 4:
        return source, 1
    hkv, hq = src[1], out[1]
    if not (isinstance(hkv, int) and isinstance(hq, int) and hq % hkv == 0):
        return source, 1
    if expanded is not None and len(expanded) == 5 and isinstance(expanded[2], int):
        if expanded[2] * hkv != hq:
            return source, 1
    # Expand only broadcasts size-1 dims, so batch / length / head dim pass through unchanged;
    # symbolic inference may still name them differently ("total" vs "past + seq").
    if not all(_compatible(a, b) for a, b in ((src[0], out[0]), (src[2], out[2]), (src[3], out[3]))):
        return source, 1
    return KeySource(kv), hq // hkv


def _compatible(a, b) -> bool:
    """Not provably different: equal, or at least one side symbolic/unknown."""
    return a == b or not (isinstance(a, int) and isinstance(b, int))
