"""ms_attention rule: com.microsoft MultiHeadAttention (rewritten) and GroupQueryAttention (reported)."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from asa_export.contract import OP_TYPE
from asa_export.passes.pipeline import RewriteOptions, find_sites, rewrite_model

N, H = 4, 16


def _mha(*, unidirectional=1, padding=False, past=False, bias=False):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", N * H]) for n in "qkv"]
    names = ["q", "k", "v", "", "", "", "", ""]
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", N * H])]
    out_names = ["out"]
    if bias:
        ins.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3 * N * H]))
        names[3] = "bias"
    if padding:
        ins.append(helper.make_tensor_value_info("mask", TensorProto.INT32, ["B", "T"]))
        names[4] = "mask"
    if past:
        for i, n in ((6, "past_key"), (7, "past_value")):
            ins.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", N, "P", H]))
            names[i] = n
        out_names += ["present_key", "present_value"]
        outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", N, "T", H])
                 for n in ("present_key", "present_value")]
    while names[-1] == "":
        names.pop()
    node = helper.make_node("MultiHeadAttention", names, out_names, name="mha", domain="com.microsoft",
                            num_heads=N, unidirectional=unidirectional)
    graph = helper.make_graph([node], "g", ins, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _feeds(model, batch=2, seq=97, past=0):
    rng = np.random.default_rng(0)
    names = {i.name for i in model.graph.input}
    f = {n: rng.standard_normal((batch, seq, N * H)).astype(np.float32) for n in "qkv"}
    if "mask" in names:
        m = np.ones((batch, past + seq), dtype=np.int32)
        m[1, -30:] = 0  # right padding of the keys
        f["mask"] = m
    if "past_key" in names:
        for n in ("past_key", "past_value"):
            f[n] = rng.standard_normal((batch, N, past, H)).astype(np.float32)
    return f


def _run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


@pytest.mark.parametrize("unidirectional,padding,past", [(1, False, False), (0, True, False),
                                                          (1, False, True)])
def test_mha_rewrites_with_parity(unidirectional, padding, past):
    model = _mha(unidirectional=unidirectional, padding=padding, past=past)
    m = ir.serde.deserialize_model(model)
    report = rewrite_model(m, RewriteOptions(threshold=1.0))
    rewritten = ir.serde.serialize_model(m)
    onnx.checker.check_model(rewritten, full_check=True)
    ops = [n.op_type for n in rewritten.graph.node]
    assert OP_TYPE in ops and "MultiHeadAttention" not in ops
    assert report.sites[0].causal == bool(unidirectional) and report.sites[0].past_kv == past
    feeds = _feeds(model, seq=5 if past else 97, past=90 if past else 0)
    for e, a in zip(_run(model, feeds), _run(rewritten, feeds)):
        np.testing.assert_allclose(a, e, atol=1e-4, rtol=1e-3)


def test_mha_with_projection_bias_is_reported():
    report = find_sites(ir.serde.deserialize_model(_mha(bias=True)))
    assert report.sites == [] and "projection bias" in report.rejected[0].reason


def test_group_query_attention_is_reported_with_reason():
    ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "S", N * H]),
           helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", "S", 2 * H]),
           helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", "S", 2 * H]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
           helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"],
                            ["out", "pk", "pv"], domain="com.microsoft", num_heads=N, kv_num_heads=2)
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("out", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    report = find_sites(ir.serde.deserialize_model(model))
    assert report.sites == [] and "GroupQueryAttention" in report.rejected[0].reason
