"""Model-level parity: every exported family / exporter variant, rewritten at tau = 1, computes
what the original computes (SPEC.md "Parity": rows with at least one visible key), and every
attention layer is found."""

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


def _session(model_bytes_or_path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])


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
    names = [o.name for o in original.get_outputs()]
    for plan in _plans(kv):
        feeds = graphs.sample_inputs(family, path, **plan)
        expected, actual = original.run(names, feeds), new.run(names, feeds)
        rows = graphs.rows_to_compare(family, feeds)
        for name, e, a in zip(names, expected, actual):
            if name.startswith("present"):  # KV cache outputs: every position is defined
                np.testing.assert_allclose(a, e, atol=ATOL, rtol=RTOL, err_msg=name)
            else:  # [B, S, ...]: judge rows with a visible key
                np.testing.assert_allclose(a[rows], e[rows], atol=ATOL, rtol=RTOL, err_msg=name)
