"""ms_attention rule: com.microsoft MultiHeadAttention and GroupQueryAttention."""

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


KV = 2


def _gqa(*, packed=False, past=False, extra_inputs=(), **attrs):
    """GroupQueryAttention [B, S, ·] -> out, present_key, present_value (all graph outputs)."""
    if packed:
        ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "S", (N + 2 * KV) * H])]
        names = ["q", "", ""]
    else:
        ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "S", N * H])]
        ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", KV * H]) for n in "kv"]
        names = ["q", "k", "v"]
    names += ["past_key", "past_value"] if past else ["", ""]
    if past:
        ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", KV, "P", H])
                for n in ("past_key", "past_value")]
    ins += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    names += ["seqlens_k", "total"]
    for index, name in extra_inputs:  # (input index, graph input name)
        names += [""] * (index + 1 - len(names))
        names[index] = name
        ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    outs = ["out", "present_key", "present_value"]
    node = helper.make_node("GroupQueryAttention", names, outs, name="gqa", domain="com.microsoft",
                            num_heads=N, kv_num_heads=KV, **attrs)
    out_shapes = [["B", "S", N * H], ["B", KV, "T", H], ["B", KV, "T", H]]
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info(n, TensorProto.FLOAT, d)
                                                 for n, d in zip(outs, out_shapes)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _gqa_feeds(model, batch=3, seq=150, last_kept=(149, 90, 20)):
    """Right-padded batch: row b holds last_kept[b] + 1 real tokens (seqlens_k = lengths - 1)."""
    rng = np.random.default_rng(1)
    q = model.graph.input[0]
    width = q.type.tensor_type.shape.dim[2].dim_value
    f = {"q": rng.standard_normal((batch, seq, width)).astype(np.float32)}
    if len(model.graph.input) > 1 and model.graph.input[1].name == "k":
        for n in "kv":
            f[n] = rng.standard_normal((batch, seq, KV * H)).astype(np.float32)
    f["seqlens_k"] = np.array(last_kept, dtype=np.int32)
    f["total"] = np.array(seq, dtype=np.int32)  # without a past the kernel requires total == S
    return f


def _rewrite(model):
    m = ir.serde.deserialize_model(model)
    report = rewrite_model(m, RewriteOptions(threshold=1.0, block_size=64))
    rewritten = ir.serde.serialize_model(m)
    onnx.checker.check_model(rewritten, full_check=True)
    return report, rewritten


@pytest.mark.parametrize("packed,attrs", [
    (False, {}),
    (True, {}),
    (False, {"local_window_size": 40}),
    (True, {"local_window_size": 40, "softcap": 2.0}),
    (False, {"scale": 0.3, "softcap": 5.0}),
    (False, {"causal": 0}),
])
def test_gqa_rewrites_with_parity(packed, attrs):
    model = _gqa(packed=packed, **attrs)
    report, rewritten = _rewrite(model)
    ops = [n.op_type for n in rewritten.graph.node]
    assert OP_TYPE in ops and "GroupQueryAttention" not in ops
    site = report.sites[0]
    assert (site.q_heads, site.kv_heads, site.head_dim) == (N, KV, H)
    assert site.causal == bool(attrs.get("causal", 1))
    assert site.window == attrs.get("local_window_size", -1)
    assert site.softcap == pytest.approx(attrs.get("softcap", 0.0))
    assert site.scale == pytest.approx(attrs.get("scale", 0.0))
    assert "padding" in site.mask
    feeds = _gqa_feeds(model)
    expected, actual = _run(model, feeds), _run(rewritten, feeds)
    real = np.arange(150)[None, :] <= feeds["seqlens_k"][:, None]  # [B, S] non-padding rows
    np.testing.assert_allclose(actual[0][real], expected[0][real], atol=1e-4, rtol=1e-3)
    if not (attrs.get("softcap") and attrs.get("local_window_size")):
        # Padded query rows follow the contract too (and rows without a visible key are zeros
        # in both), except on ORT's soft-cap + window path, which anchors a padded row's window
        # at the last real row: those outputs belong to padding tokens.
        np.testing.assert_allclose(actual[0], expected[0], atol=1e-4, rtol=1e-3)
    for e, a in zip(expected[1:], actual[1:]):  # present_key / present_value
        np.testing.assert_array_equal(a, e)


def test_gqa_window_without_visible_keys_rows_are_zero_in_both():
    """Rows past seqlens_k by more than the window see no key: zeros in ORT and the rewrite."""
    model = _gqa(local_window_size=16)
    _, rewritten = _rewrite(model)
    feeds = _gqa_feeds(model, last_kept=(149, 90, 20))
    expected, actual = _run(model, feeds)[0], _run(rewritten, feeds)[0]
    empty = np.arange(150) - 16 >= 20  # batch 2: rows r with r - W >= last kept key
    assert empty.sum() > 0 and np.all(expected[2, empty] == 0) and np.all(actual[2, empty] == 0)


