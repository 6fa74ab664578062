"""Rule: ONNX Runtime's com.microsoft MultiHeadAttention and GroupQueryAttention, where their
semantics fit the contract.

    Y = com.microsoft.MultiHeadAttention(Q [B,S,N·H], K, V, key_padding_mask [B, T],
                                         past_key, past_value; num_heads, scale, unidirectional)
      ->  Q', K', V' = split heads (Reshape + Transpose; 4-D K / V are already split)
          K'' = Concat(past_key, K'), V'' = Concat(past_value, V')    (only with a past)
          Y   = merge heads(AdaptiveSparseAttention(Q', K'', V'', key_padding_mask))

    Y, present_k, present_v = com.microsoft.GroupQueryAttention(Q [B,S,N·H] | QKV packed, K, V,
                                  seqlens_k [B], total_sequence_length; num_heads, kv_num_heads,
                                  causal, local_window_size W, softcap, scale)
      ->  Q, K, V = Slice(QKV) (packed only);  K', V' = split heads = present_k, present_v
          keep[b, j] = j <= seqlens_k[b]
          Y = merge heads(AdaptiveSparseAttention(Q', K', V', keep; causal, window=W, softcap))

MultiHeadAttention is refused with a reason for: packed QKV, projection bias, attention_bias,
1-D (length) padding masks, past_sequence_length / cache_indirection (shared-buffer decoding), a
used `qk` output.

GroupQueryAttention semantics measured with ONNX Runtime 1.32's CPU kernel (see
tests/passes/rules/test_ms_attention.py, which holds them): without a past, total_sequence_length
must equal S (the kernel rejects anything else); key j is visible iff j <= seqlens_k[b] (right
padding), j <= r when causal, and r - W < j with local_window_size W, which is the contract's
window W; rows with no visible key are zeros, as in the contract. Padded query rows
(r > seqlens_k[b], padding tokens) follow the same rule, except on the kernel's soft-cap + window
path, which anchors their window at the last real row: parity is claimed on real rows. Refused with a reason: a past KV cache (the kernel writes new keys at per-batch
offsets seqlens_k[b] + 1 - S, not after the past, so present_* and ragged batches differ from a
concatenation), do_rotary (rotary inside the op), smooth_softmax / head_sink, attention_bias,
position_ids, quantized caches, q/k norm weights, query_seqlens, sliding_window_cache, a used
output_qk.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from asa_export.passes import graph as g
from asa_export.passes import rewrite
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
    """Prove that a com.microsoft attention node's semantics fit the contract.

    Args:
        model: the model (unchanged; value shapes already inferred).
        node: a MultiHeadAttention or GroupQueryAttention node.

    Returns:
        The Match; raises NoMatch with the reason when the node's semantics do not fit.
    """
    if node.op_type == "GroupQueryAttention":
        return _match_gqa(node)
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


# GroupQueryAttention inputs (ORT 1.32 schema) whose semantics the contract does not express.
_GQA_REFUSED_INPUTS = {
    3: ("past_key (a KV cache: the kernel writes new keys at per-batch offsets seqlens_k[b] + 1 - S "
        "inside the cache, which a concatenation after the past does not reproduce)"),
    4: "past_value (a KV cache, see past_key)",
    9: "position_ids input", 10: "attention_bias input", 11: "head_sink input (smooth softmax)",
    12: "k_scale input (quantized KV cache)", 13: "v_scale input (quantized KV cache)",
    14: "q_norm_weight input (per-head RMS norm inside the op)",
    15: "k_norm_weight input (per-head RMS norm inside the op)",
    16: "query_seqlens input (right-padded query chunks)",
}
# Attributes whose non-default values the contract does not express: name -> (default, reason).
_GQA_REFUSED_ATTRS = {
    "do_rotary": (0, ("do_rotary=1: rotary embedding inside the op is not in the contract "
                      "(the contract takes RoPE'd Q and K)")),
    "smooth_softmax": (0, "smooth_softmax=1 (an extra 1 in the softmax denominator)"),
    "sliding_window_cache": (0, "sliding_window_cache=1 (a window-sized KV cache)"),
    "kv_cache_bit_width": (0, "a quantized KV cache (kv_cache_bit_width)"),
}


def _match_gqa(node: ir.Node) -> Match:
    """GroupQueryAttention without a past: causal or not, window, softcap, scale, seqlens_k."""
    for index, what in _GQA_REFUSED_INPUTS.items():
        if _input(node, index) is not None:
            raise NoMatch(f"GroupQueryAttention with a {what} is not rewritten")
    for name, (default, reason) in _GQA_REFUSED_ATTRS.items():
        if g.int_attr(node, name, default) != default:
            raise NoMatch(f"GroupQueryAttention with {reason} is not rewritten")
    for name in ("k_quant_type", "v_quant_type"):
        attr = node.attributes.get(name)
        if attr is not None and attr.value not in ("NONE", ""):
            raise NoMatch(f"GroupQueryAttention with a quantized KV cache ({name}) is not rewritten")
    if len(node.outputs) > 3 and node.outputs[3] is not None and node.outputs[3].uses():
        raise NoMatch("the GroupQueryAttention output_qk output is used")
    heads, kv_heads = g.int_attr(node, "num_heads"), g.int_attr(node, "kv_num_heads")
    if not heads or not kv_heads or heads % kv_heads:
        raise NoMatch("num_heads must be a multiple of kv_num_heads")
    lengths = _input(node, 5)
    if lengths is None:
        raise NoMatch("GroupQueryAttention without seqlens_k")
    q, k, v = node.inputs[0], _input(node, 1), _input(node, 2)
    packed = k is None and v is None
    if (k is None) != (v is None) or any(g.rank(x) != 3 for x in (q, k, v) if x is not None):
        raise NoMatch("only [B, S, hidden] query/key/value (or packed QKV) are expressible")
    hidden = _static(q, 2)
    width = heads + 2 * kv_heads if packed else heads
    if hidden is None or hidden % width:
        raise NoMatch("the query's hidden size is not a static multiple of the head count")
    head_dim = hidden // width
    causal = g.int_attr(node, "causal", 1) == 1
    window = g.int_attr(node, "local_window_size", -1)
    window = window if window is not None and window > 0 else -1
    return Match(
        rule=NAME, anchor=node, insert_before=node, query=q, key=KeySource(q if packed else k),
        value=KeySource(q if packed else v), output=node.outputs[0],
        scale=g.float_attr(node, "scale", 0.0) or 0.0,
        softcap=g.float_attr(node, "softcap", 0.0) or 0.0,
        mask=MaskSpec(causal=causal, window=window, last_kept=lengths), q_heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, head_dim_v=head_dim, packed_heads=(heads, kv_heads),
        notes=["key padding from seqlens_k: key j kept iff j <= seqlens_k[b]"]
        + (["packed QKV"] if packed else []),
        prepare=_prepare_gqa,
    )


def _prepare_gqa(graph: ir.Graph, match: Match, name: str) -> Match:
    """Add the packed-QKV slices, the 4-D K / V (= present_key / present_value) and the key
    padding mask built from seqlens_k; returns the Match the rewrite turns into an ASA node."""
    node, before = match.anchor, match.insert_before
    hq, hkv = match.packed_heads
    d = match.head_dim
    q, k, v = match.query, match.key.value, match.value.value
    if _input(node, 1) is None:  # packed [B, S, (Hq + 2·Hkv)·D]
        bounds = [0, hq * d, (hq + hkv) * d, (hq + 2 * hkv) * d]
        q, k, v = (_slice_last(graph, q, bounds[i], bounds[i + 1], before, f"{name}/qkv_{i}")
                   for i in range(3))
    batch, length = g.dims(match.query)[:2]
    k = rewrite._split_heads(graph, k, hkv, before, f"{name}/key")
    v = rewrite._split_heads(graph, v, hkv, before, f"{name}/value")
    for split in (k, v):  # rank 4 tells the rewrite these are split already
        split.shape = ir.Shape([batch, hkv, length, d])
    for present, new in zip(node.outputs[1:3], (k, v)):
        if present is not None and (present.uses() or present.is_graph_output()):
            rewrite._replace(present, new, new.name)
    keep = _keep_from_last_kept(graph, match.mask.last_kept, q, before, f"{name}/key_padding")
    mask = MaskSpec(causal=match.mask.causal, window=match.mask.window, padding=keep)
    return dataclasses.replace(match, query=q, key=KeySource(k), value=KeySource(v), mask=mask,
                               prepare=None)


def _const(graph: ir.Graph, array, before: ir.Node, name: str) -> ir.Value:
    node = ir.node("Constant", [], {"value": ir.tensor(np.asarray(array), name=name)}, name=name)
    graph.insert_before(before, node)
    return node.outputs[0]


def _slice_last(graph, value: ir.Value, start: int, end: int, before, name) -> ir.Value:
    """value[..., start:end] on a [B, S, X] tensor."""
    inputs = [value] + [_const(graph, np.array([x], dtype=np.int64), before, f"{name}/{part}")
                        for part, x in (("start", start), ("end", end), ("axis", 2))]
    node = ir.node("Slice", inputs, name=name)
    graph.insert_before(before, node)
    out = node.outputs[0]
    out.dtype = value.dtype
    dims = g.dims(value)
    out.shape = ir.Shape([dims[0], dims[1], end - start]) if dims else None
    return out


def _keep_from_last_kept(graph, last_kept: ir.Value, q: ir.Value, before, name) -> ir.Value:
    """keep[b, j] = j <= last_kept[b] for j < S (bool [B, S]); S is the query's length, which
    the kernel requires to equal the key length without a past."""
    def add(op, inputs, suffix, **attrs):
        n = ir.node(op, inputs, attrs, name=f"{name}/{suffix}")
        graph.insert_before(before, n)
        return n.outputs[0]

    # Gather / Range / Unsqueeze-with-axes-input spell this for every opset the function supports.
    length = add("Gather", [add("Shape", [q], "shape"),
                            _const(graph, np.array(1, dtype=np.int64), before, f"{name}/axis")],
                 "length", axis=0)
    zero = _const(graph, np.array(0, dtype=np.int64), before, f"{name}/zero")
    one = _const(graph, np.array(1, dtype=np.int64), before, f"{name}/one")
    positions = add("Range", [zero, length, one], "positions")
    row = add("Unsqueeze", [positions, _const(graph, np.array([0], dtype=np.int64), before,
                                              f"{name}/axes0")], "row")
    lens = add("Cast", [last_kept], "to_int64", to=ir.DataType.INT64)
    column = add("Unsqueeze", [lens, _const(graph, np.array([1], dtype=np.int64), before,
                                            f"{name}/axes1")], "column")
    keep = add("LessOrEqual", [row, column], "keep")
    keep.dtype = ir.DataType.BOOL
    return keep
