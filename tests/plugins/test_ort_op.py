"""The ONNX Runtime custom op (plugins/onnxruntime, libasa_ort.so) on one-node models: parity
with the contract reference and with the model-local function, and clear errors on bad inputs.

Build first: `python tools/build_plugins.py` (or set ASA_ORT_LIB).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from asa_export.contract import AsaAttributes, INPUTS, OUTPUTS
from asa_export.contract import reference as ref
from asa_export.contract.function import build_function, make_node
from asa_export.runtime import ort as asa_ort

ort = pytest.importorskip("onnxruntime")
LIB = asa_ort.library_path()
if LIB is None or not LIB.is_file():
    pytest.skip("ASA ONNX Runtime library not built: run tools/build_plugins.py",
                allow_module_level=True)

OPSET = 18
_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(bool): TensorProto.BOOL, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.int64): TensorProto.INT64}


def one_node_model(attrs: AsaAttributes, feeds: dict[str, np.ndarray], num_outputs: int = 4,
                   with_function: bool = True, node=None) -> bytes:
    """A model with one ASA node over `feeds` (contract input names; missing = absent)."""
    inputs = [name if name in feeds else "" for name in INPUTS]
    while not inputs[-1]:
        inputs.pop()
    outputs = list(OUTPUTS[:num_outputs])
    present = tuple(name in feeds for name in INPUTS[3:])
    if node is None:
        node = make_node(inputs, outputs, attrs, "asa_0")
    out_type = _NP_TO_ONNX[feeds["query"].dtype]
    graph = helper.make_graph(
        [node], "one_asa",
        [helper.make_tensor_value_info(n, _NP_TO_ONNX[a.dtype], list(a.shape))
         for n, a in feeds.items()],
        [helper.make_tensor_value_info(o, out_type if i == 0 else TensorProto.INT32, None)
         for i, o in enumerate(outputs)])
    functions = [build_function(attrs, OPSET, present, num_outputs)] if with_function else []
    model = helper.make_model(graph, functions=functions, ir_version=10, opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid("asa", 1)])
    return model.SerializeToString()


def lib_session(model: bytes):
    return asa_ort.session(model, library=LIB)


def function_session(model: bytes):
    return asa_ort.session(model, library=False)


def _feeds(rng, b_, hq, hkv, sq, skv, d, *, mask=None, bias=None, thresholds=None,
           dtype=np.float32, gate_dim=None):
    q = rng.standard_normal((b_, hq, sq, d)).astype(np.float32)
    k = rng.standard_normal((b_, hkv, skv, d)).astype(np.float32)
    drift = np.linspace(0, 2, skv, dtype=np.float32)[None, None, :, None] * rng.standard_normal(
        (1, 1, 1, d)).astype(np.float32)
    feeds = {"query": (q + 0.5 * drift.mean(axis=2, keepdims=True)).astype(dtype),
             "key": (k + drift).astype(dtype),
             "value": rng.standard_normal((b_, hkv, skv, d)).astype(dtype)}
    if mask is not None:
        m = np.ones((b_, skv), dtype=mask)
        m[:, : skv // 5] = 0
        m[-1, -3:] = 0
        feeds["key_padding_mask"] = m
    if bias is not None:
        feeds["attn_bias"] = rng.standard_normal(bias).astype(dtype)
    if thresholds is not None:
        feeds["head_thresholds"] = np.asarray(thresholds, dtype=np.float32)
    if gate_dim is not None:
        # Learned gate weights whose logits spread over a few units (real block preferences).
        feeds["gate_q_weight"] = (rng.standard_normal((hq, d, gate_dim)) * 4 / np.sqrt(d)
                                  ).astype(np.float32)
        feeds["gate_k_weight"] = (rng.standard_normal((hkv, 3 * d, gate_dim))
                                  * 4 / np.sqrt(3 * d * gate_dim)).astype(np.float32)
    return feeds


def _reference(attrs, feeds):
    return ref.asa_attention(feeds["query"], feeds["key"], feeds["value"], attrs,
                             feeds.get("key_padding_mask"), feeds.get("attn_bias"),
                             feeds.get("head_thresholds"),
                             gate_q_weight=feeds.get("gate_q_weight"),
                             gate_k_weight=feeds.get("gate_k_weight"))


CASES = [
    ("causal_gqa_tau1", (1, 6, 2, 161, 161, 32), dict(causal=True), {}),
    ("full_tau05_group", (2, 4, 2, 97, 200, 32), dict(threshold=0.5, select_per=1,
                                                      sink_blocks=0, local_blocks=0), {}),
    ("causal_pad_window", (2, 4, 1, 200, 200, 16), dict(causal=True, window=90, threshold=0.7),
     {"mask": np.int64}),
    ("softcap_bias_bool_mask", (2, 4, 2, 97, 161, 32), dict(softcap=4.0, threshold=0.6),
     {"mask": np.bool_, "bias": (2, 1, 97, 161)}),
    ("head_thresholds", (1, 4, 2, 200, 200, 32), dict(causal=True, local_blocks=0),
     {"thresholds": [0.4, 1.0, 0.6, 0.3]}),
    # Learned gate (inputs 6-7), alone and after every other optional input.
    ("gate_causal_gqa", (1, 6, 2, 161, 161, 32), dict(causal=True, threshold=0.6),
     {"gate_dim": 32}),
    ("gate_group_pad_block128", (2, 4, 2, 200, 333, 48),
     dict(threshold=0.5, select_per=1, block_size=128, sink_blocks=0), {"mask": np.int64,
                                                                       "gate_dim": 16}),
    ("gate_all_inputs", (2, 4, 2, 97, 161, 32), dict(causal=True, softcap=4.0, local_blocks=0),
     {"mask": np.bool_, "bias": (2, 1, 97, 161), "thresholds": [0.5, 0.7, 0.4, 1.0],
      "gate_dim": 7}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_library_matches_reference_and_function(case):
    _, shape, overrides, extras = case
    attrs = AsaAttributes(**overrides)
    feeds = _feeds(np.random.default_rng(len(case[0])), *shape, **extras)
    model = one_node_model(attrs, feeds)
    lib = lib_session(model).run(None, feeds)
    fn = function_session(model).run(None, feeds)
    expect = _reference(attrs, feeds)
    same = (lib[1] == expect[1]).all(axis=-1) & (lib[2] == expect[2])
    assert same.mean() >= 0.98, f"{(~same).sum()} of {same.size} block lists differ"
    np.testing.assert_array_equal(lib[3], expect[3])
    rows = np.repeat(np.repeat(same, shape[1] // same.shape[1], axis=1), attrs.block_size,
                     axis=2)[:, :, : shape[3]]
    np.testing.assert_allclose(lib[0][rows], expect[0][rows], rtol=1e-4, atol=3e-5)
    # Library vs function body: same selection (up to router rounding), same output.
    same_fn = (lib[1] == fn[1]).all(axis=-1) & (lib[2] == fn[2])
    assert same_fn.mean() >= 0.98
    rows = np.repeat(np.repeat(same_fn, shape[1] // same.shape[1], axis=1), attrs.block_size,
                     axis=2)[:, :, : shape[3]]
    np.testing.assert_allclose(lib[0][rows], fn[0][rows], rtol=1e-4, atol=3e-5)


def test_library_runs_instead_of_the_function(tmp_path):
    """With the library registered the node must not be inlined: profile shows our kernel."""
    attrs = AsaAttributes(causal=True)
    feeds = _feeds(np.random.default_rng(0), 1, 2, 1, 64, 64, 16)
    model = one_node_model(attrs, feeds)
    sess = lib_session(model)
    # The function body has dozens of nodes; the library keeps the single custom node.
    opts2, _ = asa_ort.session_options(LIB)
    opts2.enable_profiling = True
    opts2.profile_file_prefix = str(tmp_path / "asa_profile")
    prof = ort.InferenceSession(model, opts2, providers=["CPUExecutionProvider"])
    prof.run(None, feeds)
    trace = open(prof.end_profiling()).read()
    assert '"op_name" : "AdaptiveSparseAttention"' in trace
    assert '"op_name" : "MatMul"' not in trace
    assert sess.run(None, feeds)[0].shape == (1, 2, 64, 16)


@pytest.mark.parametrize("num_outputs", [1, 2, 3])
def test_optional_outputs(num_outputs):
    attrs = AsaAttributes(causal=True, threshold=0.5)
    feeds = _feeds(np.random.default_rng(1), 1, 4, 2, 161, 161, 32)
    full = lib_session(one_node_model(attrs, feeds)).run(None, feeds)
    part = lib_session(one_node_model(attrs, feeds, num_outputs)).run(None, feeds)
    assert len(part) == num_outputs
    for a, b in zip(part, full):
        np.testing.assert_array_equal(a, b)


def test_float16_inputs():
    attrs = AsaAttributes(causal=True, threshold=0.7)
    feeds = _feeds(np.random.default_rng(2), 1, 4, 2, 161, 161, 64, dtype=np.float16)
    out, idx, cnt, vis = lib_session(one_node_model(attrs, feeds)).run(None, feeds)
    assert out.dtype == np.float16
    r_out, r_idx, r_cnt, _ = _reference(attrs, feeds)
    same = (idx == r_idx).all(axis=-1) & (cnt == r_cnt)
    assert same.mean() >= 0.98
    rows = np.repeat(same, 64, axis=2)[:, :, :161]
    np.testing.assert_allclose(out[rows].astype(np.float64), r_out[rows], atol=4e-3, rtol=0)


def test_bfloat16_inputs():
    """bfloat16 through OrtValues (numpy has no bfloat16; ml_dtypes comes with onnx)."""
    import ctypes

    ml_dtypes = pytest.importorskip("ml_dtypes")
    attrs = AsaAttributes(causal=True, threshold=0.7)
    f32 = _feeds(np.random.default_rng(6), 1, 4, 2, 161, 161, 32)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in f32.items()}
    inputs = [helper.make_tensor_value_info(k, TensorProto.BFLOAT16, list(v.shape))
              for k, v in bf16.items()]
    node = make_node(["query", "key", "value"], ["output", "block_indices", "block_counts"],
                     attrs, "asa_0")
    graph = helper.make_graph([node], "g", inputs, [
        helper.make_tensor_value_info("output", TensorProto.BFLOAT16, None),
        helper.make_tensor_value_info("block_indices", TensorProto.INT32, None),
        helper.make_tensor_value_info("block_counts", TensorProto.INT32, None)])
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid("asa", 1)])
    values = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v.view(np.uint16),
                                                                 TensorProto.BFLOAT16)
              for k, v in bf16.items()}
    out, idx, cnt = lib_session(model.SerializeToString()).run_with_ort_values(None, values)
    assert out.data_type() == "tensor(bfloat16)"
    n = int(np.prod(out.shape()))
    raw = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(out.data_ptr())).copy()
    got = raw.view(ml_dtypes.bfloat16).reshape(out.shape()).astype(np.float32)
    r_out, r_idx, r_cnt, _ = ref.asa_attention(
        *(bf16[k].astype(np.float32) for k in ("query", "key", "value")), attrs)
    same = (idx.numpy() == r_idx).all(axis=-1) & (cnt.numpy() == r_cnt)
    assert same.mean() >= 0.98
    rows = np.repeat(same, 64, axis=2)[:, :, :161]
    np.testing.assert_allclose(got[rows], r_out[rows], atol=1.6e-2, rtol=0)


def test_empty_key_padding_rows_are_zero():
    attrs = AsaAttributes(causal=True)
    feeds = _feeds(np.random.default_rng(4), 2, 2, 1, 97, 97, 16, mask=np.int32)
    feeds["key_padding_mask"][0] = 0
    out = lib_session(one_node_model(attrs, feeds)).run(None, feeds)[0]
    assert np.isfinite(out).all() and not out[0].any()


def test_symbolic_shapes_feed_downstream_nodes():
    """Exports have symbolic dims and the output feeds other nodes: the inferred output type must
    follow the query (float), not the last dynamically typed input (the int64 mask)."""
    attrs = AsaAttributes(causal=True, threshold=0.5)
    node = make_node(["query", "key", "value", "key_padding_mask"], ["o", "", "counts"], attrs,
                     "asa_0")
    sym = lambda name, heads: helper.make_tensor_value_info(  # noqa: E731
        name, TensorProto.FLOAT, ["batch", heads, "seq", 32])
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["o"], ["y"])], "g",
        [sym("query", 8), sym("key", 2), sym("value", 2),
         helper.make_tensor_value_info("key_padding_mask", TensorProto.INT64, ["batch", "seq"])],
        [sym("y", 8), helper.make_tensor_value_info("counts", TensorProto.INT32, None)],
        value_info=[sym("o", 8)])
    model = helper.make_model(
        graph, ir_version=10, opset_imports=[helper.make_opsetid("", OPSET),
                                             helper.make_opsetid("asa", 1)],
        functions=[build_function(attrs, OPSET, (True, False, False), 3)])
    feeds = _feeds(np.random.default_rng(5), 2, 8, 2, 150, 150, 32, mask=np.int64)
    y, counts = lib_session(model.SerializeToString()).run(None, feeds)
    expect = _reference(attrs, feeds)
    assert y.dtype == np.float32 and counts.shape == (2, 8, 3)
    same = counts == expect[2]
    assert same.mean() >= 0.98
    rows = np.repeat(same, 64, axis=2)[:, :, :150]
    np.testing.assert_allclose(y[rows], np.maximum(expect[0], 0)[rows], rtol=1e-4, atol=3e-5)


# ---------------------------------------------------------------- errors


def _run_expect_error(model: bytes, feeds, needle: str):
    with pytest.raises(Exception) as info:
        lib_session(model).run(None, feeds)
    assert needle in str(info.value), str(info.value)


def test_heads_that_do_not_divide():
    attrs = AsaAttributes()
    feeds = _feeds(np.random.default_rng(0), 1, 4, 3, 64, 64, 16)
    _run_expect_error(one_node_model(attrs, feeds, with_function=False), feeds,
                      "query heads (4) must be a multiple of key/value heads (3)")


def test_wrong_rank():
    attrs = AsaAttributes()
    feeds = _feeds(np.random.default_rng(0), 1, 2, 1, 64, 64, 16)
    feeds["query"] = feeds["query"][0]
    _run_expect_error(one_node_model(attrs, feeds, with_function=False), feeds,
                      "query must be 4-D [B, H, S, D], got rank 3")


def test_bad_block_size_attribute():
    attrs = AsaAttributes()
    feeds = _feeds(np.random.default_rng(0), 1, 2, 1, 64, 64, 16)
    node = helper.make_node("AdaptiveSparseAttention", ["query", "key", "value"],
                            list(OUTPUTS), domain="asa", block_size=32,
                            plugin_namespace="asa", plugin_version="1")
    _run_expect_error(one_node_model(attrs, feeds, with_function=False, node=node), feeds,
                      "block_size must be 64 or 128, got 32")


@pytest.mark.parametrize("attrs,needle", [
    (dict(sink_blocks=2 ** 40), "attribute sink_blocks is out of range"),
    (dict(window=0, select_per=2), "invalid attributes: window must be -1 (none) or > 0, got 0; "
                                   "select_per must be 0 or 1, got 2"),
    (dict(threshold=float("inf")), "threshold must be finite and > 0, got inf"),
])
def test_attribute_values_the_contract_forbids(attrs, needle):
    """The shared attribute table (plugins/core/common/attributes.h) reports every problem."""
    feeds = _feeds(np.random.default_rng(0), 1, 2, 1, 64, 64, 16)
    node = helper.make_node("AdaptiveSparseAttention", ["query", "key", "value"], ["output"],
                            domain="asa", **attrs)
    _run_expect_error(one_node_model(AsaAttributes(), feeds, 1, with_function=False, node=node),
                      feeds, needle)


def test_attribute_of_the_wrong_type():
    attrs = AsaAttributes()
    feeds = _feeds(np.random.default_rng(0), 1, 2, 1, 64, 64, 16)
    node = helper.make_node("AdaptiveSparseAttention", ["query", "key", "value"], ["output"],
                            domain="asa", threshold=1, causal=1)  # threshold must be a float
    _run_expect_error(one_node_model(attrs, feeds, 1, with_function=False, node=node), feeds,
                      "attribute threshold must be a float")


def test_missing_attributes_take_contract_defaults():
    feeds = _feeds(np.random.default_rng(0), 1, 2, 1, 100, 100, 16)
    node = helper.make_node("AdaptiveSparseAttention", ["query", "key", "value"], ["output"],
                            domain="asa")
    out = lib_session(one_node_model(AsaAttributes(), feeds, 1, with_function=False,
                                     node=node)).run(None, feeds)[0]
    expect = _reference(AsaAttributes(), feeds)[0]  # dense, non-causal, 1/sqrt(D)
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("tamper,needle", [
    (lambda f: f.update(key_padding_mask=np.ones((1, 63), np.int64)),
     "key_padding_mask must have shape [B, Skv] = [1, 64]"),
    (lambda f: f.update(attn_bias=np.zeros((1, 2, 64, 3), np.float32)),
     "attn_bias shape [1, 2, 64, 3] is not broadcastable"),
    (lambda f: f.update(head_thresholds=np.ones(3, np.float32)),
     "head_thresholds must have shape [Hq] = [2]"),
    (lambda f: f.update(key=f["key"].astype(np.float16)), "key has type float16"),
    (lambda f: f.update(key_padding_mask=np.ones((1, 64), np.float32)),
     "key_padding_mask must be bool, int32 or int64"),
])
def test_bad_optional_inputs(tamper, needle):
    attrs = AsaAttributes()
    feeds = _feeds(np.random.default_rng(0), 1, 2, 1, 64, 64, 16,
                   mask=np.int64, bias=(1, 1, 1, 64), thresholds=[1.0, 1.0])
    tamper(feeds)
    _run_expect_error(one_node_model(attrs, feeds, with_function=False), feeds, needle)


@pytest.mark.parametrize("tamper,needle", [
    (lambda f: f.update(gate_q_weight=np.ones((2, 16, 8, 1), np.float32)),
     "gate_q_weight must have shape [Hq, D, Dg] = [2, 16, Dg >= 1], got [2, 16, 8, 1]"),
    (lambda f: f.update(gate_q_weight=np.ones((3, 16, 8), np.float32)),
     "gate_q_weight must have shape [Hq, D, Dg] = [2, 16, Dg >= 1], got [3, 16, 8]"),
    (lambda f: f.update(gate_k_weight=np.ones((1, 16, 8), np.float32)),
     "gate_k_weight must have shape [Hkv, 3*D, Dg] = [1, 48, 8] (Dg from gate_q_weight), "
     "got [1, 16, 8]"),
    (lambda f: f.update(gate_k_weight=np.ones((1, 48, 5), np.float32)),
     "gate_k_weight must have shape [Hkv, 3*D, Dg] = [1, 48, 8]"),
    (lambda f: f.update(gate_q_weight=np.ones((2, 16, 0), np.float32)),
     "gate_q_weight must have shape [Hq, D, Dg] = [2, 16, Dg >= 1], got [2, 16, 0]"),
    (lambda f: f.pop("gate_k_weight"),
     "needs both gate_q_weight (input 6) and gate_k_weight (input 7); got only gate_q_weight"),
    (lambda f: f.pop("gate_q_weight"),
     "needs both gate_q_weight (input 6) and gate_k_weight (input 7); got only gate_k_weight"),
])
def test_bad_gate_inputs(tamper, needle):
    """Gate weights that break SPEC inputs 6-7: an ORT error that says which and why."""
    feeds = _feeds(np.random.default_rng(0), 1, 2, 1, 64, 64, 16, gate_dim=8)
    tamper(feeds)
    # A plain node: the function builder itself refuses a lone gate weight.
    inputs = [name if name in feeds else "" for name in INPUTS]
    node = helper.make_node("AdaptiveSparseAttention", inputs, list(OUTPUTS), domain="asa",
                            threshold=0.5)
    _run_expect_error(one_node_model(AsaAttributes(), feeds, with_function=False, node=node),
                      feeds, needle)


def test_gate_weights_must_be_float32():
    """The gate is float32 whatever the attention dtype: float16 weights are rejected by the
    op's declared input type, before the kernel runs."""
    feeds = _feeds(np.random.default_rng(0), 1, 2, 1, 64, 64, 16, gate_dim=8)
    feeds["gate_q_weight"] = feeds["gate_q_weight"].astype(np.float16)
    with pytest.raises(Exception, match=r"tensor\(float16\).*gate_q_weight"):
        lib_session(one_node_model(AsaAttributes(), feeds, with_function=False)).run(None, feeds)


