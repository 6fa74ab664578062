"""Router statistics (asa_export/router/stats.py) on constructed inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from asa_export.contract import AsaAttributes
from asa_export.contract import reference as ref
from asa_export.errors import AsaExportError
from asa_export.router import stats

B, HQ, HKV, S, D, BS = 1, 4, 2, 64 * 5 + 17, 16, 64
ATTRS = AsaAttributes(causal=True, block_size=BS, sink_blocks=1, local_blocks=1)


def _qk(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, HQ, S, D)).astype(np.float32),
            rng.standard_normal((B, HKV, S, D)).astype(np.float32))


def _dense_probs(q, k, attrs, mask=None):
    """Full attention probabilities [B, Hq, S, S] from the reference's visibility (float64)."""
    vis = ref.visibility(B, S, S, attrs, mask)
    kk = np.repeat(k, HQ // HKV, axis=1).astype(np.float64)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), kk) / np.sqrt(D)
    s = np.where(vis[:, None], s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_block_mass_matches_dense_attention():
    q, k = _qk()
    mass = stats.block_mass(q, k, ATTRS, row_chunk=100)
    probs = _dense_probs(q, k, ATTRS)
    nb = -(-S // BS)
    expect = np.zeros((B, HQ, nb, nb))
    for i in range(nb):
        rows = probs[:, :, i * BS:(i + 1) * BS]
        for kb in range(nb):
            expect[:, :, i, kb] = rows[..., kb * BS:(kb + 1) * BS].sum(-1).mean(-1)
    np.testing.assert_allclose(mass, expect, atol=2e-6)
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(mass[0, 0], 1) == 0)  # causally excluded blocks carry no mass


def test_block_mass_respects_padding():
    q, k = _qk(1)
    mask = np.ones((B, S), dtype=bool)
    mask[:, 64:128] = False  # key block 1 fully padded
    mass = stats.block_mass(q, k, ATTRS, key_padding_mask=mask)
    assert np.all(mass[..., 1] == 0)
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)


def _curve(router="naive", seed=0, attrs=ATTRS, taus=stats.DEFAULT_TAUS):
    q, k = _qk(seed)
    mass = stats.block_mass(q, k, attrs)
    probs, visible = ref.router_probs(q, k, attrs)
    if router == "oracle":
        probs = mass
    return stats.threshold_curve(probs, mass, visible, attrs, S, S, taus)


def test_tau_one_is_dense():
    curve = _curve()
    nb = -(-S // BS)
    assert curve.visible.tolist() == [nb * (nb + 1) / 2] * HQ  # causal: only i >= k visible
    assert curve.taus[-1] == 1.0
    np.testing.assert_allclose(curve.density()[:, -1], 1.0)
    np.testing.assert_allclose(curve.recall()[:, -1], 1.0, atol=1e-6)


def test_tiny_tau_keeps_exactly_sink_and_local():
    nb = -(-S // BS)
    for sink, local in ((1, 1), (2, 1), (1, 3), (0, 2)):
        attrs = dataclasses.replace(ATTRS, sink_blocks=sink, local_blocks=local)
        curve = _curve(attrs=attrs, taus=(1e-9, 0.5, 1.0))
        # query block i sees blocks 0..i; forced = sink ∪ local band (i-local, i], only where visible
        forced = sum(len({*range(min(sink, i + 1))} | {*range(max(0, i - local + 1), i + 1)}) for i in range(nb))
        assert curve.kept[:, 0].tolist() == [forced] * HQ
        assert np.all(np.diff(curve.kept, axis=1) >= 0)  # more tau, never fewer blocks
        assert np.all(curve.kept <= curve.visible[:, None])  # never an invisible block


def test_oracle_recall_reaches_tau():
    curve = _curve("oracle")
    recall = curve.recall()
    assert np.all(recall >= curve.taus[None, :] - 1e-5)


def test_curves_are_deterministic_and_add():
    a, b = _curve(seed=3), _curve(seed=3)
    np.testing.assert_array_equal(a.kept, b.kept)
    np.testing.assert_array_equal(a.mass_kept, b.mass_kept)
    total = a + b
    np.testing.assert_allclose(total.density(), a.density())
    with pytest.raises(AsaExportError):
        a + _curve(taus=(0.5, 1.0))


def _toy_curve():
    taus = np.array([0.5, 0.9, 1.0])
    return stats.ThresholdCurve(taus, kept=np.array([[2, 5, 10], [3, 6, 10.0]]), visible=np.array([10.0, 10.0]),
                                mass_kept=np.array([[0.96, 0.99, 1.0], [0.5, 0.8, 1.0]]),
                                mass_total=np.array([1.0, 1.0]))


def test_fit_head_thresholds_picks_smallest_tau_reaching_recall():
    curve = _toy_curve()
    np.testing.assert_array_equal(stats.fit_head_thresholds(curve, 0.95), np.float32([0.5, 1.0]))
    np.testing.assert_array_equal(stats.fit_head_thresholds(curve, 0.8), np.float32([0.5, 0.9]))
    density, recall = stats.curve_at(curve, np.array([0.5, 0.9]))
    assert density == pytest.approx(8 / 20) and recall == pytest.approx(1.76 / 2)
    with pytest.raises(AsaExportError):
        stats.fit_head_thresholds(curve, 0.0)


def test_fitted_thresholds_reach_target_on_real_selection():
    curve = _curve(seed=5)
    taus = stats.fit_head_thresholds(curve, 0.9)
    q, k = _qk(5)
    mass = stats.block_mass(q, k, ATTRS)
    probs, visible = ref.router_probs(q, k, ATTRS)
    keep = ref.select_blocks(probs, visible, ATTRS, S, S, head_thresholds=taus)
    recall = np.where(keep, mass, 0).sum(axis=(0, 2, 3)) / mass.sum(axis=(0, 2, 3))
    assert np.all(recall >= 0.9 - 1e-6)


def test_tradeoff_thresholds_follow_cost():
    curve = _toy_curve()
    # head 0: recall 0.96 at density 0.2 beats 0.99 at 0.5 once cost > 0.1 (a tie at 0.1 goes to 0.9)
    np.testing.assert_array_equal(stats.fit_head_thresholds_tradeoff(curve, 0.2), np.float32([0.5, 1.0]))
    np.testing.assert_array_equal(stats.fit_head_thresholds_tradeoff(curve, 0.1), np.float32([0.9, 1.0]))
    np.testing.assert_array_equal(stats.fit_head_thresholds_tradeoff(curve, 0.0), np.float32([1.0, 1.0]))
    np.testing.assert_array_equal(stats.fit_head_thresholds_tradeoff(curve, 2.0), np.float32([0.5, 0.5]))
    with pytest.raises(AsaExportError):
        stats.fit_head_thresholds_tradeoff(curve, -1.0)
