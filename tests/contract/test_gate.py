"""The learned gate (SPEC "Router (learned gate)", inputs 6-7): reference and function.

The reference's gate logits are checked against a direct float64 transcription of the SPEC
formula; the model-local function is held against the reference in ONNX Runtime (telemetry
exactly, output within float32 error) over GQA, causal / non-causal, padding and select_per.
"""

from __future__ import annotations

import numpy as np
import pytest

from asa_export.contract import GATE_INPUTS, INPUTS, OPTIONAL_INPUTS, AsaAttributes
from asa_export.contract import function as fn
from asa_export.contract import reference as ref
from asa_export.errors import AsaExportError
from tests.contract.test_function import (assert_matches, make_inputs, reference_outputs,
                                          seeded, session)

GATED = (False, False, False, True, True)


def test_contract_names():
    assert len(INPUTS) == 8
    assert GATE_INPUTS == ("gate_q_weight", "gate_k_weight")
    assert set(GATE_INPUTS) <= OPTIONAL_INPUTS


def _spec_logits(q, k, mask, wq, wk, b):
    """SPEC formula, float64, loops over blocks: (q_mean . Wq[h]) . (f_k . Wk[h / G])."""
    batch, hq, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    nq, nk = -(-sq // b), -(-skv // b)
    out = np.zeros((batch, hq, nq, nk))
    for n in range(batch):
        for h in range(hq):
            for i in range(nq):
                qe = q[n, h, i * b:(i + 1) * b].astype(np.float64).mean(0) @ wq[h]
                for kb in range(nk):
                    keys = k[n, h // (hq // hkv), kb * b:(kb + 1) * b].astype(np.float64)
                    kept = keys[mask[n, kb * b:(kb + 1) * b]]
                    if len(kept) == 0:
                        continue
                    feat = np.concatenate([kept.mean(0), kept.max(0), kept.min(0)])
                    out[n, h, i, kb] = qe @ (feat @ wk[h // (hq // hkv)])
    return out


@pytest.mark.parametrize("select_per", [0, 1])
def test_reference_gate_probs_follow_the_spec_formula(select_per):
    rng = seeded("spec", select_per)
    attrs = AsaAttributes(causal=False, select_per=select_per)
    feeds = make_inputs(rng, 2, 6, 2, 97, 161, 16, (True, False, False, True, True))
    feeds["key_padding_mask"][1, 64:128] = False  # a fully padded key block
    q, k, mask = feeds["query"], feeds["key"], feeds["key_padding_mask"]
    probs, visible = ref.router_probs(q, k, attrs, mask, gate_q_weight=feeds["gate_q_weight"],
                                      gate_k_weight=feeds["gate_k_weight"])
    logits = _spec_logits(q, k, mask, feeds["gate_q_weight"], feeds["gate_k_weight"], 64)
    logits = np.where(visible[:, None], logits, -np.inf)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    if select_per == 1:
        expected = expected.reshape(2, 2, 3, *expected.shape[2:]).mean(2)
    np.testing.assert_allclose(probs, expected, rtol=2e-4, atol=1e-6)
    assert not visible[1, :, 1].any()


def test_gate_changes_the_selection():
    """Same q, k: the gate's block lists differ from the training-free router's."""
    attrs = AsaAttributes(causal=True, threshold=0.6)
    feeds = make_inputs(seeded("differs"), 1, 4, 2, 97, 400, 16, GATED)
    gated = reference_outputs(feeds, attrs)
    plain = ref.asa_attention(feeds["query"], feeds["key"], feeds["value"], attrs)
    assert (gated[1] != plain[1]).any()


# (opset, B, Hq, Hkv, Sq, Skv, D, attribute kwargs, present inputs)
CASES = [
    (18, 2, 4, 4, 97, 200, 16, dict(causal=True, threshold=0.6), GATED),
    (18, 2, 6, 2, 97, 161, 16, dict(causal=True, threshold=0.5, select_per=1),
     (True, False, False, True, True)),
    (18, 1, 8, 2, 97, 200, 64, dict(causal=False, threshold=0.7, local_blocks=2),
     (True, True, True, True, True)),
    (17, 2, 4, 1, 130, 70, 16, dict(causal=False, threshold=0.5, sink_blocks=0,
                                    local_blocks=0, select_per=1), GATED),
    (23, 1, 6, 3, 97, 300, 16, dict(causal=True, threshold=0.8, window=150, block_size=128),
     (True, False, True, True, True)),
    (25, 2, 4, 2, 1, 200, 16, dict(causal=True, threshold=0.5, select_per=0),
     (True, False, False, True, True)),
    (18, 1, 4, 2, 97, 161, 16, dict(causal=True, threshold=1.0), GATED),  # dense: gate unused
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_function_with_gate_matches_reference(case):
    opset, batch, hq, hkv, sq, skv, dim, kw, present = case
    attrs = AsaAttributes(**kw)
    feeds = make_inputs(seeded("gate", case), batch, hq, hkv, sq, skv, dim, present)
    if present[0]:
        feeds["key_padding_mask"][-1, 64:128] = False  # a fully padded block: zeros, not inf
    expected = reference_outputs(feeds, attrs)
    got = session(attrs, opset, present).run(None, feeds)
    assert_matches(got, expected)
    if attrs.threshold < 1.0 and not present[2]:
        assert ref.density(expected[2], expected[3], expected[2].shape[1]) < 1.0


def test_gate_dynamic_gate_width_in_one_session():
    attrs = AsaAttributes(causal=True, threshold=0.6)
    sess = session(attrs, 18, GATED)
    for dg, skv in ((1, 200), (32, 161), (5, 65)):
        feeds = make_inputs(seeded("dg", dg), 1, 4, 2, 97, skv, 16, GATED, gate_dim=dg)
        assert_matches(sess.run(None, feeds), reference_outputs(feeds, attrs))


def test_overload_names_encode_the_gate():
    attrs = AsaAttributes(threshold=0.5)
    plain = fn.function_overload(attrs, (True, False, False), 4)
    assert plain == fn.function_overload(attrs, (True, False, False, False, False), 4)
    assert plain.endswith("_m1b0t0_o4")
    gated = fn.function_overload(attrs, (True, False, False, True, True), 4)
    assert gated.endswith("_m1b0t0g1_o4")
    node = fn.make_node(["q", "k", "v", "", "", "", "wq", "wk"], ["o"], attrs, "n")
    assert list(node.input) == ["q", "k", "v", "", "", "", "wq", "wk"]
    assert node.overload == fn.function_overload(attrs, GATED, 1)


def test_one_gate_input_without_the_other_is_rejected():
    attrs = AsaAttributes(threshold=0.5)
    with pytest.raises(AsaExportError, match="come together"):
        fn.build_function(attrs, 18, (False, False, False, True, False), 1)
    with pytest.raises(AsaExportError, match="come together"):
        fn.make_node(["q", "k", "v", "", "", "", "wq"], ["o"], attrs, "n")
    with pytest.raises(AsaExportError, match="5 flags"):
        fn.build_function(attrs, 18, (False, False, False, True), 1)
    feeds = make_inputs(seeded("one"), 1, 4, 2, 64, 128, 16, GATED)
    with pytest.raises(AsaExportError, match="come together"):
        ref.router_probs(feeds["query"], feeds["key"], attrs,
                         gate_q_weight=feeds["gate_q_weight"])


@pytest.mark.parametrize("shapes,match", [
    (((4, 16, 8), (2, 48, 4)), "gate_k_weight"),   # Dg differs
    (((4, 16, 8), (2, 16, 8)), "gate_k_weight"),   # D instead of 3*D
    (((2, 16, 8), (2, 48, 8)), "gate_q_weight"),   # Hkv instead of Hq
    (((4, 8, 8), (2, 24, 8)), "gate_q_weight"),    # wrong D
    (((4, 16), (2, 48, 8)), "gate_q_weight"),      # not 3-D
])
def test_bad_gate_shapes_are_rejected(shapes, match):
    rng = seeded("shapes")
    q = rng.standard_normal((1, 4, 64, 16)).astype(np.float32)
    k = rng.standard_normal((1, 2, 128, 16)).astype(np.float32)
    wq, wk = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    with pytest.raises(AsaExportError, match=match):
        ref.router_probs(q, k, AsaAttributes(threshold=0.5), gate_q_weight=wq, gate_k_weight=wk)
    with pytest.raises(AsaExportError, match=match):
        ref.asa_attention(q, k, k, AsaAttributes(threshold=0.5), gate_q_weight=wq,
                          gate_k_weight=wk)
