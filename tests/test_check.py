"""asa_export.check: Polygraphy parity on visible rows, error statistics, density per layer."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from asa_export import check as check_module
from asa_export.check import check
from asa_export.contract import AsaAttributes
from asa_export.contract import reference
from asa_export.contract.function import build_function, make_node
from asa_export.errors import AsaExportError
from cli.helpers import mlp_model

HEADS, DIM, SEQ = 2, 16, 200


def asa_model(path, threshold: float, garbage_in_invisible_rows: bool = False) -> str:
    """q, k, v [B, 2, S, 16] + attention_mask [B, S] -> one causal ASA node.

    With `garbage_in_invisible_rows`, rows without a visible key (left padding, no past) get 7
    added: they differ from the plain node only where the contract lets outputs differ.
    """
    attrs = AsaAttributes(causal=True, threshold=threshold)
    f32 = TensorProto.FLOAT
    out = "asa_out" if garbage_in_invisible_rows else "out"
    nodes = [make_node(["q", "k", "v", "attention_mask"], [out], attrs, "asa0")]
    if garbage_in_invisible_rows:
        nodes += [
            helper.make_node("CumSum", ["attention_mask", "one"], ["seen"]),
            helper.make_node("Greater", ["seen", "zero"], ["visible"]),
            helper.make_node("Not", ["visible"], ["invisible"]),
            helper.make_node("Cast", ["invisible"], ["inv_f"], to=f32),
            helper.make_node("Unsqueeze", ["inv_f", "axes"], ["inv_u"]),
            helper.make_node("Mul", ["inv_u", "seven"], ["garbage"]),
            helper.make_node("Add", [out, "garbage"], ["out"]),
        ]
    inits = [
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 3]),
        helper.make_tensor("seven", f32, [], [7.0]),
    ] if garbage_in_invisible_rows else []
    graph = helper.make_graph(
        nodes, "asa",
        [helper.make_tensor_value_info(n, f32, ["B", HEADS, "S", DIM]) for n in "qkv"]
        + [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("out", f32, ["B", HEADS, "S", DIM])], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("asa", 1)],
        functions=[build_function(attrs, 18, (True, False, False), 1)], ir_version=10)
    onnx.save(model, path)
    return str(path)


def asa_feeds(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((2, SEQ), np.int64)
    mask[1, :70] = 0  # left padding: rows 0..69 of batch 1 see no key
    feed = {n: rng.standard_normal((2, HEADS, SEQ, DIM)).astype(np.float32) for n in "qkv"}
    feed["attention_mask"] = mask
    return [feed]


def test_identical_models_pass(tmp_path):
    a, b = mlp_model(tmp_path / "a.onnx"), mlp_model(tmp_path / "b.onnx")
    result = check(a, b)
    assert result.passed
    assert [o.name for o in result.outputs] == ["out"]
    assert result.outputs[0].max_abs == 0.0 and result.outputs[0].compared > 0
    assert len(result.iterations) == len(check_module.DEFAULT_ITERATIONS)
    assert result.density == [] and "no AdaptiveSparseAttention" in result.density_error


def test_perturbed_model_fails_and_tolerance_decides(tmp_path):
    a = mlp_model(tmp_path / "a.onnx")
    b = mlp_model(tmp_path / "b.onnx", scale=1.01)
    result = check(a, b)
    assert not result.passed
    stats = result.outputs[0]
    assert not stats.passed and stats.max_abs > 1e-4 and stats.max_rel > 1e-3
    assert 0.009 < stats.max_rel < 0.011  # weights scaled by 1.01: Relu(1.01 x W) = 1.01 Relu(x W)
    assert check(a, b, atol=10.0).passed
    assert check(a, b, rtol=0.02).passed


def test_fixed_sizes(tmp_path):
    a = mlp_model(tmp_path / "a.onnx")
    result = check(a, a, batch=3, seq=11)
    assert {(c["batch"], c["seq"]) for c in result.iterations} == {(3, 11)}
    assert result.passed


@pytest.mark.parametrize("library", [False, None], ids=["function", "library-when-built"])
def test_rows_without_visible_key_are_not_judged(tmp_path, library):
    original = asa_model(tmp_path / "orig.onnx", 1.0, garbage_in_invisible_rows=True)
    rewritten = asa_model(tmp_path / "new.onnx", 1.0)
    result = check(original, rewritten, feeds=asa_feeds(), library=library)
    assert result.passed, result.outputs
    stats = result.outputs[0]
    assert stats.skipped == 70 * HEADS * DIM
    assert stats.compared == (2 * SEQ - 70) * HEADS * DIM


def test_sparse_rewrite_fails_parity_and_reports_reference_density(tmp_path):
    original = asa_model(tmp_path / "orig.onnx", 1.0)
    rewritten = asa_model(tmp_path / "new.onnx", 0.5)
    feeds = asa_feeds()
    result = check(original, rewritten, feeds=feeds, library=False)
    assert not result.passed
    assert len(result.density) == 1 and result.density[0].node == "asa0"
    feed = feeds[0]
    _, _, counts, visible = reference.asa_attention(
        feed["q"], feed["k"], feed["v"], AsaAttributes(causal=True, threshold=0.5),
        key_padding_mask=feed["attention_mask"])
    expected = reference.density(counts, visible, HEADS)
    assert result.density[0].density == pytest.approx(expected)
    assert expected < 1.0
    dense = check(original, asa_model(tmp_path / "dense.onnx", 1.0), feeds=feeds, library=False)
    assert dense.passed and dense.density[0].density == 1.0
    assert dense.overall_density == 1.0


def test_models_with_different_inputs_are_refused(tmp_path):
    a = mlp_model(tmp_path / "a.onnx")
    b = asa_model(tmp_path / "b.onnx", 1.0)
    with pytest.raises(AsaExportError, match="different inputs"):
        check(a, b)


@pytest.mark.parametrize("causal, window, past, expected", [
    # mask [0, 0, 1, 1, 1] (left padding), 3 query rows
    (True, -1, 2, [[True, True, True]]),
    (True, -1, 0, [[False, False, True]]),
    (False, -1, 0, [[True, True, True]]),
    (True, 1, 2, [[True, True, True]]),
])
def test_visible_rows(causal, window, past, expected):
    mask = np.array([[0, 0, 1, 1, 1]]) if past else np.array([[0, 0, 1]])
    rows = check_module._visible_rows(
        mask != 0, {"seq": 3, "past": past},
        {"causal": causal, "window": window})
    np.testing.assert_array_equal(rows, np.array(expected))


def test_element_mask_finds_the_sequence_axis():
    rows = np.array([[False, True, True]])
    logits = check_module._element_mask((1, 3, 10), rows, {"past": 0})
    assert logits.shape == (1, 3, 10) and not logits[0, 0].any() and logits[0, 1:].all()
    # present key cache [B, H, past + seq, D]: past positions are inputs, always compared.
    present = check_module._element_mask((1, 4, 5, 8), rows, {"past": 2})
    np.testing.assert_array_equal(present[0, 0, :, 0], [True, True, False, True, True])


def test_kv_cache_models_get_a_past_iteration(tmp_path):
    from asa_export import io

    mlp = io.load_model(mlp_model(tmp_path / "a.onnx"))
    assert all(c["past"] == 0 for c in check_module.iteration_configs(mlp))
    # Rank-4 float inputs are what a KV cache looks like to the feed generator.
    cached = io.load_model(asa_model(tmp_path / "b.onnx", 1.0))
    configs = check_module.iteration_configs(cached)
    assert any(c["past"] > 0 for c in configs)
    assert {c["past"] for c in check_module.iteration_configs(cached, past=5)} == {5}


def test_models_with_different_outputs_are_refused(tmp_path):
    a = mlp_model(tmp_path / "a.onnx")
    proto = onnx.load(a)
    proto.graph.output[0].name = "renamed"
    proto.graph.node[-1].output[0] = "renamed"
    onnx.save(proto, tmp_path / "b.onnx")
    with pytest.raises(AsaExportError, match="different outputs"):
        check(a, tmp_path / "b.onnx")


def _result(errors, passed, floor):
    outputs = [check_module.OutputStats(f"o{i}", max_abs=e, passed=p)
               for i, (e, p) in enumerate(zip(errors, passed))]
    result = check_module.CheckResult(passed=False, atol=1e-4, rtol=1e-3, outputs=outputs,
                                      elementwise_passed=all(passed), noise_floor=floor)
    check_module._decide(result)
    return result


@pytest.mark.parametrize("errors, passed, floor, verdict, rule", [
    ([1e-5, 2e-5], [True, True], 1e-4, True, check_module.RULE_ELEMENTWISE),
    ([1e-5, 2.9e-4], [True, False], 1e-4, True, check_module.RULE_NOISE),
    ([1e-5, 3.1e-4], [True, False], 1e-4, False, ""),
    ([1e-5, 2e-4], [True, False], None, False, ""),  # noise not measured: element-wise only
    ([1e-5, 2e-4], [True, False], 0.0, False, ""),
    ([0.0, float("inf")], [True, False], 1e-4, False, ""),  # shape mismatch: never excused
])
def test_verdict_rule(errors, passed, floor, verdict, rule):
    result = _result(errors, passed, floor)
    assert (result.passed, result.rule) == (verdict, rule)


def test_noise_floor_is_the_unoptimized_originals_difference(tmp_path):
    """The third runner is the original with ORT graph optimizations off, on the same rows."""
    original = asa_model(tmp_path / "orig.onnx", 1.0, garbage_in_invisible_rows=True)
    rewritten = asa_model(tmp_path / "new.onnx", 1.0)
    result = check(original, rewritten, feeds=asa_feeds(), library=False, density=False)
    assert result.noise_floor is not None and result.noise_floor < 1e-5  # rows with garbage skipped
    assert result.outputs[0].noise_abs == result.noise_floor
    assert result.passed and result.rule == check_module.RULE_ELEMENTWISE
    off = check(original, rewritten, feeds=asa_feeds(), library=False, density=False, noise=False)
    assert off.noise_floor is None and off.outputs[0].noise_abs is None and off.passed


def test_engine_profile_spans_the_feeds():
    """The engine check builds covers every generated input set (min and max per axis)."""
    feeds = [{"x": np.zeros((2, 37, 16)), "m": np.zeros((2, 37))},
             {"x": np.zeros((1, 150, 16)), "m": np.zeros((1, 150))}]
    low, high = check_module._shape_range(feeds)
    assert low == {"x": (1, 37, 16), "m": (1, 37)}
    assert high == {"x": (2, 150, 16), "m": (2, 150)}


def test_engine_runner_is_skipped_without_tensorrt(tmp_path):
    pytest.importorskip("polygraphy")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: the runner is built")
    a, b = mlp_model(tmp_path / "a.onnx"), mlp_model(tmp_path / "b.onnx")
    result = check(a, b, density=False, batch=1, seq=5)
    assert result.engine_outputs == []
    assert result.runner_notes[0].startswith("TensorRT not installed: engine runner skipped")
    assert check(a, b, density=False, batch=1, seq=5, tensorrt=False).runner_notes == []
    with pytest.raises(AsaExportError, match="needs tensorrt"):
        check(a, b, engine=tmp_path / "e.plan")
