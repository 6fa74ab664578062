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


def _chars(text):
    return [ord(c) for c in text]


def test_passkey_prompt_layout_rows_and_needle():
    filler = np.array(_chars("abcdefghij" * 200), dtype=np.int64)
    for depth in (0.0, 0.5, 1.0):
        p = retrieval.passkey_prompt(_chars, filler, 600, depth, "31415")
        text = "".join(map(chr, p["ids"]))
        assert len(p["ids"]) == 600 and text.endswith("The pass key is 31415")
        needle = "".join(chr(p["ids"][j]) for j in p["needle"])
        assert needle == retrieval.PASSKEY_NEEDLE.format(key="31415")
        # rows predict the answer tokens: row r's next token is ids[r + 1]
        assert "".join(chr(p["ids"][r + 1]) for r in p["rows"]) == " 31415"
        before = text.index(retrieval.PASSKEY_NEEDLE[:10]) - len(retrieval.PASSKEY_PREFIX)
        room = 600 - len(_chars(retrieval.PASSKEY_PREFIX + retrieval.PASSKEY_NEEDLE.format(
            key="31415") + retrieval.PASSKEY_QUESTION + " 31415"))
        assert before == round(depth * room)


def test_passkey_prompts_seeded_keys_and_filler_per_key():
    filler = np.arange(3000, dtype=np.int64) + 1000  # distinct ids: where the filler came from
    prompts = retrieval.passkey_prompts(_chars, filler, 700, depths=(0.2, 0.8), keys=2, seed=4)
    assert [(p["depth"], p["key"]) for p in prompts] == [
        (d, k) for d in (0.2, 0.8) for k in retrieval.passkey_keys(2, 4)]
    assert retrieval.passkey_keys(2, 4) == retrieval.passkey_keys(2, 4) != retrieval.passkey_keys(2, 5)
    assert all(len(k) == 5 and k.isdigit() for k in retrieval.passkey_keys(3, 0))
    # key j's filler starts at token j * context
    first = [int(i) for i in prompts[0]["ids"] if i >= 1000][0]
    second = [int(i) for i in prompts[1]["ids"] if i >= 1000][0]
    assert (first, second) == (1000, 1700)


def test_passkey_prompt_without_room_is_a_user_error():
    with pytest.raises(AsaExportError, match="no room for filler"):
        retrieval.passkey_prompt(_chars, np.zeros(10, np.int64), 200, 0.5, "12345")
    with pytest.raises(AsaExportError, match="no room for filler"):
        retrieval.passkey_prompts(_chars, np.zeros(900, np.int64), 600, keys=2)
