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
    ranks = [g.rank(x) for x in (q, k, v)]
    packed = None
    if ranks == [3, 3, 3]:
        packed = (g.int_attr(node, "q_num_heads"), g.int_attr(node, "kv_num_heads"))
        if not all(packed):
            raise NoMatch("3-D Attention inputs without q_num_heads / kv_num_heads")
    elif ranks != [4, 4, 4]:
        raise NoMatch(f"Q, K, V ranks {ranks}: only all 4-D [B, H, S, D] or all 3-D are expressible")
    if _input(node, 6) is not None:
        raise NoMatch("nonpad_kv_seqlen is not supported yet")
    if len(node.outputs) > 3 and node.outputs[3] is not None and node.outputs[3].uses():
        raise NoMatch("the qk_matmul_output output is used")
    past_key, past_value = _input(node, 4), _input(node, 5)
    if (past_key is None) != (past_value is None):
        raise NoMatch("past_key and past_value must be given together")
    causal_attr = g.int_attr(node, "is_causal", 0) == 1
    seq_axis = 1 if packed else 2
    if causal_attr and not g.same_dim(g.dims(q)[seq_axis], g.dims(k)[seq_axis]):
        raise NoMatch("is_causal with query and new-key lengths not provably equal")
    try:
        mask = masks.analyze(model, _mask_terms(_input(node, 3)))
    except masks.MaskError as exc:
        raise NoMatch(str(exc)) from exc
    if causal_attr:  # the causal frontier intersects the mask: still a contract mask
        mask = masks.MaskSpec(causal=True, window=mask.window, padding=mask.padding)
    key, value = KeySource(k), KeySource(v)
    if not packed:
        key_kv, g_k = peel_repeat_kv(key)
        value_kv, g_v = peel_repeat_kv(value)
        if g_k == g_v and g_k > 1 and past_key is None:
            key, value = key_kv, value_kv
    q_heads, kv_heads, head_dim, head_dim_v = _sizes(q, key.value, v, packed)
    return Match(
        rule=NAME, anchor=node, insert_before=node, query=q, key=key, value=value,
        output=node.outputs[0], scale=g.float_attr(node, "scale", 0.0) or 0.0,
        softcap=g.float_attr(node, "softcap", 0.0) or 0.0, mask=mask, q_heads=q_heads,
        kv_heads=kv_heads, head_dim=head_dim, head_dim_v=head_dim_v,
        past_kv=past_key is not None or not g.same_dim(g.dims(q)[seq_axis], g.dims(k)[seq_axis]),
        past=(past_key, past_value, node.outputs[1:3]) if past_key is not None else None,
        packed_heads=packed,
    )


def _sizes(q, k, v, packed):
    """(Hq, Hkv, D, Dv) where static."""
    def dim(value, axis):
        d = g.dims(value)
        return d[axis] if d is not None and isinstance(d[axis], int) else None

    if packed:
        hq, hkv = packed
        hidden_q, hidden_v = dim(q, 2), dim(v, 2)
        return hq, hkv, hidden_q // hq if hidden_q else None, hidden_v // hkv if hidden_v else None
    return dim(q, 1), dim(k, 1), dim(q, 3), dim(v, 3)