def test_gqa_inspect_leaves_the_graph_unchanged():
    model = _gqa(packed=True)
    m = ir.serde.deserialize_model(model)
    report = find_sites(m)
    assert [n.op_type for n in m.graph] == ["GroupQueryAttention"]
    assert report.sites[0].mask == "causal+padding(lengths)" and "packed QKV" in report.sites[0].notes


@pytest.mark.parametrize("kwargs,reason", [
    ({"do_rotary": 1, "extra_inputs": [(7, "cos"), (8, "sin")]}, "rotary embedding inside the op"),
    ({"past": True}, "per-batch offsets"),
    ({"smooth_softmax": 1}, "smooth_softmax"),
    ({"extra_inputs": [(10, "bias")]}, "attention_bias"),
    ({"extra_inputs": [(11, "sink")]}, "head_sink"),
])
def test_gqa_refused_with_reason(kwargs, reason):
    report = find_sites(ir.serde.deserialize_model(_gqa(**kwargs)))
    assert report.sites == [] and reason in report.rejected[0].reason


def gqa_from_attention_mask(**attrs):
    """GroupQueryAttention as ONNX Runtime's replace_mha_with_gqa wires it (convert_generation.py):
    seqlens_k = ReduceSum(attention_mask) - 1, total_sequence_length = attention_mask's length;
    present_key / present_value unused."""
    f32 = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("q", f32, ["B", "S", N * H]),
           helper.make_tensor_value_info("k", f32, ["B", "S", KV * H]),
           helper.make_tensor_value_info("v", f32, ["B", "S", KV * H]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])]
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "one"], ["rows"], keepdims=0),
        helper.make_node("Sub", ["rows", "one"], ["last"]),
        helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["shape"]),
        helper.make_node("Gather", ["shape", "axis1"], ["total64"], axis=0),
        helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"],
                         ["out", "present_key", "present_value"], name="gqa",
                         domain="com.microsoft", num_heads=N, kv_num_heads=KV, **attrs),
    ]
    inits = [helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             helper.make_tensor("axis1", TensorProto.INT64, [], [1])]
    graph = helper.make_graph(nodes, "g", ins,
                              [helper.make_tensor_value_info("out", f32, ["B", "S", N * H])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)])


def test_gqa_with_lengths_from_the_attention_mask_and_unused_presents():
    model = gqa_from_attention_mask(local_window_size=40)
    _, rewritten = _rewrite(model)
    assert [n.op_type for n in rewritten.graph.node].count("Reshape") == 4  # q, k, v, merge
    rng = np.random.default_rng(2)
    mask = np.ones((2, 150), dtype=np.int64)
    mask[1, 90:] = 0  # right padding, the convention seqlens_k encodes
    feeds = {"q": rng.standard_normal((2, 150, N * H)).astype(np.float32),
             "k": rng.standard_normal((2, 150, KV * H)).astype(np.float32),
             "v": rng.standard_normal((2, 150, KV * H)).astype(np.float32),
             "attention_mask": mask}
    np.testing.assert_allclose(_run(rewritten, feeds)[0], _run(model, feeds)[0],
                               atol=1e-4, rtol=1e-3)


def test_gqa_float16():
    """fp16 GroupQueryAttention becomes an fp16 ASA node; outputs agree to fp16 resolution
    (values ~1: one half-precision step is ~1e-3)."""
    model = _gqa(local_window_size=40)
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    _, rewritten = _rewrite(model)
    feeds = _gqa_feeds(model)
    for name in ("q", "k", "v"):
        feeds[name] = feeds[name].astype(np.float16)
    expected, actual = _run(model, feeds), _run(rewritten, feeds)
    assert actual[0].dtype == np.float16
    real = np.arange(150)[None, :] <= feeds["seqlens_k"][:, None]
    np.testing.assert_allclose(actual[0][real].astype(np.float32),
                               expected[0][real].astype(np.float32), atol=2e-3, rtol=1e-2)


def test_gqa_kernel_fact_total_sequence_length_is_s_without_a_past():
    """The rule ignores total_sequence_length: without a past ORT's kernel accepts only S (any
    other value is an error), so it carries no information. If ORT starts accepting other
    values, this fails and the rule must learn what they mean."""
    model = _gqa()
    feeds = _gqa_feeds(model, seq=40, last_kept=(39, 20, 5))
    _run(model, feeds)
    for total in (39, 41, 60):
        feeds["total"] = np.array(total, dtype=np.int32)
        with pytest.raises(Exception, match="total_sequence_length"):
            _run(model, feeds)