def test_gate_with_float16_attention():
    """float16 query/key/value with float32 gate weights: the router pools in float32 and picks
    the reference's blocks on the same rounded inputs."""
    attrs = AsaAttributes(causal=True, threshold=0.6)
    feeds = _feeds(np.random.default_rng(5), 1, 4, 2, 200, 200, 32, dtype=np.float16,
                   gate_dim=16)
    lib = lib_session(one_node_model(attrs, feeds, with_function=False)).run(None, feeds)
    expect = _reference(attrs, {n: (a.astype(np.float32) if a.dtype == np.float16 else a)
                                for n, a in feeds.items()})
    same = (lib[1] == expect[1]).all(axis=-1) & (lib[2] == expect[2])
    assert same.mean() >= 0.98
    assert ref.density(lib[2], lib[3], lib[2].shape[1]) < 1.0


# ---------------------------------------------------------------- fixture models

FIXTURES = [
    # (family, exporter, attn, kv_cache, past)
    ("llama", "dynamo", "sdpa", True, 37),
    ("gpt2", "torchscript", "eager", True, 0),
    ("llama", "dynamo23", "eager", False, 0),
]


@pytest.mark.parametrize("fixture", FIXTURES, ids=["-".join(map(str, f[:4])) for f in FIXTURES])
def test_fixture_models_library_matches_function(fixture, tmp_path):
    """Exported fixture models, rewritten: every output (logits, present KV) of the library run
    equals the function-body run on rows with a visible key."""
    pytest.importorskip("torch")
    import graphs

    from asa_export import api
    from asa_export.passes.pipeline import RewriteOptions

    family, exporter, attn, kv_cache, past = fixture
    original = graphs.export(family, exporter, attn=attn, kv_cache=kv_cache)
    rewritten = tmp_path / "model.asa.onnx"
    api.export(original, rewritten, RewriteOptions(threshold=0.9))
    ops = [n.op_type for n in onnx.load(str(rewritten), load_external_data=False).graph.node]
    assert ops.count("AdaptiveSparseAttention") >= 2, "the fixture should be rewritten"
    feeds = graphs.sample_inputs(family, original, batch=2, seq=150, past=past)
    rows = graphs.rows_to_compare(family, feeds)
    lib_sess = lib_session(str(rewritten))
    lib = lib_sess.run(None, feeds)
    fn = function_session(str(rewritten)).run(None, feeds)
    names = [o.name for o in lib_sess.get_outputs()]
    for name, a, b in zip(names, lib, fn):
        if a.ndim >= 3 and a.shape[:2] == rows.shape:  # logits [B, S, V]
            np.testing.assert_allclose(a[rows], b[rows], rtol=1e-3, atol=1e-3, err_msg=name)
        else:  # present KV: not attention outputs, equal up to float rounding
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_profile_env_reports_adapter_and_core_phases(monkeypatch, capfd):
    """ASA_CPU_PROFILE=1: one line from the adapter (validation + output allocation vs the core
    call) and one from the core per node run; nothing without it."""
    feeds = _feeds(np.random.default_rng(4), 1, 4, 2, 200, 200, 32)
    attrs = AsaAttributes(causal=True, threshold=0.6)
    sess = lib_session(one_node_model(attrs, feeds))
    monkeypatch.delenv("ASA_CPU_PROFILE", raising=False)
    sess.run(None, feeds)
    assert "profile" not in capfd.readouterr().err
    monkeypatch.setenv("ASA_CPU_PROFILE", "1")
    sess.run(None, feeds)
    err = capfd.readouterr().err
    assert "asa_ort profile prepare=" in err and "compute=" in err, err
    assert "asa_cpu profile" in err and "attend=" in err, err
