"""Rule: the standard ONNX `Attention` op (opset 23+), as dynamo exports SDPA at opset 23.

    Y = Attention(Q, K, V, [attn_mask], [past_key, past_value]; scale, is_causal, softcap)
      ->  K' = Concat(past_key, K), V' = Concat(past_value, V)       (only with a past)
          Y  = AdaptiveSparseAttention(Q, K', V', key_padding_mask)   present_* = K', V'

Only the 4-D [B, H, S, D] form is rewritten. `is_causal` aligns bottom-right with the past as
offset, which is the contract's alignment when K's new length equals Q's length.
"""

from __future__ import annotations

import onnx_ir as ir

from asa_export.passes import graph as g
from asa_export.passes import masks
from asa_export.passes.rules.base import KeySource, Match, NoMatch, peel_repeat_kv

NAME = "onnx_attention"


def anchors(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Attention" and n.domain in g.STANDARD_DOMAINS]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _mask_terms(mask: ir.Value | None) -> list[masks.MaskTerm]:
    if mask is None:
        return []
    kind = "keep" if mask.dtype == ir.DataType.BOOL else "additive"
    return [masks.MaskTerm(mask, kind)]


def match(model: ir.Model, node: ir.Node) -> Match:
    """Prove that the Attention node's semantics fit the contract."""
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    if any(g.rank(x) != 4 for x in (q, k, v)):
        raise NoMatch("only the 4-D [B, H, S, D] form of Attention is rewritten (3-D inputs given)")
    if _input(node, 6) is not None:
        raise NoMatch("nonpad_kv_seqlen is not supported yet")
    if len(node.outputs) > 3 and node.outputs[3] is not None and node.outputs[3].uses():
        raise NoMatch("the qk_matmul_output output is used")
    past_key, past_value = _input(node, 4), _input(node, 5)
    if (past_key is None) != (past_value is None):
        raise NoMatch("past_key and past_value must be given together")
    causal_attr = g.int_attr(node, "is_causal", 0) == 1
    if causal_attr and not g.same_dim(g.dims(q)[2], g.dims(k)[2]):
        raise NoMatch("is_causal with query and new-key lengths not provably equal")
    try:
        mask = masks.analyze(model, _mask_terms(_input(node, 3)))
    except masks.MaskError as exc:
        raise NoMatch(str(exc)) from exc
    if causal_attr:  # the causal frontier intersects the mask: still a contract mask
        mask = masks.MaskSpec(causal=True, window=mask.window, padding=mask.padding)
    key, value = KeySource(k), KeySource(v)
    key_kv, g_k = peel_repeat_kv(key)
    value_kv, g_v = peel_repeat_kv(value)
    if g_k == g_v and g_k > 1 and past_key is None:
        key, value = key_kv, value_kv
    q_dims, k_dims = g.dims(q), g.dims(key.value)
    scale = g.float_attr(node, "scale", 0.0) or 0.0
    return Match(
        rule=NAME, anchor=node, insert_before=node, query=q, key=key, value=value,
        output=node.outputs[0], scale=scale, softcap=g.float_attr(node, "softcap", 0.0) or 0.0,
        mask=mask, q_heads=q_dims[1] if isinstance(q_dims[1], int) else None,
        kv_heads=k_dims[1] if isinstance(k_dims[1], int) else None,
        head_dim=q_dims[3] if isinstance(q_dims[3], int) else None,
        head_dim_v=g.dims(v)[3] if isinstance(g.dims(v)[3], int) else None,
        past_kv=past_key is not None,
        past=(past_key, past_value, node.outputs[1:3]) if past_key is not None else None,
    )
