"""Model-level parity: every exported family / exporter variant, rewritten at tau = 1, computes
what the original computes (SPEC.md "Parity": rows with at least one visible key), and every
attention layer is found.

The bar is atol 1e-4 / rtol 1e-3 per element. Deep real models (SmolLM2: 30 layers, logits up to
~40) sit at fp32's own reordering noise there: ONNX Runtime with and without graph optimizations
already differs by ~1.4e-4 on the original model. Where the element-wise bar fails, an output
passes only if its largest error is within 3x that noise floor, measured in the same test on the
same feeds over all of the model's outputs (one alternative order samples the noise; the rewrite
reorders every attention layer, hence 3x rather than FlashAttention's 2x).
"""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graphs
from asa_export.contract import OP_TYPE
from asa_export.passes.pipeline import RewriteOptions, rewrite_model

ATOL, RTOL = 1e-4, 1e-3


def _param(variant):
    family, exporter, attn, kv = variant
    marks = [pytest.mark.slow] if variant in graphs.SLOW else []
    return pytest.param(variant, id=f"{family}-{exporter}-{attn}{'-kv' if kv else ''}", marks=marks)


def _session(model_bytes_or_path, optimize=True):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])


def _assert_parity(actual, expected, floor, name):
    """Element-wise bar, or within 3x the fp32 reordering noise of the original itself."""
    if np.allclose(actual, expected, atol=ATOL, rtol=RTOL):
        return
    error = float(np.abs(actual - expected).max())
    assert error <= 3 * floor, (
        f"{name}: max abs error {error:.3g} beyond atol {ATOL} / rtol {RTOL} and beyond 3x the "
        f"original's own reordering noise {floor:.3g}"
    )


def _plans(kv: bool):
    if kv:
        return [dict(batch=2, seq=1, past=130), dict(batch=2, seq=9, past=120)]
    return [dict(batch=2, seq=150), dict(batch=3, seq=70, pad="right")]


@pytest.mark.parametrize("variant", [_param(v) for v in graphs.VARIANTS])
def test_rewritten_model_matches_original(variant):
    family, exporter, attn, kv = variant
    path = graphs.export(family, exporter, attn=attn, kv_cache=kv)
    model = ir.load(path)
    report = rewrite_model(model, RewriteOptions(threshold=1.0))
    spec = graphs.family_spec(family)
    assert len(report.sites) == spec.num_layers, report.rejected
    assert report.rejected == []
    for site in report.sites:
        assert site.causal == spec.causal
        assert site.window == (spec.window or -1)
        assert site.past_kv == kv
        assert site.kv_heads == spec.num_kv_heads
    rewritten = ir.serde.serialize_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert sum(n.op_type == OP_TYPE for n in rewritten.graph.node) == spec.num_layers
    original, new = _session(str(path)), _session(rewritten.SerializeToString())
    reordered = _session(str(path), optimize=False)
    names = [o.name for o in original.get_outputs()]
    for plan in _plans(kv):
        feeds = graphs.sample_inputs(family, path, **plan)
        expected, actual = original.run(names, feeds), new.run(names, feeds)
        noise = reordered.run(names, feeds)
        rows = graphs.rows_to_compare(family, feeds)
        judged = []
        for name, e, a, n in zip(names, expected, actual, noise):
            if not name.startswith("present"):  # [B, S, ...]: judge rows with a visible key
                e, a, n = e[rows], a[rows], n[rows]
            judged.append((name, e, a, n))
        floor = max(float(np.abs(n - e).max()) for _, e, _, n in judged)
        for name, e, a, _ in judged:
            _assert_parity(a, e, floor, name)
