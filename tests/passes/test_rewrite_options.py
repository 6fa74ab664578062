"""RewriteOptions.head_thresholds / gates: calibrated router weights as ASA inputs 5-7."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from asa_export import contract
from asa_export.contract import AsaAttributes, reference
from asa_export.errors import AsaExportError
from asa_export.passes import rewrite
from asa_export.passes.pipeline import RewriteOptions, rewrite_model
from asa_export.runtime.ort import session
from tests.passes.attention_graphs import build, feeds

HQ, HKV, D, SEQ = 4, 2, 16, 150


def _rewritten(options: RewriteOptions):
    model = ir.serde.deserialize_model(build(hq=HQ, hkv=HKV, d=D, mask="causal"))
    report = rewrite_model(model, options)
    return report, ir.serde.serialize_model(model)


def _run(proto: onnx.ModelProto, inputs: dict) -> np.ndarray:
    sess = session(proto.SerializeToString(), library=False)  # the model-local function
    return sess.run(None, inputs)[0]


def _inputs():
    return {k: v[:1] for k, v in feeds(build(hq=HQ, hkv=HKV, d=D, mask="causal"), batch=1,
                                       seq=SEQ, hq=HQ, hkv=HKV, d=D).items()}


def _asa_node(proto):
    return next(n for n in proto.graph.node if n.op_type == contract.OP_TYPE)


def test_head_thresholds_become_input_5_and_replace_the_attribute():
    taus = [1.0, 0.3, 0.6, 1.0]
    opts = RewriteOptions(threshold=0.5, block_size=64, sink_blocks=0, local_blocks=1,
                          head_thresholds={0: taus})
    report, proto = _rewritten(opts)
    node = _asa_node(proto)
    slot = contract.INPUTS.index("head_thresholds")
    assert node.input[slot] == "asa_attention_0/head_thresholds"
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(init[node.input[slot]], np.float32(taus))
    # The node's function reads the input: its output is the reference's with these taus.
    x = _inputs()
    attrs = AsaAttributes(causal=True, threshold=0.5, sink_blocks=0, local_blocks=1)
    want = reference.asa_attention(x["q"], x["k"], x["v"], attrs,
                                   head_thresholds=np.float32(taus), dtype=np.float32)[0]
    got = _run(proto, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    # ... and differs from the attribute-only selection (tau 0.5 for every head).
    plain = reference.asa_attention(x["q"], x["k"], x["v"], attrs, dtype=np.float32)[0]
    assert np.abs(plain - got).max() > 1e-3
    assert json.dumps(report.to_dict())  # report options stay JSON-ready


class _Gate:
    def __init__(self, q_weight, k_weight):
        self.q_weight, self.k_weight = q_weight, k_weight


@pytest.mark.skipif("gate_q_weight" not in contract.INPUTS, reason="contract without gate inputs")
def test_gates_become_inputs_6_and_7():
    rng = np.random.default_rng(1)
    gate = _Gate(rng.standard_normal((HQ, D, 8)).astype(np.float32),
                 rng.standard_normal((HKV, 3 * D, 8)).astype(np.float32))
    opts = RewriteOptions(threshold=0.7, sink_blocks=0, local_blocks=1, gates={0: gate},
                          head_thresholds={0: [0.7] * HQ})
    report, proto = _rewritten(opts)
    node = _asa_node(proto)
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for name, array in (("gate_q_weight", gate.q_weight), ("gate_k_weight", gate.k_weight)):
        np.testing.assert_array_equal(init[node.input[contract.INPUTS.index(name)]], array)
    x = _inputs()
    attrs = AsaAttributes(causal=True, threshold=0.7, sink_blocks=0, local_blocks=1)
    want = reference.asa_attention(x["q"], x["k"], x["v"], attrs, dtype=np.float32,
                                   gate_q_weight=gate.q_weight, gate_k_weight=gate.k_weight)[0]
    np.testing.assert_allclose(_run(proto, x), want, atol=1e-5, rtol=1e-4)
    assert report.options["gates"] == {0: {"q_weight": [HQ, D, 8], "k_weight": [HKV, 3 * D, 8]}}


def test_set_router_inputs_replaces_old_initializers():
    _, proto = _rewritten(RewriteOptions(head_thresholds={0: [0.9] * HQ}))
    model = ir.serde.deserialize_model(proto)
    node = rewrite.asa_nodes(model)[0]
    rewrite.set_router_inputs(model, node, head_thresholds=[0.8] * HQ)
    rewrite.refresh_functions(model)
    out = ir.serde.serialize_model(model)
    names = [i.name for i in out.graph.initializer if "head_thresholds" in i.name]
    assert names == ["asa_attention_0/head_thresholds"]
    assert numpy_helper.to_array(next(i for i in out.graph.initializer
                                      if i.name == names[0])).tolist() == [pytest.approx(0.8)] * HQ
    assert len(out.functions) == 1


@pytest.mark.parametrize("options, message", [
    (RewriteOptions(head_thresholds={3: [0.9] * HQ}), "site(s) [3]"),
    (RewriteOptions(head_thresholds={0: [0.9] * (HQ + 1)}), "one per query head"),
    (RewriteOptions(head_thresholds={0: [0.9, 0.0, 1.0, 1.0]}), "finite and > 0"),
    (RewriteOptions(gates={0: _Gate(np.zeros((HQ, D, 8), np.float32),
                                    np.zeros((HKV, D, 8), np.float32))}), "gate weights must be"),
])
def test_bad_router_inputs_are_user_errors(options, message):
    with pytest.raises(AsaExportError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        _rewritten(options)
