"""softmax_attention rule: tiny inline graphs, positive (rewrite + parity) and negative (reason)."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from asa_export.contract import OP_TYPE, AsaAttributes
from asa_export.contract import reference
from asa_export.passes.pipeline import RewriteOptions, find_sites, rewrite_model
from tests.passes import attention_graphs as ag


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(["out"], {k: v for k, v in feeds.items() if k in names})[0]


def _rewrite(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, object]:
    ir_model = ir.serde.deserialize_model(model)
    report = rewrite_model(ir_model, RewriteOptions(**options))
    out = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(out, full_check=True)
    return out, report


def _valid_rows(feeds, out_shape, causal):
    """Rows with at least one visible key (the contract's parity domain)."""
    batch, _, seq, _ = out_shape
    vis = np.ones((batch, seq, seq), dtype=bool)
    if causal:
        vis &= np.tril(np.ones((seq, seq), dtype=bool))
    if "attention_mask" in feeds:
        vis &= feeds["attention_mask"].astype(bool)[:, None, :]
    return vis.any(-1)  # [B, S]


CASES = {
    "causal+padding/add": dict(mask="causal+padding"),
    "causal/where": dict(mask="causal", form="where"),
    "padding (bidirectional)": dict(mask="padding"),
    "none, MHA": dict(mask="none", hq=2, hkv=2),
    "sliding window": dict(mask="causal", window=40),
    "softcap, scale on q and k": dict(mask="causal+padding", softcap=30.0, scale_on="qk"),
}


@pytest.mark.parametrize("case", CASES)
def test_rewrite_at_tau_1_matches_original(case):
    kwargs = CASES[case]
    model = ag.build(**kwargs)
    rewritten, report = _rewrite(model, threshold=1.0)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count(OP_TYPE) == 1 and "Softmax" not in ops
    assert [s.rule for s in report.sites] == ["softmax_attention"]
    site = report.sites[0]
    assert site.q_heads == kwargs.get("hq", 4) and site.kv_heads == kwargs.get("hkv", 2)
    assert site.causal == ("causal" in kwargs["mask"])
    assert site.window == kwargs.get("window", -1)
    assert site.softcap == pytest.approx(kwargs.get("softcap", 0.0))
    feeds = ag.feeds(model, hq=kwargs.get("hq", 4), hkv=kwargs.get("hkv", 2))
    expected, actual = _run(model, feeds), _run(rewritten, feeds)
    rows = _valid_rows(feeds, expected.shape, site.causal)
    np.testing.assert_allclose(
        actual.transpose(0, 2, 1, 3)[rows], expected.transpose(0, 2, 1, 3)[rows],
        atol=1e-4, rtol=1e-3,
    )


def test_rewrite_below_tau_1_follows_the_reference():
    model = ag.build(mask="causal+padding", window=-1)
    rewritten, report = _rewrite(model, threshold=0.6, sink_blocks=1, local_blocks=1)
    feeds = ag.feeds(model, seq=300)
    actual = _run(rewritten, feeds)
    attrs = AsaAttributes(scale=report.sites[0].scale, causal=True, block_size=64, threshold=0.6)
    expected = reference.asa_attention(
        feeds["q"], feeds["k"], feeds["v"], attrs, key_padding_mask=feeds["attention_mask"]
    )[0]
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)
    dense = _run(model, feeds)
    assert np.abs(actual - dense).max() > 1e-3  # sparsity really changed something


REJECTIONS = {
    "probabilities are a model output": (dict(probs_output=True), "probabilities are a model output"),
    "softmax over another axis": (dict(softmax_axis=2), "last axis"),
    "bias that is a model input": (dict(extra_bias=True, mask="none"), "model input"),
    "ALiBi-like distance bias in the mask": (dict(form="alibi", mask="causal"), "carries a bias"),
}


@pytest.mark.parametrize("case", REJECTIONS)
def test_unexpressible_sites_are_left_unchanged_with_a_reason(case):
    kwargs, reason = REJECTIONS[case]
    model = ag.build(**kwargs)
    report = find_sites(ir.serde.deserialize_model(model))
    assert report.sites == []
    assert len(report.rejected) == 1 and reason in report.rejected[0].reason
    rewritten, _ = _rewrite(model)
    assert [n.op_type for n in rewritten.graph.node] == [n.op_type for n in model.graph.node]
