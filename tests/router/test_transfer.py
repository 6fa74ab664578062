"""asa_export.router.transfer: a calibrated router (attributes, head_thresholds, gate weights)
carried from a rewritten no-KV export onto the rewritten KV-cache export of the same network;
checked on the tiny llama exports (2 sites, Hq 8, Hkv 2, D 16)."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from asa_export.errors import AsaExportError

onnx_ir = pytest.importorskip("onnx_ir")


def _rewritten(kv: bool, **options):
    import graphs
    from asa_export.passes.pipeline import RewriteOptions, rewrite_model

    model = onnx_ir.load(str(graphs.export("llama", "dynamo23", attn="sdpa", kv_cache=kv)))
    rewrite_model(model, RewriteOptions(**options))
    return model


def _calibrated(gate: bool):
    """A stand-in for `asa-export calibrate` output: tau 0.9 sink 1 local 1 attributes, seeded
    per-head thresholds on both sites, a seeded gate on site 1 when `gate`."""
    from asa_export.passes import rewrite

    model = _rewritten(False, threshold=0.9, sink_blocks=1, local_blocks=1)
    rng = np.random.default_rng(3)
    for i, node in enumerate(rewrite.asa_nodes(model)):
        taus = rng.uniform(0.5, 0.9, size=8).astype(np.float32)
        g = None
        if gate and i == 1:
            g = types.SimpleNamespace(q_weight=rng.normal(size=(8, 16, 4)).astype(np.float32),
                                      k_weight=rng.normal(size=(2, 48, 4)).astype(np.float32))
        rewrite.set_router_inputs(model, node, head_thresholds=taus, gate=g)
    rewrite.refresh_functions(model)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(calibrated-with-gate path, its KV counterpart with the router transferred, path)."""
    from asa_export import io
    from asa_export.router import transfer

    folder = tmp_path_factory.mktemp("transfer")
    source = folder / "cal.onnx"
    io.save_model(_calibrated(gate=True), source)
    kv = _rewritten(True)  # default options (tau 0.98, local 2): all must be overwritten
    transfer.transfer_routers(source, kv)
    target = folder / "kv.onnx"
    io.save_model(kv, target)
    return source, target


def _inputs(node):
    return [v.name if v is not None else None for v in node.inputs]


def test_attributes_thresholds_and_gate_are_carried_per_site(saved):
    from asa_export.passes import rewrite
    from asa_export.router import transfer

    source, target = saved
    want = transfer.read_routers(onnx_ir.load(str(source)))
    got = transfer.read_routers(onnx_ir.load(str(target)))
    assert [r.name for r in got] == ["asa_attention_0", "asa_attention_1"]
    for w, g in zip(want, got):
        for field in transfer.ROUTER_ATTRIBUTES:
            assert getattr(g.attributes, field) == getattr(w.attributes, field)
        np.testing.assert_array_equal(g.head_thresholds, w.head_thresholds)
    assert got[0].gate_q_weight is None and got[0].gate_k_weight is None
    np.testing.assert_array_equal(got[1].gate_q_weight, want[1].gate_q_weight)
    np.testing.assert_array_equal(got[1].gate_k_weight, want[1].gate_k_weight)
    nodes = rewrite.asa_nodes(onnx_ir.load(str(target)))
    assert nodes[0].overload != nodes[1].overload  # site 1's function has the gate inputs


def _kv_prefill_logits(path, ids):
    from asa_export.runtime.ort import session

    sess = session(str(path), library=None)
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(["logits"], feeds)[0][0]


def _full_logits(path, ids):
    from asa_export.runtime.ort import session

    sess = session(str(path), library=None)
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    return sess.run(["logits"], feeds)[0][0]


def test_kv_prefill_routes_exactly_like_the_calibrated_model(saved, tmp_path):
    from asa_export import io

    source, target = saved
    ids = np.random.default_rng(5).integers(0, 256, size=320).astype(np.int64)  # 5 blocks of 64
    expect = _full_logits(source, ids)
    np.testing.assert_allclose(_kv_prefill_logits(target, ids), expect, atol=2e-4)
    # Not vacuous: the default-option KV rewrite (no transfer) routes differently.
    untouched = tmp_path / "kv_default.onnx"
    io.save_model(_rewritten(True), untouched)
    assert np.abs(_kv_prefill_logits(untouched, ids) - expect).max() > 1e-2


def test_router_absent_in_the_source_is_removed_from_the_target():
    from asa_export.passes import rewrite
    from asa_export.router import transfer

    plain = transfer.read_routers(_rewritten(False, threshold=0.95))
    kv = _rewritten(True)
    transfer.apply_routers(kv, transfer.read_routers(_calibrated(gate=True)))
    transfer.apply_routers(kv, plain)
    for node in rewrite.asa_nodes(kv):
        assert len(node.inputs) <= 5 and node.attributes["threshold"].value == pytest.approx(0.95)
    assert not [n for n in kv.graph.initializers if "head_thresholds" in n or "gate_" in n]


@pytest.mark.parametrize("change, match", [
    (lambda rs: rs[:1], "has 1 ASA sites, this model 2"),
    (lambda rs: [dataclasses.replace(rs[0], name="other"), rs[1]], "site names differ"),
    (lambda rs: [rs[0], dataclasses.replace(rs[1], attributes=dataclasses.replace(
        rs[1].attributes, block_size=128))], "attribute block_size is 64 here but 128"),
    (lambda rs: [dataclasses.replace(rs[0], heads=(4, 2, 16)), rs[1]], "query heads 8 here but 4"),
])
def test_sites_that_do_not_correspond_are_refused(change, match):
    from asa_export.router import transfer

    routers = transfer.read_routers(_calibrated(gate=False))
    with pytest.raises(AsaExportError, match=match):
        transfer.apply_routers(_rewritten(True), change(routers))


def test_model_without_asa_nodes_is_refused():
    import graphs
    from asa_export.router import transfer

    plain = onnx_ir.load(str(graphs.export("llama", "dynamo23", attn="sdpa", kv_cache=False)))
    with pytest.raises(AsaExportError, match="no AdaptiveSparseAttention node"):
        transfer.read_routers(plain)
