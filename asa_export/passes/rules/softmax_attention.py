"""Rule: attention written out as MatMul -> Softmax -> MatMul (eager, sdpa and dynamo exports).

    S = MatMul(Q·a, K^T·b) [· c | / c] [-> c·Tanh(S / c)] [+ M | Where(keep, S, -inf)]
    P = Softmax(S, axis=-1) [-> Where(IsNaN(P), 0, P)] [-> Cast | Dropout]
    O = MatMul(P, V)
      ->  O = AdaptiveSparseAttention(Q, K, V, key_padding_mask)  scale = a·b·c, causal, window, softcap

K and V lose transformers' repeat_kv (GQA) where its shapes prove it; the mask terms M / keep are
proven causal / window / key padding by asa_export.passes.masks, which also names the padding input.
"""

from __future__ import annotations

import onnx_ir as ir

from asa_export.passes import graph as g
from asa_export.passes import masks
from asa_export.passes.rules.base import (
    Match, NoMatch, key_from_transposed, peel_repeat_kv, peel_scalar_scale, KeySource,
)

NAME = "softmax_attention"
_MAX_CHAIN = 12


def anchors(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Softmax" and n.domain in g.STANDARD_DOMAINS]


def _reaches_matmul(value: ir.Value, depth: int = 8) -> bool:
    """Whether `value` is a score tensor: a 4-D MatMul reached through score-wise ops."""
    node = g.producer(value)
    if node is None or depth == 0:
        return False
    if node.op_type == "MatMul":
        return g.rank(node.outputs[0]) in (4, None)
    if node.op_type in ("Cast", "Mul", "Div", "Add", "Tanh", "Where"):
        return any(_reaches_matmul(i, depth - 1) for i in node.inputs if i is not None)
    return False


def _softcap_of(mul: ir.Node) -> tuple[ir.Value, float, float] | None:
    """c·Tanh(x·a / c): returns (x, c, a); a collects the scalar scaling inside the Tanh."""
    for tanh_side, c_side in ((0, 1), (1, 0)):
        c = g.const_scalar(mul.inputs[c_side])
        tanh = g.producer(mul.inputs[tanh_side], "Tanh")
        if c is None or tanh is None or c <= 0:
            continue
        inner, factor = peel_scalar_scale(tanh.inputs[0])
        return inner, c, factor * c
    return None


def _walk_scores(scores: ir.Value):
    """From the Softmax input back to the QK MatMul: (matmul, post_scale, softcap, mask terms)."""
    post, softcap, terms = 1.0, 0.0, []
    x = scores
    for _ in range(_MAX_CHAIN):
        node = g.producer(x)
        if node is None:
            raise NoMatch("the scores do not come from a MatMul")
        op = node.op_type
        if op == "MatMul":
            return node, post, softcap, terms
        if op == "Cast":
            x = node.inputs[0]
        elif op == "Mul" and softcap == 0.0 and _softcap_of(node) is not None:
            # post·c·tanh(a·s / c) == c'·tanh(scale'·s / c') with c' = post·c, scale' = post·a
            x, c, inner_scale = _softcap_of(node)
            softcap = post * c
            post *= inner_scale
        elif op in ("Mul", "Div"):
            inner, factor = peel_scalar_scale(x)
            if inner is x:
                raise NoMatch(f"the scores are scaled by a non-constant ({op} {node.name})")
            if softcap:
                raise NoMatch("scaling between the soft-cap and the QK MatMul is not expressible")
            post *= factor
            x = inner
        elif op == "Add":
            a, b = node.inputs[0], node.inputs[1]
            x, mask = (a, b) if _reaches_matmul(a) else (b, a)
            if not _reaches_matmul(x):
                raise NoMatch("an Add before the Softmax has no score operand")
            terms.append(masks.MaskTerm(mask, "additive"))
        elif op == "Where":
            cond, a, b = node.inputs
            if _reaches_matmul(a) and (g.const_scalar(b) or 0.0) <= masks.MASKED_BELOW:
                terms.append(masks.MaskTerm(cond, "keep"))
                x = a
            elif _reaches_matmul(b) and (g.const_scalar(a) or 0.0) <= masks.MASKED_BELOW:
                raise NoMatch("a Where that masks where its condition is true is not supported yet")
            else:
                raise NoMatch(f"a Where before the Softmax ({node.name}) is not a mask fill")
        else:
            raise NoMatch(f"unexpected {op} ({node.name}) between the QK MatMul and the Softmax")
    raise NoMatch("the chain between the QK MatMul and the Softmax is too long")


def _walk_probs(softmax: ir.Node) -> ir.Node:
    """From the Softmax forward to the P·V MatMul (through the NaN fix, Cast, Dropout)."""
    x = softmax.outputs[0]
    for _ in range(_MAX_CHAIN):
        if x.is_graph_output():
            raise NoMatch("the attention probabilities are a model output")
        users = g.consumers(x)
        ops = sorted(u.op_type for u in users)
        if len(users) == 1 and ops[0] == "MatMul" and users[0].inputs[0] is x:
            return users[0]
        if len(users) == 1 and ops[0] in ("Cast", "Identity", "Dropout"):
            x = users[0].outputs[0]
        elif ops == ["IsNaN", "Where"]:
            where = next(u for u in users if u.op_type == "Where")
            isnan = next(u for u in users if u.op_type == "IsNaN")
            if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not x:
                raise NoMatch("unrecognised use of IsNaN on the attention probabilities")
            if g.const_scalar(where.inputs[1]) != 0.0:
                raise NoMatch("NaN probabilities are replaced by a non-zero value")
            x = where.outputs[0]
        else:
            raise NoMatch(
                f"the attention probabilities are used by {ops} (e.g. output_attentions); "
                "only one P·V MatMul is expressible"
            )
    raise NoMatch("the chain after the Softmax is too long")


def _softmax_axis_is_last(softmax: ir.Node) -> bool:
    axis = g.int_attr(softmax, "axis", -1)
    r = g.rank(softmax.inputs[0])
    return axis == -1 or (r is not None and axis == r - 1)


def _heads(value: ir.Value) -> int | None:
    d = g.dims(value)
    return d[1] if d is not None and isinstance(d[1], int) else None


def _last(value: ir.Value) -> int | None:
    d = g.dims(value)
    return d[-1] if d is not None and isinstance(d[-1], int) else None


def match(model: ir.Model, softmax: ir.Node) -> Match:
    """Prove that `softmax` belongs to an attention site the contract expresses."""
    if not _softmax_axis_is_last(softmax):
        raise NoMatch("the Softmax is not over the last axis")
    qk, post, softcap, terms = _walk_scores(softmax.inputs[0])
    pv = _walk_probs(softmax)
    if any(g.rank(v) != 4 for v in (qk.inputs[0], qk.inputs[1], pv.inputs[1])):
        raise NoMatch(
            "Q, K^T and V are not all rank 4 [B, H, S, D] (e.g. heads merged into the batch)"
        )
    query, q_factor = peel_scalar_scale(qk.inputs[0])
    kt, k_factor = peel_scalar_scale(qk.inputs[1])
    key = key_from_transposed(kt)
    value = KeySource(pv.inputs[1])
    notes = []
    key_kv, g_k = peel_repeat_kv(key)
    value_kv, g_v = peel_repeat_kv(value)
    if g_k == g_v and g_k > 1:
        key, value = key_kv, value_kv
    elif g_k > 1 or g_v > 1:
        notes.append("repeat_kv proven on only one of K and V: kept repeated (MHA)")
    try:
        mask = masks.analyze(model, terms)
    except masks.MaskError as exc:
        raise NoMatch(str(exc)) from exc
    q_heads = _heads(query)
    kv_heads = _heads(key.value) if key.perm is None else q_heads
    q_dims, k_dims = g.dims(query), g.dims(kt)
    past = not g.same_dim(q_dims[2], k_dims[3])
    return Match(
        rule=NAME, anchor=softmax, insert_before=pv, query=query, key=key, value=value,
        output=pv.outputs[0], scale=q_factor * k_factor * post, softcap=softcap, mask=mask,
        q_heads=q_heads, kv_heads=kv_heads, head_dim=_last(query), head_dim_v=_last(pv.inputs[1]),
        past_kv=past, notes=notes,
    )
