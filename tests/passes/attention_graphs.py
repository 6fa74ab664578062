"""Tiny inline attention graphs for the rule tests, written with onnx.helper (no exporter)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NEG_INF = float("-inf")


class _Builder:
    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, array, name=None) -> str:
        self._n += 1
        name = name or f"c{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, n_out=1, **attrs) -> str | list[str]:
        self._n += 1
        outs = [f"{op_type.lower()}{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}", **attrs))
        return outs[0] if n_out == 1 else outs


def build(
    *, hq=4, hkv=2, d=16, mask="causal+padding", form="add", window=-1, softcap=0.0,
    scale_on="scores", probs_output=False, softmax_axis=-1, extra_bias=False, opset=18,
) -> onnx.ModelProto:
    """Q [B,Hq,S,D], K/V [B,Hkv,S,D] (+ attention_mask [B,S]) -> attention output.

    Args:
        mask: "none", "padding", "causal", "causal+padding".
        form: "add" (additive -inf mask), "where" (Where(keep, scores, -inf)) or "alibi"
            (an additive mask that also carries a distance bias).
        window: sliding window for causal masks (-1 none).
        softcap: 0 or the cap c of c·tanh(s/c).
        scale_on: "scores" (Mul after the MatMul) or "qk" (sqrt(scale) on Q and on K^T).
        probs_output: also expose the softmax output as a model output.
        softmax_axis: axis of the Softmax.
        extra_bias: add a random float bias input [1, Hq, S, S] to the scores.
    """
    b = _Builder()
    scale = 1.0 / np.sqrt(d)
    g = hq // hkv
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", hq, "S", d]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", hkv, "S", d]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", hkv, "S", d]),
    ]
    if "padding" in mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"]))
    k, v = "k", "v"
    if g > 1:  # transformers' repeat_kv
        shape = b.op("Shape", ["k"])
        target5 = b.op("Concat", [b.op("Slice", [shape, b.const(np.array([0])), b.const(np.array([2]))]),
                                  b.const(np.array([g])),
                                  b.op("Slice", [shape, b.const(np.array([2])), b.const(np.array([4]))])], axis=0)
        target4 = b.const(np.array([0, hq, -1, d]))
        axes = b.const(np.array([2]))
        k = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", ["k", axes]), target5]), target4])
        v = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", ["v", axes]), target5]), target4])
    kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
    q = "q"
    if scale_on == "qk":
        root = b.const(np.array(np.sqrt(scale), dtype=np.float32))
        q, kt = b.op("Mul", [q, root]), b.op("Mul", [kt, root])
    scores = b.op("MatMul", [q, kt])
    if scale_on == "scores":
        scores = b.op("Mul", [scores, b.const(np.array(scale, dtype=np.float32))])
    if softcap:
        c = b.const(np.array(softcap, dtype=np.float32))
        scores = b.op("Mul", [b.op("Tanh", [b.op("Div", [scores, c])]), c])
    if extra_bias:
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, hq, "S", "S"]))
        scores = b.op("Add", [scores, "bias"])
    keep = _keep_mask(b, mask, window)
    if form == "alibi":  # additive bias -slope·(i - j) on visible keys: a bias, not a mask
        s = b.op("Squeeze", [b.op("Shape", ["q"], start=2, end=3), b.const(np.array([0]))])
        r = b.op("Cast", [b.op("Range", [b.const(np.array(0)), s, b.const(np.array(1))])],
                 to=TensorProto.FLOAT)
        dist = b.op("Sub", [b.op("Unsqueeze", [r, b.const(np.array([1]))]),
                            b.op("Unsqueeze", [r, b.const(np.array([0]))])])
        bias = b.op("Mul", [dist, b.const(np.array(-0.5, dtype=np.float32))])
        additive = b.op("Where", [keep, bias, b.const(np.array(NEG_INF, dtype=np.float32))])
        scores = b.op("Add", [scores, additive])
    elif keep is not None and form == "add":
        additive = b.op("Where", [keep, b.const(np.array(0.0, dtype=np.float32)),
                                  b.const(np.array(NEG_INF, dtype=np.float32))])
        scores = b.op("Add", [scores, additive])
    elif keep is not None:
        scores = b.op("Where", [keep, scores, b.const(np.array(NEG_INF, dtype=np.float32))])
    probs = b.op("Softmax", [scores], axis=softmax_axis)
    fixed = b.op("Where", [b.op("IsNaN", [probs]), b.const(np.array(0.0, dtype=np.float32)), probs])
    b.nodes.append(helper.make_node("MatMul", [fixed, v], ["out"], name="pv"))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", hq, "S", d])]
    if probs_output:
        outputs.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, None))
    graph = helper.make_graph(b.nodes, "attention", inputs, outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _keep_mask(b: _Builder, mask: str, window: int) -> str | None:
    """[B or 1, 1, S, S] boolean keep mask built from shapes and the padding input."""
    if mask == "none":
        return None
    keep = None
    if "causal" in mask:
        s = b.op("Shape", ["q"], start=2, end=3)
        n = b.op("Squeeze", [s, b.const(np.array([0]))])
        r = b.op("Range", [b.const(np.array(0)), n, b.const(np.array(1))])
        rows = b.op("Unsqueeze", [r, b.const(np.array([1]))])
        cols = b.op("Unsqueeze", [r, b.const(np.array([0]))])
        keep = b.op("LessOrEqual", [cols, rows])
        if window > 0:
            dist = b.op("Sub", [rows, cols])
            keep = b.op("And", [keep, b.op("Less", [dist, b.const(np.array(window))])])
        keep = b.op("Unsqueeze", [keep, b.const(np.array([0, 1]))])
    if "padding" in mask:
        pad = b.op("Cast", ["attention_mask"], to=TensorProto.BOOL)
        pad = b.op("Unsqueeze", [pad, b.const(np.array([1, 2]))])
        keep = pad if keep is None else b.op("And", [keep, pad])
    return keep


def feeds(model: onnx.ModelProto, *, batch=2, seq=150, hq=4, hkv=2, d=16, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    names = {i.name for i in model.graph.input}
    out = {
        "q": rng.standard_normal((batch, hq, seq, d)).astype(np.float32),
        "k": rng.standard_normal((batch, hkv, seq, d)).astype(np.float32),
        "v": rng.standard_normal((batch, hkv, seq, d)).astype(np.float32),
    }
    if "attention_mask" in names:
        mask = np.ones((batch, seq), dtype=np.int64)
        mask[1:, : seq // 3] = 0  # left padding on every row but the first
        out["attention_mask"] = mask
    if "bias" in names:
        out["bias"] = rng.standard_normal((1, hq, seq, seq)).astype(np.float32)
    return out
