"""onnx_attention rule: the standard ONNX Attention op (opset 23), with masks and a KV cache."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from asa_export.contract import OP_TYPE
from asa_export.passes.pipeline import RewriteOptions, find_sites, rewrite_model

HQ, HKV, D = 4, 2, 16


def _model(*, causal=1, mask=None, past=False, three_d=False):
    """One Attention node; `mask` is None, "padding" (bool keep from attention_mask) or "input4d"."""
    nodes, inits = [], []
    if three_d:
        q = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "S", HQ * D])
        k = helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", "S", HKV * D])
        v = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", "S", HKV * D])
    else:
        q = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", HQ, "S", D])
        k = helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", HKV, "S", D])
        v = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", HKV, "S", D])
    inputs, att_inputs = [q, k, v], ["q", "k", "v"]
    if mask == "padding":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]))
        inits.append(numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"))
        inits.append(numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "ones2"))
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one1"))
        nodes += [  # ORT's Attention wants the mask's query dim spelled out: [B, 1, S, T]
            helper.make_node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL),
            helper.make_node("Unsqueeze", ["mask_bool", "axes12"], ["keep_b"]),
            helper.make_node("Shape", ["q"], ["s"], start=2, end=3),
            helper.make_node("Concat", ["ones2", "s", "one1"], ["rows_shape"], axis=0),
            helper.make_node("ConstantOfShape", ["rows_shape"], ["rows"],
                             value=helper.make_tensor("t", TensorProto.BOOL, [1], [True])),
            helper.make_node("And", ["keep_b", "rows"], ["keep"]),
        ]
        att_inputs.append("keep")
    elif mask == "input4d":
        inputs.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, ["B", 1, "S", "T"]))
        att_inputs.append("keep")
    else:
        att_inputs.append("")
    out_shape = ["B", "S", HQ * D] if three_d else ["B", HQ, "S", D]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)]
    att_outputs = ["out"]
    if past:
        inputs += [
            helper.make_tensor_value_info("past_key", TensorProto.FLOAT, ["B", HKV, "P", D]),
            helper.make_tensor_value_info("past_value", TensorProto.FLOAT, ["B", HKV, "P", D]),
        ]
        att_inputs += ["past_key", "past_value"]
        att_outputs += ["present_key", "present_value"]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", HKV, "T", D])
                    for n in ("present_key", "present_value")]
    attrs = dict(is_causal=causal)
    if three_d:
        attrs.update(q_num_heads=HQ, kv_num_heads=HKV)
    nodes.append(helper.make_node("Attention", att_inputs, att_outputs, name="attn", **attrs))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _feeds(model, batch=2, seq=130, past=0, seed=0):
    rng = np.random.default_rng(seed)
    names = {i.name for i in model.graph.input}
    f = {n: rng.standard_normal((batch, h, seq, D)).astype(np.float32)
         for n, h in (("q", HQ), ("k", HKV), ("v", HKV))}
    if "past_key" in names:
        f["past_key"] = rng.standard_normal((batch, HKV, past, D)).astype(np.float32)
        f["past_value"] = rng.standard_normal((batch, HKV, past, D)).astype(np.float32)
    if "attention_mask" in names:
        m = np.ones((batch, past + seq), dtype=np.int64)
        m[1:, :20] = 0
        f["attention_mask"] = m
    return f


def _run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _rewrite(model):
    m = ir.serde.deserialize_model(model)
    report = rewrite_model(m, RewriteOptions(threshold=1.0))
    out = ir.serde.serialize_model(m)
    onnx.checker.check_model(out, full_check=True)
    return out, report


@pytest.mark.parametrize("causal,mask,past", [(1, None, False), (0, "padding", False),
                                              (1, "padding", False), (1, None, True)])
def test_attention_op_rewrites_with_parity(causal, mask, past):
    model = _model(causal=causal, mask=mask, past=past)
    rewritten, report = _rewrite(model)
    assert [n.op_type for n in rewritten.graph.node].count(OP_TYPE) == 1
    assert "Attention" not in [n.op_type for n in rewritten.graph.node]
    site = report.sites[0]
    assert site.rule == "onnx_attention" and site.causal == bool(causal) and site.past_kv == past
    feeds = _feeds(model, seq=130 if not past else 7, past=150 if past else 0)
    expected, actual = _run(model, feeds), _run(rewritten, feeds)
    assert len(expected) == len(actual)
    if mask == "padding" and causal:  # left-padded rows without a visible key are outside parity
        keep = feeds["attention_mask"].astype(bool)
        rows = np.cumsum(keep, axis=1) > 0
        for e, a in zip(expected, actual):
            np.testing.assert_allclose(a.transpose(0, 2, 1, 3)[rows], e.transpose(0, 2, 1, 3)[rows],
                                       atol=1e-4, rtol=1e-3)
    else:
        for e, a in zip(expected, actual):
            np.testing.assert_allclose(a, e, atol=1e-4, rtol=1e-3)


def test_packed_3d_attention_op_rewrites_with_parity():
    model = _model(causal=1, three_d=True)
    rewritten, report = _rewrite(model)
    assert "Attention" not in [n.op_type for n in rewritten.graph.node]
    assert (report.sites[0].q_heads, report.sites[0].kv_heads) == (HQ, HKV)
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 97, h * D)).astype(np.float32)
             for n, h in (("q", HQ), ("k", HKV), ("v", HKV))}
    np.testing.assert_allclose(_run(rewritten, feeds)[0], _run(model, feeds)[0], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kwargs,reason", [
    (dict(mask="input4d"), "model input"),
])
def test_attention_op_rejections(kwargs, reason):
    report = find_sites(ir.serde.deserialize_model(_model(**kwargs)))
    assert report.sites == [] and reason in report.rejected[0].reason
