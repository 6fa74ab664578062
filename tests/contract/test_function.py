"""The model-local ONNX function against the numpy reference, in ONNX Runtime (CPU).

Each test builds a tiny model (one asa::AdaptiveSparseAttention node + its function), checks it
with `onnx.checker.check_model(full_check=True)`, runs it in ONNX Runtime and compares all four
outputs with asa_export.contract.reference: the output within float32 error, the telemetry
exactly (the router is float32 in both).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from asa_export.contract import INPUTS, OUTPUTS, AsaAttributes
from asa_export.contract import function as fn
from asa_export.contract import reference as ref
from asa_export.errors import AsaExportError

ort = pytest.importorskip("onnxruntime")


def _value_info(name, elem_type, dims):
    return helper.make_tensor_value_info(name, elem_type, dims)


def build_model(attrs: AsaAttributes, opset: int, present, num_outputs: int = 4,
                elem_type=TensorProto.FLOAT, mask_type=TensorProto.BOOL,
                bias_dims=("B", "Hq", "Sq", "Skv"), pass_dtype=False,
                outputs=None) -> onnx.ModelProto:
    """One ASA node + its function; graph inputs/outputs with symbolic dims.

    elem_type BFLOAT16 is fed as float32 and cast inside the graph (numpy has no bfloat16).
    """
    dtype = elem_type if pass_dtype else None
    io_type = TensorProto.FLOAT if elem_type == TensorProto.BFLOAT16 else elem_type
    names = ["query", "key", "value"] + [n if p else "" for n, p in zip(INPUTS[3:], present)]
    outputs = list(OUTPUTS[:num_outputs]) if outputs is None else outputs
    nodes, node_in, node_out = [], list(names), list(outputs)
    if elem_type == TensorProto.BFLOAT16:
        for i in (0, 1, 2) + ((4,) if present[1] else ()):
            nodes.append(helper.make_node("Cast", [names[i]], [names[i] + "_bf16"],
                                          to=TensorProto.BFLOAT16))
            node_in[i] = names[i] + "_bf16"
        node_out[0] = "output_bf16"
    nodes.append(fn.make_node(node_in, node_out, attrs, "asa_0", dtype=dtype))
    if elem_type == TensorProto.BFLOAT16:
        nodes.append(helper.make_node("Cast", ["output_bf16"], [outputs[0]], to=TensorProto.FLOAT))
    inputs = [_value_info("query", io_type, ["B", "Hq", "Sq", "D"]),
              _value_info("key", io_type, ["B", "Hkv", "Skv", "D"]),
              _value_info("value", io_type, ["B", "Hkv", "Skv", "Dv"])]
    if present[0]:
        inputs.append(_value_info("key_padding_mask", mask_type, ["B", "Skv"]))
    if present[1]:
        inputs.append(_value_info("attn_bias", io_type, list(bias_dims)))
    if present[2]:
        inputs.append(_value_info("head_thresholds", TensorProto.FLOAT, ["Hq"]))
    if len(present) > 3 and present[3]:
        inputs.append(_value_info("gate_q_weight", TensorProto.FLOAT, ["Hq", "D", "Dg"]))
        inputs.append(_value_info("gate_k_weight", TensorProto.FLOAT, ["Hkv", "D3", "Dg"]))
    out_dims = [["B", "Hq", "Sq", "Dv"], ["B", "Hsel", "NQ", "NK"], ["B", "Hsel", "NQ"],
                ["B", "NQ"]]
    graph_outputs = [_value_info(name, io_type if i == 0 else TensorProto.INT32, out_dims[i])
                     for i, name in enumerate(outputs) if name]
    graph = helper.make_graph(nodes, "asa_function_test", inputs, graph_outputs)
    num_fn_outputs = max(i for i, o in enumerate(outputs) if o) + 1
    function = fn.build_function(attrs, opset, present, num_fn_outputs, dtype=dtype)
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", opset),
                                             helper.make_opsetid("asa", 1)])
    model.ir_version = max(fn.MIN_IR_VERSION,
                           helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
    onnx.checker.check_model(model, full_check=True)
    return model


@functools.lru_cache(maxsize=None)
def session(attrs, opset, present, num_outputs=4, elem_type=TensorProto.FLOAT,
            mask_type=TensorProto.BOOL, bias_dims=("B", "Hq", "Sq", "Skv"), pass_dtype=False,
            outputs=None):
    model = build_model(attrs, opset, present, num_outputs, elem_type, mask_type, bias_dims,
                        pass_dtype, None if outputs is None else list(outputs))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def make_inputs(rng, batch, hq, hkv, sq, skv, dim, present, np_dtype=np.float32,
                mask_dtype=bool, bias_shape=None, gate_dim=8):
    """Random feeds; per-block offsets make the router's scores peaked (real selection).

    With 5 present flags and the 4th set, random learned-gate weights (Dg = gate_dim) too.
    """
    def blocky(shape):
        x = rng.standard_normal(shape)
        offsets = rng.standard_normal((*shape[:2], -(-shape[2] // 64), 1, shape[3]))
        x += np.repeat(offsets, 64, axis=3).reshape(*shape[:2], -1, shape[3])[:, :, :shape[2]]
        return x.astype(np_dtype)

    feeds = {"query": blocky((batch, hq, sq, dim)), "key": blocky((batch, hkv, skv, dim)),
             "value": rng.standard_normal((batch, hkv, skv, dim + 5)).astype(np_dtype)}
    if present[0]:
        feeds["key_padding_mask"] = (rng.random((batch, skv)) > 0.25).astype(mask_dtype)
    if present[1]:
        shape = (batch, hq, sq, skv) if bias_shape is None else bias_shape(batch, hq, sq, skv)
        feeds["attn_bias"] = rng.standard_normal(shape).astype(np_dtype)
    if present[2]:
        feeds["head_thresholds"] = rng.choice(
            np.array([0.3, 0.6, 0.9, 0.97, 1.0], np.float32), size=hq)
    if len(present) > 3 and present[3]:
        # Unit-variance embeddings: logits of spread ~sqrt(Dg), peaked enough to select.
        feeds["gate_q_weight"] = (rng.standard_normal((hq, dim, gate_dim))
                                  / np.sqrt(dim)).astype(np.float32)
        feeds["gate_k_weight"] = (rng.standard_normal((hkv, 3 * dim, gate_dim))
                                  / np.sqrt(3 * dim)).astype(np.float32)
    return feeds


def reference_outputs(feeds, attrs):
    return ref.asa_attention(feeds["query"], feeds["key"], feeds["value"], attrs,
                             feeds.get("key_padding_mask"), feeds.get("attn_bias"),
                             feeds.get("head_thresholds"),
                             gate_q_weight=feeds.get("gate_q_weight"),
                             gate_k_weight=feeds.get("gate_k_weight"))


def assert_matches(got, expected, atol=2e-5):
    assert not np.isnan(got[0]).any()
    np.testing.assert_allclose(got[0].astype(np.float64), expected[0], rtol=1e-4, atol=atol)
    for name, g, e in zip(OUTPUTS[1:], got[1:], expected[1:]):
        assert g.dtype == np.int32, name
        np.testing.assert_array_equal(g, e, err_msg=name)


def seeded(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# (opset, B, Hq, Hkv, Sq, Skv, D, attribute kwargs, present inputs)
CASES = [
    (18, 2, 4, 4, 97, 97, 16, dict(causal=True, threshold=0.9, sink_blocks=0, local_blocks=0),
     (False, False, False)),
    (18, 2, 6, 2, 97, 161, 16, dict(causal=True, threshold=0.5, window=100), (True, False, False)),
    (18, 1, 12, 3, 97, 200, 64, dict(causal=True, threshold=0.9, select_per=1), (True, True, True)),
    (17, 2, 4, 1, 97, 200, 16, dict(causal=False, threshold=0.5, softcap=2.5),
     (False, True, False)),
    (17, 1, 8, 2, 97, 161, 64, dict(causal=False, threshold=1.0, window=50), (True, True, False)),
    (23, 2, 6, 2, 97, 200, 16, dict(causal=True, threshold=0.9, softcap=5.0, sink_blocks=0,
                                    local_blocks=2, select_per=1), (True, False, True)),
    (23, 1, 3, 1, 97, 161, 16, dict(causal=True, threshold=1.0, block_size=128),
     (False, True, True)),
    (23, 2, 4, 4, 130, 70, 16, dict(causal=True, threshold=0.5, scale=0.2, sink_blocks=0,
                                    local_blocks=0), (False, False, False)),
    (18, 2, 4, 2, 16, 200, 16, dict(causal=True, threshold=0.5, sink_blocks=2),
     (True, False, True)),
    (18, 1, 8, 2, 97, 200, 16, dict(causal=False, threshold=0.9, window=80, local_blocks=2,
                                    select_per=1, block_size=128), (True, True, True)),
    (25, 1, 4, 2, 97, 161, 16, dict(causal=True, threshold=0.9), (True, True, True)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_function_matches_reference(case):
    opset, batch, hq, hkv, sq, skv, dim, kw, present = case
    attrs = AsaAttributes(**kw)
    feeds = make_inputs(seeded(case), batch, hq, hkv, sq, skv, dim, present)
    expected = reference_outputs(feeds, attrs)
    got = session(attrs, opset, present).run(None, feeds)
    assert_matches(got, expected)
    if attrs.threshold < 1.0 and not present[2]:
        assert ref.density(expected[2], expected[3], expected[2].shape[1]) < 1.0, \
            "the case should exercise a real selection"


def test_dynamic_shapes_in_one_session():
    attrs = AsaAttributes(causal=True, threshold=0.8, select_per=1)
    present = (True, True, False)
    sess = session(attrs, 18, present)
    # 129 and 65 keys leave a last key block of one key.
    for sq, skv in ((97, 97), (1, 200), (16, 200), (97, 161), (64, 64), (3, 5), (70, 129),
                    (5, 65)):
        feeds = make_inputs(seeded(sq, skv), 2, 6, 2, sq, skv, 16, present)
        assert_matches(sess.run(None, feeds), reference_outputs(feeds, attrs))


@pytest.mark.parametrize("mask_dtype", [np.int64, np.int32])
def test_integer_padding_masks(mask_dtype):
    attrs = AsaAttributes(causal=True, threshold=0.9)
    onnx_type = TensorProto.INT64 if mask_dtype == np.int64 else TensorProto.INT32
    present = (True, False, False)
    feeds = make_inputs(seeded("mask", onnx_type), 2, 4, 2, 97, 161, 16, present,
                        mask_dtype=mask_dtype)
    feeds["key_padding_mask"][0, :40] *= 7  # any nonzero keeps the key
    feeds["key_padding_mask"][1, 64:128] = 0  # a key block with a single kept key
    feeds["key_padding_mask"][1, 100] = 1
    got = session(attrs, 18, present, mask_type=onnx_type).run(None, feeds)
    assert_matches(got, reference_outputs(feeds, attrs))


def test_fully_padded_row_gives_zeros_not_nan():
    attrs = AsaAttributes(causal=True, threshold=0.9)
    present = (True, False, False)
    feeds = make_inputs(seeded("pad"), 2, 4, 2, 97, 161, 16, present)
    feeds["key_padding_mask"][1] = False
    got = session(attrs, 18, present).run(None, feeds)
    assert np.all(got[0][1] == 0) and np.all(got[1][1] == -1)
    assert np.all(got[2][1] == 0) and np.all(got[3][1] == 0)
    assert_matches(got, reference_outputs(feeds, attrs))


@pytest.mark.parametrize("dims", [("Sq", "Skv"), (1, 1, "Sq", "Skv"), ("B", 1, "Sq", "Skv")])
def test_bias_broadcast(dims):
    attrs = AsaAttributes(causal=False, threshold=0.9)
    present = (False, True, False)
    batch, hq, sq, skv = 2, 4, 97, 161
    sizes = {"B": batch, "Sq": sq, "Skv": skv}
    shape = tuple(sizes.get(d, d) for d in dims)
    feeds = make_inputs(seeded(dims), batch, hq, 2, sq, skv, 16, present,
                        bias_shape=lambda *_: shape)
    got = session(attrs, 18, present, bias_dims=dims).run(None, feeds)
    assert_matches(got, reference_outputs(feeds, attrs))


def test_float16_inputs():
    attrs = AsaAttributes(causal=True, threshold=0.9, softcap=5.0)
    present = (True, True, True)
    feeds = make_inputs(seeded("fp16"), 2, 6, 2, 97, 200, 64, present, np_dtype=np.float16)
    got = session(attrs, 18, present, elem_type=TensorProto.FLOAT16).run(None, feeds)
    expected = reference_outputs(feeds, attrs)  # float64 math on the float16 values
    assert got[0].dtype == np.float16
    # Error bar: twice the error of rounding the exact result to float16.
    bound = 2 * np.abs(expected[0].astype(np.float16).astype(np.float64) - expected[0]).max()
    assert np.abs(got[0].astype(np.float64) - expected[0]).max() <= bound + 1e-7
    for g, e in zip(got[1:], expected[1:]):  # the router sees the same float32 values
        np.testing.assert_array_equal(g, e)


def test_bfloat16_inputs():
    attrs = AsaAttributes(causal=True, threshold=0.9, select_per=1)
    present = (True, True, False)
    feeds = make_inputs(seeded("bf16"), 1, 6, 2, 97, 161, 16, present)
    bf16 = {k: _round_bf16(v) if v.dtype == np.float32 else v for k, v in feeds.items()}
    got = session(attrs, 18, present, elem_type=TensorProto.BFLOAT16).run(None, feeds)
    expected = reference_outputs(bf16, attrs)
    bound = 2 * np.abs(_round_bf16(expected[0]) - expected[0]).max()
    assert np.abs(got[0].astype(np.float64) - expected[0]).max() <= bound + 1e-7
    for g, e in zip(got[1:], expected[1:]):
        np.testing.assert_array_equal(g, e)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest even), returned as float32/64 like the input."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.asarray(x).dtype)


def test_opset_14_with_explicit_dtype():
    attrs = AsaAttributes(causal=True, threshold=0.9)
    present = (True, False, False)
    feeds = make_inputs(seeded("opset14"), 1, 4, 2, 97, 161, 16, present)
    got = session(attrs, 14, present, pass_dtype=True).run(None, feeds)
    assert_matches(got, reference_outputs(feeds, attrs))
    with pytest.raises(AsaExportError, match="CastLike"):
        fn.build_function(attrs, 14, present, 1)
    for opset in (13, 26):
        with pytest.raises(AsaExportError, match="opsets"):
            fn.build_function(attrs, opset, present, 1)


@pytest.mark.parametrize("outputs", [("output",), ("output", "", "block_counts"),
                                     ("output", "", "", "visible_counts")])
def test_output_subsets(outputs):
    attrs = AsaAttributes(causal=True, threshold=0.6)
    present = (False, False, False)
    feeds = make_inputs(seeded(outputs), 1, 4, 2, 97, 161, 16, present)
    got = session(attrs, 18, present, outputs=outputs).run(None, feeds)
    expected = reference_outputs(feeds, attrs)
    wanted = [i for i, name in enumerate(outputs) if name]
    assert len(got) == len(wanted)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=2e-5)
    for g, i in zip(got[1:], wanted[1:]):
        np.testing.assert_array_equal(g, expected[i])


def test_node_identity_and_declared_attributes():
    attrs = AsaAttributes(causal=True, threshold=0.7, window=128)
    node = fn.make_node(["q", "k", "v", "", "bias", ""], ["o", "", "counts", ""], attrs, "n")
    assert (node.op_type, node.domain) == ("AdaptiveSparseAttention", "asa")
    assert list(node.input) == ["q", "k", "v", "", "bias"]  # trailing empties dropped
    assert list(node.output) == ["o", "", "counts"]
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert values["plugin_namespace"] == b"asa" and values["plugin_version"] == b"1"
    assert values["window"] == 128 and values["causal"] == 1
    function = fn.build_function(attrs, 18, (False, True, False), 3)
    assert (function.domain, function.name) == (node.domain, node.op_type)
    assert function.overload == node.overload
    assert node.overload.startswith(attrs.function_name())
    assert set(values) <= set(function.attribute)
    assert list(function.input) == list(INPUTS)


def test_call_node_with_trailing_empty_inputs():
    """Graph tools may keep missing trailing inputs as "": the function accepts that too."""
    attrs = AsaAttributes(causal=True, threshold=0.7)
    present = (True, False, False)
    model = build_model(attrs, 18, present)
    node = model.graph.node[0]
    node.input.extend(["", ""])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = make_inputs(seeded("trailing"), 1, 4, 2, 97, 161, 16, present)
    assert_matches(sess.run(None, feeds), reference_outputs(feeds, attrs))


def test_overloads_are_unique_per_variant():
    a, b = AsaAttributes(threshold=0.5), AsaAttributes(threshold=0.6)
    names = {fn.function_overload(x, p, n) for x in (a, b)
             for p in ((False, False, False), (True, False, False), (False, False, True))
             for n in (1, 4)}
    assert len(names) == 12


def test_two_nodes_with_different_attributes_in_one_model():
    """Two call nodes, two functions told apart by overload only."""
    dense, sparse = AsaAttributes(causal=True), AsaAttributes(causal=True, threshold=0.5)
    present = (False, False, False)
    nodes = [fn.make_node(["query", "key", "value"], [f"out_{i}", "", f"counts_{i}"], attrs,
                          f"asa_{i}") for i, attrs in enumerate((dense, sparse))]
    functions = [fn.build_function(attrs, 18, present, 3) for attrs in (dense, sparse)]
    inputs = [_value_info("query", TensorProto.FLOAT, ["B", 4, "Sq", 16]),
              _value_info("key", TensorProto.FLOAT, ["B", 2, "Skv", 16]),
              _value_info("value", TensorProto.FLOAT, ["B", 2, "Skv", 16])]
    outputs = [_value_info(name, elem, dims) for i in (0, 1) for name, elem, dims in (
        (f"out_{i}", TensorProto.FLOAT, ["B", 4, "Sq", 16]),
        (f"counts_{i}", TensorProto.INT32, ["B", 4, "NQ"]))]
    model = helper.make_model(helper.make_graph(nodes, "two", inputs, outputs),
                              functions=functions,
                              opset_imports=[helper.make_opsetid("", 18),
                                             helper.make_opsetid("asa", 1)])
    model.ir_version = fn.MIN_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = seeded("two")
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((1, 4, 300, 16), (1, 2, 300, 16), (1, 2, 300, 16)))
    k[:, :, :64] += 3 * q.mean(axis=(1, 2))[:, None, None]  # one key block stands out
    got = sess.run(None, {"query": q, "key": k, "value": v})
    for i, attrs in enumerate((dense, sparse)):
        expected = ref.asa_attention(q, k, v, attrs)
        np.testing.assert_allclose(got[2 * i], expected[0], rtol=1e-4, atol=2e-5)
        np.testing.assert_array_equal(got[2 * i + 1], expected[2])
    assert (got[3] < got[1]).any()  # the sparse node really dropped blocks


# ---------------------------------------------------------------- selection step alone


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("select_per", [0, 1])
def test_selection_step_matches_reference_on_tied_scores(causal, select_per):
    """Identical scores in, identical selection out: ties, forced blocks, crossing blocks."""
    attrs = AsaAttributes(causal=causal, sink_blocks=1, local_blocks=2, select_per=select_per,
                          threshold=0.5)
    batch, hq, hsel, nq, nk = 3, 4, (4 if select_per == 0 else 2), 5, 9
    sq, skv = nq * 64 - 10, nk * 64 - 30
    rng = seeded("select", causal, select_per)
    raw = rng.integers(0, 4, size=(batch, hsel, nq, nk)).astype(np.float32)
    raw[0, 0, 0] = [1, 0, 0, 0, 0, 0, 0, 8, 0]  # forced sum small, one dominant block
    visible = rng.random((batch, nq, nk)) > 0.2
    visible[0, 0] = True
    raw = np.where(visible[:, None], raw, 0)
    probs = (raw / np.maximum(raw.sum(-1, keepdims=True), 1)).astype(np.float32)
    thr = rng.choice(np.array([0.05, 0.3, 0.5, 0.75, 0.9, 1.0], np.float32), size=hq)
    feeds = {"query": np.zeros((batch, hq, sq, 1), np.float32),
             "key": np.zeros((batch, 2, skv, 1), np.float32),
             "probs": probs, "visible": visible}
    for has_thr in (False, True):
        model = fn.selection_model(attrs, 18, has_thr)
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        if has_thr:
            feeds["head_thresholds"] = thr
        (keep,) = sess.run(None, feeds)
        expected = ref.select_blocks(probs, visible, attrs, sq, skv,
                                     thr if has_thr else None)
        np.testing.assert_array_equal(keep, expected)


def test_selection_step_forced_blocks_come_first():
    """Forced blocks exhaust tau before a dominant non-forced block is reached."""
    attrs = AsaAttributes(causal=True, sink_blocks=1, local_blocks=1, threshold=0.3)
    probs = np.array([0.2, 0.7, 0.1], np.float32).reshape(1, 1, 1, 3)
    feeds = {"query": np.zeros((1, 1, 64, 1), np.float32),
             "key": np.zeros((1, 1, 192, 1), np.float32),
             "probs": probs, "visible": np.ones((1, 1, 3), bool)}
    model = fn.selection_model(attrs, 18, False)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (keep,) = sess.run(None, feeds)
    # Sink 0 and local 2 are forced: 0.2 + 0.1 = 0.3 is not below 0.3, so block 1 is dropped.
    assert keep[0, 0, 0].tolist() == [True, False, True]
    np.testing.assert_array_equal(keep, ref.select_blocks(probs, feeds["visible"], attrs, 64, 192))


# ---------------------------------------------------------------- ORT facts the function needs


def _run_single(node, inputs, feeds, out_types, opset=18):
    outs = [helper.make_tensor_value_info(f"y{i}", t, None) for i, t in enumerate(out_types)]
    graph = helper.make_graph([node], "g", inputs, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = fn.MIN_IR_VERSION
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_ort_topk_breaks_ties_by_lower_index():
    rng = seeded("topk")
    x = rng.integers(0, 3, size=(64, 37)).astype(np.float32)
    x[:, ::4] = 2.0
    node = helper.make_node("TopK", ["x", "k"], ["y0", "y1"], axis=-1, largest=1, sorted=1)
    inputs = [_value_info("x", TensorProto.FLOAT, [64, 37]),
              _value_info("k", TensorProto.INT64, [1])]
    _, idx = _run_single(node, inputs, {"x": x, "k": np.array([37])},
                         [TensorProto.FLOAT, TensorProto.INT64])
    np.testing.assert_array_equal(idx, np.argsort(-x, axis=-1, kind="stable"))


def test_ort_exclusive_cumsum_is_sequential_float32():
    x = seeded("cumsum").random((16, 300)).astype(np.float32) * 0.01
    node = helper.make_node("CumSum", ["x", "axis"], ["y0"], exclusive=1)
    inputs = [_value_info("x", TensorProto.FLOAT, [16, 300]),
              _value_info("axis", TensorProto.INT64, [])]
    (got,) = _run_single(node, inputs, {"x": x, "axis": np.array(-1)},
                         [TensorProto.FLOAT])
    acc = np.zeros(16, np.float32)
    for j in range(300):
        np.testing.assert_array_equal(got[:, j], acc)
        acc = (acc + x[:, j]).astype(np.float32)
