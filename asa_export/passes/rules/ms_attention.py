"""Rule: ONNX Runtime's com.microsoft MultiHeadAttention, where its semantics fit the contract.

    Y = com.microsoft.MultiHeadAttention(Q [B,S,N·H], K, V, key_padding_mask [B, T],
                                         past_key, past_value; num_heads, scale, unidirectional)
      ->  Q', K', V' = split heads (Reshape + Transpose; 4-D K / V are already split)
          K'' = Concat(past_key, K'), V'' = Concat(past_value, V')    (only with a past)
          Y   = merge heads(AdaptiveSparseAttention(Q', K'', V'', key_padding_mask))

Refused with a reason: packed QKV, projection bias, attention_bias, 1-D (length) padding masks,
past_sequence_length / cache_indirection (shared-buffer decoding), a used `qk` output.
GroupQueryAttention is reported, not rewritten: its shared KV buffer, seqlens_k and built-in
rotary embedding have no contract counterpart yet.
"""

from __future__ import annotations

import onnx_ir as ir

from asa_export.passes import graph as g
from asa_export.passes.masks import MaskSpec
from asa_export.passes.rules.base import KeySource, Match, NoMatch

NAME = "ms_attention"
DOMAIN = "com.microsoft"


def anchors(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.domain == DOMAIN
            and n.op_type in ("MultiHeadAttention", "GroupQueryAttention")]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _static(value: ir.Value | None, axis: int) -> int | None:
    d = g.dims(value)
    return d[axis] if d is not None and isinstance(d[axis], int) else None


def match(model: ir.Model, node: ir.Node) -> Match:
    """Prove that a com.microsoft attention node's semantics fit the contract."""
    if node.op_type == "GroupQueryAttention":
        raise NoMatch(
            "GroupQueryAttention is not rewritten: its shared KV buffer, seqlens_k and built-in "
            "rotary embedding have no contract counterpart yet"
        )
    q, k, v = node.inputs[0], _input(node, 1), _input(node, 2)
    if k is None or v is None or g.rank(q) != 3:
        raise NoMatch("packed QKV (or KV) inputs are not supported")
    refused = {3: "projection bias", 5: "attention_bias", 8: "past_sequence_length",
               9: "cache_indirection"}
    for index, what in refused.items():
        if _input(node, index) is not None:
            raise NoMatch(f"the {what} input is not supported")
    if len(node.outputs) > 3 and node.outputs[3] is not None and node.outputs[3].uses():
        raise NoMatch("the qk output is used")
    padding = _input(node, 4)
    if padding is not None and g.rank(padding) != 2:
        raise NoMatch("only a [B, total_length] 0/1 key padding mask is expressible")
    heads = g.int_attr(node, "num_heads")
    if not heads:
        raise NoMatch("num_heads is missing")
    hidden = _static(q, 2)
    if hidden is None or hidden % heads:
        raise NoMatch("the query's hidden size is not a static multiple of num_heads")
    head_dim = hidden // heads
    kv_heads = heads if g.rank(k) == 3 else _static(k, 1)
    past_key, past_value = _input(node, 6), _input(node, 7)
    if (past_key is None) != (past_value is None):
        raise NoMatch("past_key and past_value must be given together")
    causal = g.int_attr(node, "unidirectional", 0) == 1
    return Match(
        rule=NAME, anchor=node, insert_before=node, query=q, key=KeySource(k),
        value=KeySource(v), output=node.outputs[0], scale=g.float_attr(node, "scale", 0.0) or 0.0,
        softcap=0.0, mask=MaskSpec(causal=causal, padding=padding), q_heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, head_dim_v=head_dim, past_kv=past_key is not None,
        past=(past_key, past_value, node.outputs[1:3]) if past_key is not None else None,
        packed_heads=(heads, kv_heads or heads),
    )
