"""Torch research path (asa_export/router/research.py) against the contract reference."""

from __future__ import annotations

import numpy as np
import pytest

from asa_export.contract import AsaAttributes
from asa_export.contract import reference as ref
from asa_export.router import research, stats

torch = pytest.importorskip("torch")

HQ, HKV, S, D, BS = 4, 2, 64 * 4 + 9, 16, 64


class _Module:
    layer_idx = 0


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, HQ, S, D, generator=g), torch.randn(1, HKV, S, D, generator=g),
            torch.randn(1, HKV, S, D, generator=g))


def _run(setting, seed=0):
    rec = research.Recorder()
    q, k, v = _qkv(seed)
    out, _ = research.make_attention(setting, rec)(_Module(), q, k, v, None, scaling=D ** -0.5)
    return out.transpose(1, 2).numpy(), rec, (q.numpy(), k.numpy(), v.numpy())


def test_block_mass_torch_matches_numpy():
    q, k, _ = _qkv(1)
    attrs = AsaAttributes(causal=True, block_size=BS)
    expect = stats.block_mass(q.numpy(), k.numpy(), attrs)
    got = research.block_mass_torch(q, k, D ** -0.5, BS, row_chunk=128)
    np.testing.assert_allclose(got, expect, atol=2e-6)


@pytest.mark.parametrize("setting", [
    research.RouterSetting(router="dense"),
    research.RouterSetting(router="oracle", threshold=1.0),
    research.RouterSetting(router="naive", threshold=0.3, head_thresholds={0: np.ones(HQ, np.float32)}),
])
def test_dense_settings_equal_causal_attention(setting):
    out, rec, (q, k, v) = _run(setting)
    expect = ref.asa_attention(q, k, v, AsaAttributes(causal=True, block_size=BS, threshold=1.0))[0]
    np.testing.assert_allclose(out, expect, atol=2e-5)
    assert rec.density() == 1.0


def test_sparse_setting_matches_reference():
    setting = research.RouterSetting(router="naive", threshold=0.5, sink_blocks=1, local_blocks=1)
    out, rec, (q, k, v) = _run(setting, seed=2)
    attrs = AsaAttributes(causal=True, block_size=BS, threshold=0.5, sink_blocks=1, local_blocks=1)
    expect, _, counts, visible = ref.asa_attention(q, k, v, attrs)
    np.testing.assert_allclose(out, expect, atol=2e-5)
    assert rec.density() == pytest.approx(ref.density(counts, visible, HQ))
    assert rec.density() < 1.0
    again, _, _ = _run(setting, seed=2)
    np.testing.assert_array_equal(out, again)  # deterministic


def test_curves_round_trip_through_arrays():
    curve = stats.ThresholdCurve(np.array([0.5, 1.0]), np.ones((HQ, 2)), np.full(HQ, 2.0),
                                 np.ones((HQ, 2)), np.full(HQ, 2.0))
    arrays = research.curves_to_arrays({("naive", 1, 2): {0: curve, 1: curve}})
    back = research.arrays_to_curves(arrays)[("naive", 1, 2)]
    assert len(back) == 2
    np.testing.assert_array_equal(back[1].kept, curve.kept)


def test_lse_pooling_is_a_distribution_over_visible_blocks():
    q, k, _ = _qkv(4)
    probs = research.pooled_probs(q, k, D ** -0.5, BS, "lse")
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(probs[0, 0], 1) == 0)  # causally invisible blocks get nothing
    mean = research.pooled_probs(q, k, D ** -0.5, BS, "mean")
    np.testing.assert_allclose(mean, ref.router_probs(q.numpy(), k.numpy(), AsaAttributes(causal=True, block_size=BS))[0])
