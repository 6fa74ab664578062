"""asa_export.runtime.ort: finding the library, the function-body fallback, Polygraphy."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from asa_export.contract import AsaAttributes
from asa_export.contract import reference as ref
from asa_export.contract.function import build_function, make_node
from asa_export.errors import AsaExportError
from asa_export.runtime import ort as asa_ort

pytest.importorskip("onnxruntime")
BUILT = asa_ort.library_path()
needs_library = pytest.mark.skipif(BUILT is None or not BUILT.is_file(),
                                   reason="libasa_ort.so not built: run tools/build_plugins.py")

ATTRS = AsaAttributes(causal=True, threshold=0.6, sink_blocks=0, local_blocks=0)
SHAPE = (1, 4, 2, 150, 16)  # B, Hq, Hkv, S, D


def _model() -> onnx.ModelProto:
    b_, hq, hkv, s, d = SHAPE
    node = make_node(["query", "key", "value"], ["output", "block_indices"], ATTRS, "asa_0")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("query", TensorProto.FLOAT, [b_, hq, s, d]),
         helper.make_tensor_value_info("key", TensorProto.FLOAT, [b_, hkv, s, d]),
         helper.make_tensor_value_info("value", TensorProto.FLOAT, [b_, hkv, s, d])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("block_indices", TensorProto.INT32, None)])
    return helper.make_model(graph, ir_version=10,
                             functions=[build_function(ATTRS, 18, (False, False, False), 2)],
                             opset_imports=[helper.make_opsetid("", 18),
                                            helper.make_opsetid("asa", 1)])


def _feeds():
    b_, hq, hkv, s, d = SHAPE
    rng = np.random.default_rng(0)
    return {"query": rng.standard_normal((b_, hq, s, d)).astype(np.float32),
            "key": rng.standard_normal((b_, hkv, s, d)).astype(np.float32),
            "value": rng.standard_normal((b_, hkv, s, d)).astype(np.float32)}


def _check(outputs, feeds):
    out, idx = outputs[:2]
    r_out, r_idx, _, _ = ref.asa_attention(feeds["query"], feeds["key"], feeds["value"], ATTRS)
    same = (idx == r_idx).all(axis=-1)
    assert same.mean() >= 0.98
    rows = np.repeat(same, ATTRS.block_size, axis=2)[:, :, : SHAPE[3]]
    np.testing.assert_allclose(out[rows], r_out[rows], rtol=1e-4, atol=3e-5)


@pytest.fixture
def no_library(monkeypatch, tmp_path):
    """As if the library had never been built."""
    monkeypatch.delenv(asa_ort.ENV_VAR, raising=False)
    monkeypatch.setattr(asa_ort, "_DEFAULT_LOCATIONS", (tmp_path / "absent.so",))
    monkeypatch.setattr(asa_ort, "_warned", set())


def test_env_var_wins(monkeypatch, tmp_path):
    lib = tmp_path / "libasa_ort.so"
    monkeypatch.setenv(asa_ort.ENV_VAR, str(lib))
    assert asa_ort.library_path() == lib


def test_missing_library_falls_back_with_one_warning(no_library):
    assert asa_ort.library_path() is None
    model, feeds = _model().SerializeToString(), _feeds()
    with pytest.warns(RuntimeWarning, match="model-local function"):
        sess = asa_ort.session(model)
    _check(sess.run(None, feeds), feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asa_ort.session(model)  # warned once already


def test_required_library_missing_is_an_error(no_library):
    with pytest.raises(AsaExportError, match="build_plugins.py"):
        asa_ort.session(_model().SerializeToString(), library=True)


def test_explicit_missing_path_is_an_error(tmp_path):
    with pytest.raises(AsaExportError, match="does not exist"):
        asa_ort.session(_model().SerializeToString(), library=tmp_path / "nope.so")


def test_env_var_to_missing_file_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(asa_ort.ENV_VAR, str(tmp_path / "nope.so"))
    with pytest.raises(AsaExportError, match="ASA_ORT_LIB"):
        asa_ort.session(_model().SerializeToString())


@needs_library
def test_session_from_path_with_library(tmp_path):
    path = tmp_path / "m.asa.onnx"
    onnx.save(_model(), path)
    opts, registered = asa_ort.session_options()
    assert registered == BUILT
    feeds = _feeds()
    _check(asa_ort.session(path).run(None, feeds), feeds)
    _check(asa_ort.session(str(path), sess_options=opts).run(None, feeds), feeds)


@needs_library
def test_polygraphy_onnxrt_runner(tmp_path):
    from polygraphy.backend.onnxrt import OnnxrtRunner

    path = tmp_path / "m.asa.onnx"
    onnx.save(_model(), path)
    feeds = _feeds()
    with OnnxrtRunner(functools.partial(asa_ort.session, str(path))) as runner:
        outputs = runner.infer(feeds)
    _check([outputs["output"], outputs["block_indices"]], feeds)


@needs_library
@pytest.mark.parametrize("threshold", [1.0, 0.9])
def test_rewritten_demo_model_library_matches_function(tmp_path, threshold):
    """The demo Llama export, rewritten: the library and the function body agree on the
    logits, and at tau = 1 both equal the original model."""
    pytest.importorskip("torch")
    import graphs
    import onnxruntime as ort

    from asa_export import api
    from asa_export.passes.pipeline import RewriteOptions

    original = graphs.default_model(graphs.default_cache_dir() / "demo")
    rewritten = tmp_path / "demo.asa.onnx"
    api.export(original, rewritten, RewriteOptions(threshold=threshold))
    seq, rng = 300, np.random.default_rng(0)
    mask = np.ones((2, seq), np.int64)
    mask[1, :37] = 0  # left padding in the second row
    feeds = {"input_ids": rng.integers(0, 512, (2, seq)).astype(np.int64),
             "attention_mask": mask,
             "position_ids": np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)}
    lib = asa_ort.session(rewritten, library=BUILT).run(None, feeds)[0]
    fn = asa_ort.session(rewritten, library=False).run(None, feeds)[0]
    rows = mask.astype(bool)  # rows with a visible key (left padding rows differ by design)
    np.testing.assert_allclose(lib[rows], fn[rows], rtol=1e-3, atol=1e-3)
    if threshold >= 1.0:
        base = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(lib[rows], base.run(None, feeds)[0][rows], rtol=1e-3, atol=1e-3)
