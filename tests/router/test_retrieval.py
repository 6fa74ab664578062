"""asa_export.router.retrieval: needle attention mass, top heads, dense-head thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from asa_export.errors import AsaExportError
from asa_export.router import retrieval


def _dense_mass(q, k, scale, rows, needle):
    """Plain loop reference: per head, mean over rows of the softmax mass on the needle keys."""
    heads, group = q.shape[0], q.shape[0] // k.shape[0]
    out = np.zeros(heads)
    for h in range(heads):
        for r in rows:
            s = scale * k[h // group, : r + 1] @ q[h, r]
            p = np.exp(s - s.max())
            p /= p.sum()
            out[h] += p[[j for j in needle if j <= r]].sum() / len(rows)
    return out


def test_needle_mass_matches_loop_reference_with_gqa():
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(6, 37, 5)), rng.normal(size=(2, 37, 5))
    rows, needle = [30, 33, 36], [7, 8, 9, 10]
    got = retrieval.needle_mass(q, k, 0.7, rows, needle)
    np.testing.assert_allclose(got, _dense_mass(q, k, 0.7, rows, needle), rtol=1e-10)


def test_needle_mass_sees_a_head_that_reads_the_needle():
    # Head 1's query matches the needle keys' direction; head 0's does not.
    k = np.zeros((1, 40, 4))
    k[0, 10:14, 0] = 1.0
    q = np.zeros((2, 40, 4))
    q[1, :, 0] = 8.0
    mass = retrieval.needle_mass(q, k, 1.0, [39], range(10, 14))
    assert mass[1] > 0.9 and mass[0] == pytest.approx(4 / 40)


def test_needle_mass_rejects_needle_after_rows():
    q, k = np.zeros((1, 8, 2)), np.zeros((1, 8, 2))
    with pytest.raises(AsaExportError, match="needle"):
        retrieval.needle_mass(q, k, 1.0, [3], [5])


def test_top_heads_orders_and_groups_by_layer():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.8]])
    assert retrieval.top_heads(scores, 3) == {0: [1], 1: [0, 2]}
    assert retrieval.top_heads(scores, 1) == {0: [1]}


def test_dense_heads_sets_chosen_heads_and_keeps_the_rest():
    base = {0: [0.9, 0.95, 0.97], 1: [0.92, 0.93, 0.94]}
    out = retrieval.dense_heads(base, {1: [2]}, layers=2, num_heads=3)
    np.testing.assert_allclose(out[0], [0.9, 0.95, 0.97])
    np.testing.assert_allclose(out[1], [0.92, 0.93, 1.0])
    assert out[1].dtype == np.float32
    glob = retrieval.dense_heads(0.98, {0: [0]}, layers=2, num_heads=3)
    np.testing.assert_allclose(glob[0], [1.0, 0.98, 0.98])
    np.testing.assert_allclose(glob[1], [0.98, 0.98, 0.98])
