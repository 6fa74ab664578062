"""The numpy reference against SPEC.md, checked by independently written naive code.

The naive attention below walks rows and keys one by one from the SPEC text; the literal
selection walker follows the "Selection" paragraph step by step. Neither shares code with
asa_export/contract/reference.py.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from asa_export.contract import AsaAttributes
from asa_export.contract import reference as ref
from asa_export.errors import AsaExportError

# ---------------------------------------------------------------- independent helpers


def naive_visible(p: int, j: np.ndarray, causal: bool, window: int, keep_key) -> np.ndarray:
    """SPEC "Geometry" for one query position p and the keys j (array)."""
    ok = np.asarray(keep_key, dtype=bool).copy()
    if causal:
        ok &= j <= p
    if window > 0:
        ok &= (p - window < j) if causal else (np.abs(p - j) < window)
    return ok


def naive_attention(q, k, v, attrs: AsaAttributes, mask=None, bias=None, allowed=None):
    """Row-by-row float64 attention; `allowed(n, h, r)` optionally restricts keys further."""
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_kv, dim_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads_q // heads_kv
    scale = attrs.scale if attrs.scale > 0 else 1.0 / math.sqrt(dim)
    if bias is not None:
        bias = np.broadcast_to(bias, (batch, heads_q, seq_q, seq_kv))
    j = np.arange(seq_kv)
    out = np.zeros((batch, heads_q, seq_q, dim_v))
    for n in range(batch):
        keep_key = np.ones(seq_kv, bool) if mask is None else mask[n] != 0
        for h in range(heads_q):
            for r in range(seq_q):
                p = r + seq_kv - seq_q
                ok = naive_visible(p, j, attrs.causal, attrs.window, keep_key)
                if allowed is not None:
                    ok &= allowed(n, h, r)
                keys = np.flatnonzero(ok)
                if keys.size == 0:
                    continue
                kk = k[n, h // group, keys].astype(np.float64)
                s = scale * (kk @ q[n, h, r].astype(np.float64))
                if attrs.softcap > 0:
                    s = attrs.softcap * np.tanh(s / attrs.softcap)
                if bias is not None:
                    s = s + bias[n, h, r, keys]
                w = np.exp(s - s.max())
                out[n, h, r] = (w / w.sum()) @ v[n, h // group, keys].astype(np.float64)
    return out


def allowed_from_indices(block_indices, heads_q, seq_kv, block_size):
    """Key filter from the telemetry lists (the test reads the op's own output format)."""
    per = heads_q // block_indices.shape[1]
    key_block = np.arange(seq_kv) // block_size

    def allowed(n, h, r):
        kept = block_indices[n, h // per, r // block_size]
        return np.isin(key_block, kept[kept >= 0])

    return allowed


def literal_walk(p_row, vis_row, forced_row, tau):
    """SPEC "Selection" for one row of blocks, step by step with a float32 accumulator."""
    if tau >= np.float32(1.0):
        return [bool(x) for x in vis_row]
    nk = len(p_row)
    forced = [k for k in range(nk) if forced_row[k] and vis_row[k]]
    others = sorted((k for k in range(nk) if vis_row[k] and k not in forced),
                    key=lambda k: (-float(p_row[k]), k))
    keep = [False] * nk
    acc = np.float32(0.0)
    for k in forced + others:
        if k not in forced and not acc < tau:
            break
        keep[k] = True
        acc = np.float32(acc + np.float32(p_row[k]))
    return keep


def spec_forced(nq, nk, b, seq_q, seq_kv, attrs):
    """SPEC forced blocks [NQ, NK] from the formula (before visibility)."""
    out = np.zeros((nq, nk), dtype=bool)
    for i in range(nq):
        last = min((i + 1) * b, seq_q) - 1
        c = min(max((last + seq_kv - seq_q) // b, 0), nk - 1)
        for kb in range(nk):
            sink = kb < attrs.sink_blocks
            if attrs.causal:
                local = c - attrs.local_blocks < kb <= c
            else:
                local = abs(kb - c) < attrs.local_blocks
            out[i, kb] = sink or local
    return out


def random_inputs(rng, batch, heads_q, heads_kv, seq_q, seq_kv, dim, dim_v=None, spread=1.0,
                  block_offsets=0.0):
    """float32 q, k, v; `block_offsets` adds a random mean per 64-row block so the router's
    block scores are peaked (plain noise gives nearly uniform block probabilities)."""
    dim_v = dim if dim_v is None else dim_v
    q = rng.standard_normal((batch, heads_q, seq_q, dim)) * spread
    k = rng.standard_normal((batch, heads_kv, seq_kv, dim)) * spread
    if block_offsets:
        for x in (q, k):
            offsets = rng.standard_normal((*x.shape[:2], -(-x.shape[2] // 64), 1, dim))
            x += np.broadcast_to(block_offsets * offsets, (*offsets.shape[:3], 64, dim)).reshape(
                *x.shape[:2], -1, dim)[:, :, : x.shape[2]]
    v = rng.standard_normal((batch, heads_kv, seq_kv, dim_v))
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


@pytest.fixture
def rng(request):
    # A fixed seed per test (str hash() is salted per process).
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


# ---------------------------------------------------------------- geometry


def test_visibility_small_cases_by_hand():
    causal = AsaAttributes(causal=True)
    # Sq=2, Skv=4: rows sit at positions 2 and 3 (bottom-right alignment).
    expected = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(ref.visibility(1, 2, 4, causal)[0], expected)
    window = AsaAttributes(causal=True, window=2)
    expected = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(ref.visibility(1, 2, 4, window)[0], expected)
    sym = AsaAttributes(window=2)  # |p - j| < 2 around positions 2 and 3
    expected = np.array([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(ref.visibility(1, 2, 4, sym)[0], expected)
    mask = np.array([[1, 0, 1, 1], [0, 0, 0, 0]], dtype=np.int64)
    got = ref.visibility(2, 2, 4, causal, mask)
    np.testing.assert_array_equal(got[0], [[1, 0, 1, 0], [1, 0, 1, 1]])
    assert not got[1].any()


def test_block_visibility_any_element():
    vis = np.zeros((1, 100, 150), dtype=bool)
    vis[0, 70, 129] = True  # query block 1, key block 2 (b = 64)
    got = ref.block_visibility(vis, 64)
    assert got.shape == (1, 2, 3)
    assert got.sum() == 1 and got[0, 1, 2]


# ---------------------------------------------------------------- dense equivalence

DENSE_CASES = [
    # (B, Hq, Hkv, Sq, Skv, D, attrs kwargs, mask, bias)
    (2, 4, 4, 97, 97, 16, dict(causal=True), False, False),
    (2, 6, 2, 97, 161, 16, dict(causal=True, window=50, softcap=3.0), True, True),
    (1, 3, 1, 70, 200, 8, dict(causal=False, window=40), True, False),
    (2, 4, 1, 130, 70, 8, dict(causal=True, scale=0.3), False, True),  # Sq > Skv
    (1, 8, 2, 97, 97, 16, dict(causal=False, select_per=1, block_size=128), True, True),
    (1, 2, 2, 5, 200, 16, dict(causal=True, sink_blocks=0, local_blocks=0), True, False),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=[str(i) for i in range(len(DENSE_CASES))])
def test_threshold_one_is_dense_masked_attention(case, rng):
    batch, hq, hkv, sq, skv, dim, kw, use_mask, use_bias = case
    attrs = AsaAttributes(threshold=1.0, **kw)
    q, k, v = random_inputs(rng, batch, hq, hkv, sq, skv, dim, dim_v=dim + 3)
    mask = (rng.random((batch, skv)) > 0.25) if use_mask else None
    bias = rng.standard_normal((batch, 1, sq, skv)) if use_bias else None
    out, indices, counts, visible = ref.asa_attention(q, k, v, attrs, mask, bias)
    np.testing.assert_allclose(out, naive_attention(q, k, v, attrs, mask, bias),
                               rtol=1e-10, atol=1e-12)
    # Every visible block kept.
    np.testing.assert_array_equal(counts, np.broadcast_to(visible[:, None], counts.shape))


def test_head_thresholds_at_one_are_dense(rng):
    attrs = AsaAttributes(causal=True, threshold=0.1)
    q, k, v = random_inputs(rng, 1, 4, 2, 97, 161, 16)
    out, *_ = ref.asa_attention(q, k, v, attrs, head_thresholds=np.ones(4, np.float32))
    np.testing.assert_allclose(out, naive_attention(q, k, v, attrs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("select_per", [0, 1])
@pytest.mark.parametrize("tau", [0.5, 0.9])
def test_sparse_output_is_attention_over_kept_blocks(select_per, tau, rng):
    attrs = AsaAttributes(causal=True, threshold=tau, select_per=select_per, window=300,
                          softcap=4.0)
    q, k, v = random_inputs(rng, 2, 6, 2, 97, 400, 16, block_offsets=1.0)
    mask = rng.random((2, 400)) > 0.2
    bias = rng.standard_normal((2, 6, 97, 400))
    out, indices, counts, visible = ref.asa_attention(q, k, v, attrs, mask, bias)
    assert indices.shape[1] == (6 if select_per == 0 else 2)
    assert (counts < visible[:, None]).any(), "the threshold should drop some block here"
    allowed = allowed_from_indices(indices, 6, 400, 64)
    np.testing.assert_allclose(out, naive_attention(q, k, v, attrs, mask, bias, allowed),
                               rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq", [(200, 200), (16, 300), (1, 200), (97, 161)])
def test_forced_blocks_always_kept(causal, seq, rng):
    sq, skv = seq
    attrs = AsaAttributes(causal=causal, sink_blocks=1, local_blocks=2, threshold=0.3)
    q, k, _ = random_inputs(rng, 2, 4, 4, sq, skv, 16, spread=3.0)
    mask = rng.random((2, skv)) > 0.3
    probs, visible = ref.router_probs(q, k, attrs, mask)
    keep = ref.select_blocks(probs, visible, attrs, sq, skv)
    forced = spec_forced(probs.shape[2], probs.shape[3], 64, sq, skv, attrs)
    must = forced[None, None] & visible[:, None]
    assert must.any()
    assert (keep | ~must).all()
    assert not (keep & ~visible[:, None]).any()


def test_tiny_threshold_keeps_exactly_the_forced_blocks(rng):
    attrs = AsaAttributes(causal=True, sink_blocks=1, local_blocks=1, threshold=1e-30)
    q, k, _ = random_inputs(rng, 1, 2, 2, 300, 300, 16)
    probs, visible = ref.router_probs(q, k, attrs)
    keep = ref.select_blocks(probs, visible, attrs, 300, 300)
    nq = probs.shape[2]
    expected = np.zeros_like(keep)
    for i in range(nq):
        expected[:, :, i, 0] = True  # sink
        expected[:, :, i, i] = True  # local: the diagonal block (Sq = Skv)
    np.testing.assert_array_equal(keep, expected)


def test_no_forced_blocks_keeps_the_top_block(rng):
    attrs = AsaAttributes(causal=False, sink_blocks=0, local_blocks=0, threshold=1e-30)
    q, k, _ = random_inputs(rng, 1, 3, 3, 100, 400, 16, spread=2.0)
    probs, visible = ref.router_probs(q, k, attrs)
    keep = ref.select_blocks(probs, visible, attrs, 100, 400)
    assert (keep.sum(-1) == 1).all()
    np.testing.assert_array_equal(np.argmax(keep, -1), np.argmax(probs, -1))


def test_causally_excluded_blocks_never_selected(rng):
    attrs = AsaAttributes(causal=True, threshold=0.95, sink_blocks=0, local_blocks=0)
    q, k, v = random_inputs(rng, 2, 4, 2, 300, 300, 16, spread=3.0)
    # Make future keys attractive: the router must still never pick them.
    k[:, :, 150:] += 5 * q.mean(axis=(1, 2), keepdims=True)[:, :1]
    _, indices, counts, _ = ref.asa_attention(q, k, v, attrs)
    nq = indices.shape[2]
    for i in range(nq):
        row = indices[:, :, i]
        assert (row[row >= 0] <= i).all()


def test_window_excludes_distant_blocks(rng):
    attrs = AsaAttributes(causal=True, window=64, threshold=1.0, sink_blocks=1)
    q, k, v = random_inputs(rng, 1, 2, 2, 400, 400, 16)
    _, indices, counts, visible = ref.asa_attention(q, k, v, attrs)
    # Query block i (rows 64i..64i+63) sees keys in (p - 64, p]: blocks i-1 and i only, so
    # even the sink block 0 is dropped once it is out of reach.
    for i in range(indices.shape[2]):
        np.testing.assert_array_equal(sorted(set(indices[0, 0, i]) - {-1}),
                                      [x for x in (i - 1, i) if x >= 0])
    np.testing.assert_array_equal(visible[0], [1, 2, 2, 2, 2, 2, 2])


def test_padding_respected_and_fully_padded_row_is_zero(rng):
    attrs = AsaAttributes(causal=True, threshold=0.8)
    q, k, v = random_inputs(rng, 3, 4, 2, 97, 200, 16)
    mask = np.ones((3, 200), dtype=np.int64)
    mask[0, 64:128] = 0      # a whole key block padded
    mask[1, ::3] = 0
    mask[2] = 0              # nothing to attend to
    out, indices, counts, visible = ref.asa_attention(q, k, v, attrs, mask)
    # Changing padded keys / values changes nothing.
    k2, v2 = k.copy(), v.copy()
    k2[mask[:, None, :].repeat(2, 1) == 0] = 100.0
    v2[mask[:, None, :].repeat(2, 1) == 0] = -100.0
    out2, indices2, *_ = ref.asa_attention(q, k2, v2, attrs, mask)
    np.testing.assert_array_equal(indices, indices2)
    np.testing.assert_allclose(out, out2, rtol=0, atol=1e-12)
    assert not (indices[0] == 1).any()  # the padded block is never kept
    assert np.all(out[2] == 0) and not np.isnan(out).any()
    assert (counts[2] == 0).all() and (visible[2] == 0).all() and (indices[2] == -1).all()


def test_select_per_group_one_list_per_group(rng):
    attrs0 = AsaAttributes(causal=True, threshold=0.7, select_per=0)
    attrs1 = AsaAttributes(causal=True, threshold=0.7, select_per=1)
    q, k, v = random_inputs(rng, 2, 6, 2, 200, 200, 16, spread=2.0)
    p0, vis = ref.router_probs(q, k, attrs0)
    p1, vis1 = ref.router_probs(q, k, attrs1)
    assert p0.shape == (2, 6, 4, 4) and p1.shape == (2, 2, 4, 4)
    np.testing.assert_array_equal(vis, vis1)
    np.testing.assert_allclose(p1, p0.reshape(2, 2, 3, 4, 4).mean(axis=2), rtol=1e-6, atol=1e-7)
    # The group's threshold is the max over its heads.
    thr = np.array([0.2, 0.3, 0.99, 0.2, 0.2, 0.2], np.float32)
    keep_thr = ref.select_blocks(p1, vis, attrs1, 200, 200, thr)
    attrs_hi = AsaAttributes(causal=True, threshold=float(np.float32(0.99)), select_per=1)
    attrs_lo = AsaAttributes(causal=True, threshold=float(np.float32(0.2)), select_per=1)
    np.testing.assert_array_equal(keep_thr[:, 0],
                                  ref.select_blocks(p1, vis, attrs_hi, 200, 200)[:, 0])
    np.testing.assert_array_equal(keep_thr[:, 1],
                                  ref.select_blocks(p1, vis, attrs_lo, 200, 200)[:, 1])


def test_router_probs_match_block_means(rng):
    attrs = AsaAttributes(causal=False, scale=0.2)
    q, k, _ = random_inputs(rng, 1, 2, 1, 70, 130, 8)
    mask = np.ones((1, 130), bool)
    mask[0, 64:100] = False
    mask[0, 128:] = False  # block 2 (keys 128, 129) fully padded
    probs, visible = ref.router_probs(q, k, attrs, mask)
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    qbar = np.stack([q64[0, :, :64].mean(1), q64[0, :, 64:].mean(1)], axis=1)  # [H, NQ, D]
    kbar = np.stack([k64[0, 0, :64].mean(0), k64[0, 0, 100:128].mean(0)])   # visible blocks
    logits = 0.2 * qbar @ kbar.T
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs[0, :, :, :2], expected, rtol=1e-5)
    assert (probs[0, :, :, 2] == 0).all() and probs.dtype == np.float32
    np.testing.assert_array_equal(visible[0], [[1, 1, 0], [1, 1, 0]])


# Hand-made scores: (probs, visible, sink, local, causal, tau, expected kept indices).
HAND_CASES = [
    # descending 0.3 (1), 0.3 (2, tie -> after 1), 0.25 (4): sums 0, 0.3, 0.6
    ([0.1, 0.3, 0.3, 0.05, 0.25, 0.0], None, 0, 0, False, 0.5, [1, 2]),
    # the block that crosses tau is kept: 0 < 0.61, 0.3 < 0.61, 0.6 < 0.61 -> 4 kept too
    ([0.1, 0.3, 0.3, 0.05, 0.25, 0.0], None, 0, 0, False, 0.61, [1, 2, 4]),
    # acc reaches float32(0.3) + float32(0.3) == float32(0.6): not below tau = 0.6 -> stop
    ([0.1, 0.3, 0.3, 0.05, 0.25, 0.0], None, 0, 0, False, 0.6, [1, 2]),
    # tie at the crossing: block 1 (lower index) wins, block 2 is not reached
    ([0.2, 0.4, 0.4], None, 0, 0, False, 0.3, [1]),
    # sink block 0 counts toward tau: 0.2 < 0.3 -> block 1 kept, then 0.6 -> stop
    ([0.2, 0.4, 0.4], None, 1, 0, False, 0.3, [0, 1]),
    # forced blocks can exhaust tau alone
    ([0.5, 0.1, 0.4], None, 1, 0, False, 0.4, [0]),
    # invisible forced (sink) block is not kept; invisible blocks never kept
    ([0.0, 0.6, 0.4, 0.0], [0, 1, 1, 0], 1, 0, False, 0.99, [1, 2]),
    # causal local band of 2 around the last block (single query block, Sq = Skv = 4b)
    ([0.7, 0.1, 0.1, 0.1], None, 0, 2, True, 0.1, [2, 3]),
    # scores summing below tau: the walk goes on through a zero-probability visible block
    ([0.5, 0.25, 0.0, 0.0], [1, 1, 1, 0], 0, 0, False, 0.9, [0, 1, 2]),
    # tau >= 1 keeps every visible block whatever the sums
    ([0.0, 0.0, 1.0, 0.0], [1, 1, 1, 0], 0, 0, False, 1.0, [0, 1, 2]),
]


@pytest.mark.parametrize("case", HAND_CASES, ids=[str(i) for i in range(len(HAND_CASES))])
def test_selection_hand_cases(case):
    probs, vis, sink, local, causal, tau, expected = case
    nk = len(probs)
    b = 64
    attrs = AsaAttributes(causal=causal, sink_blocks=sink, local_blocks=local, threshold=tau)
    p = np.array(probs, np.float32).reshape(1, 1, 1, nk)
    visible = np.ones((1, 1, nk), bool) if vis is None else np.array(vis, bool).reshape(1, 1, nk)
    # One query block whose last row sits in the last key block: Sq = b, Skv = nk * b.
    keep = ref.select_blocks(p, visible, attrs, b, nk * b)
    assert sorted(np.flatnonzero(keep[0, 0, 0])) == expected
    assert literal_walk(p[0, 0, 0], visible[0, 0], spec_forced(1, nk, b, b, nk * b, attrs)[0],
                        np.float32(tau)) == [k in expected for k in range(nk)]


@pytest.mark.parametrize("causal", [True, False])
def test_selection_matches_literal_walk_with_ties(causal, rng):
    nq, nk, b = 5, 9, 64
    sq, skv = nq * b - 10, nk * b - 30
    attrs = AsaAttributes(causal=causal, sink_blocks=1, local_blocks=2)
    # Quantized scores produce many exact ties; rows are normalised in float32.
    raw = rng.integers(0, 4, size=(3, 4, nq, nk)).astype(np.float32)
    visible = rng.random((3, nq, nk)) > 0.2
    raw = np.where(visible[:, None], raw, 0)
    probs = (raw / np.maximum(raw.sum(-1, keepdims=True), 1)).astype(np.float32)
    thr = rng.choice(np.array([0.05, 0.3, 0.5, 0.75, 0.9, 1.0], np.float32), size=4)
    keep = ref.select_blocks(probs, visible, attrs, sq, skv, thr)
    forced = spec_forced(nq, nk, b, sq, skv, attrs)
    for n in range(3):
        for h in range(4):
            for i in range(nq):
                expect = literal_walk(probs[n, h, i], visible[n, i], forced[i], thr[h])
                assert list(keep[n, h, i]) == expect, (n, h, i)


# ---------------------------------------------------------------- decode / alignment


@pytest.mark.parametrize("seq_q", [1, 3, 16])
def test_decode_bottom_right_alignment(seq_q, rng):
    skv = 200
    attrs = AsaAttributes(causal=True)
    q, k, v = random_inputs(rng, 1, 3, 1, seq_q, skv, 16)
    out, indices, counts, visible = ref.asa_attention(q, k, v, attrs)
    np.testing.assert_allclose(out, naive_attention(q, k, v, attrs), rtol=1e-10, atol=1e-12)
    assert visible.tolist() == [[4]]  # every past block is visible to the last rows
    sparse = AsaAttributes(causal=True, threshold=1e-30, sink_blocks=1, local_blocks=1)
    _, indices, counts, _ = ref.asa_attention(q, k, v, sparse)
    # Position of the last row is skv - 1 = 199 -> block 3 is local, block 0 is the sink.
    np.testing.assert_array_equal(indices[0, :, 0], np.tile([0, 3, -1, -1], (3, 1)))


# ---------------------------------------------------------------- telemetry and density


def test_telemetry_format(rng):
    keep = rng.random((2, 3, 4, 7)) > 0.5
    visible = rng.random((2, 4, 7)) > 0.3
    indices, counts, vis_counts = ref.telemetry(keep, visible)
    assert indices.shape == (2, 3, 4, 7) and indices.dtype == np.int32
    assert counts.shape == (2, 3, 4) and counts.dtype == np.int32
    assert vis_counts.shape == (2, 4) and vis_counts.dtype == np.int32
    for idx in np.ndindex(keep.shape[:3]):
        row = indices[idx]
        listed = row[: counts[idx]]
        assert list(listed) == list(np.flatnonzero(keep[idx]))
        assert (row[counts[idx]:] == -1).all()
    np.testing.assert_array_equal(vis_counts, visible.sum(-1))


def test_telemetry_shapes_from_attention(rng):
    q, k, v = random_inputs(rng, 2, 6, 3, 97, 161, 16)
    for select_per, hsel in ((0, 6), (1, 3)):
        attrs = AsaAttributes(causal=True, threshold=0.5, select_per=select_per, block_size=128)
        out, indices, counts, visible = ref.asa_attention(q, k, v, attrs)
        assert out.shape == (2, 6, 97, 16) and out.dtype == np.float64
        assert indices.shape == (2, hsel, 1, 2) and counts.shape == (2, hsel, 1)
        assert visible.shape == (2, 1)


def test_density():
    counts = np.array([[[1, 2], [2, 2]]], np.int32)     # B=1, Hsel=2, NQ=2
    visible = np.array([[2, 3]], np.int32)
    assert ref.density(counts, visible, 2) == pytest.approx(7 / 10)
    assert math.isnan(ref.density(counts * 0, visible * 0, 2))


def test_float32_dtype_option(rng):
    attrs = AsaAttributes(causal=True, threshold=0.8)
    q, k, v = random_inputs(rng, 1, 2, 2, 97, 97, 16)
    out64, idx64, *_ = ref.asa_attention(q, k, v, attrs)
    out32, idx32, *_ = ref.asa_attention(q, k, v, attrs, dtype=np.float32)
    assert out32.dtype == np.float32
    np.testing.assert_array_equal(idx32, idx64)  # the router is float32 either way
    np.testing.assert_allclose(out32, out64, rtol=1e-5, atol=1e-6)


def test_shape_errors_are_user_errors(rng):
    q, k, v = random_inputs(rng, 1, 3, 2, 10, 10, 8)
    with pytest.raises(AsaExportError, match="multiple"):
        ref.asa_attention(q, k, v, AsaAttributes())
    q, k, v = random_inputs(rng, 1, 2, 2, 10, 10, 8)
    with pytest.raises(AsaExportError, match="key_padding_mask"):
        ref.asa_attention(q, k, v, AsaAttributes(), key_padding_mask=np.ones((1, 9)))
