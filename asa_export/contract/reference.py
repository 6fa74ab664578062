"""Numpy reference of the AdaptiveSparseAttention op (contract v1, SPEC.md beside this file).

Every other implementation (model-local ONNX function, CUDA and CPU kernels, TensorRT plugin) is
tested against this module, so it follows SPEC.md literally and favours clarity over speed:

    visibility -> block_visibility -> router_probs (float32) -> select_blocks (float32 walk)
        -> masked softmax attention (float64 by default) -> telemetry

Precision: the router (block means, logits, softmax, group average, cumulative sum) runs in
float32 in every implementation so that block selection agrees given identical inputs; the
attention itself runs in `dtype` (float64 by default). Thresholds are compared as float32, the
type an ONNX float attribute and the kernel core's `AsaParams.threshold` carry.
"""

from __future__ import annotations

import numpy as np

from asa_export.contract import SELECT_PER_KV_GROUP, AsaAttributes, num_blocks
from asa_export.errors import AsaExportError

_F32 = np.float32


def visibility(batch: int, seq_q: int, seq_kv: int, attrs: AsaAttributes,
               key_padding_mask: np.ndarray | None = None) -> np.ndarray:
    """Element visibility: which key each query row may attend to (SPEC "Geometry").

    Args:
        batch: B.
        seq_q: Sq, rows of the query tensor.
        seq_kv: Skv, keys (past included); row r sits at position r + Skv - Sq.
        attrs: the node's attributes (causal, window are read).
        key_padding_mask: optional [B, Skv], nonzero = key kept (bool or any integer type).

    Returns:
        bool array [B, Sq, Skv].
    """
    pos = np.arange(seq_q, dtype=np.int64)[:, None] + (seq_kv - seq_q)
    key = np.arange(seq_kv, dtype=np.int64)[None, :]
    vis = np.ones((seq_q, seq_kv), dtype=bool)
    if attrs.causal:
        vis &= key <= pos
    if attrs.window > 0:
        if attrs.causal:
            vis &= pos - attrs.window < key
        else:
            vis &= np.abs(pos - key) < attrs.window
    vis = np.broadcast_to(vis, (batch, seq_q, seq_kv))
    if key_padding_mask is not None:
        mask = _check_mask(key_padding_mask, batch, seq_kv)
        vis = vis & mask[:, None, :]
    return np.array(vis, dtype=bool)


def block_visibility(elem_vis: np.ndarray, block_size: int) -> np.ndarray:
    """Key block k is visible to query block i iff some key of k is visible to some row of i.

    Args:
        elem_vis: bool [B, Sq, Skv] from `visibility`.
        block_size: b.

    Returns:
        bool array [B, NQ, NK].
    """
    batch, seq_q, seq_kv = elem_vis.shape
    nq, nk = num_blocks(seq_q, block_size), num_blocks(seq_kv, block_size)
    padded = np.zeros((batch, nq * block_size, nk * block_size), dtype=bool)
    padded[:, :seq_q, :seq_kv] = elem_vis
    return padded.reshape(batch, nq, block_size, nk, block_size).any(axis=(2, 4))


def router_probs(q: np.ndarray, k: np.ndarray, attrs: AsaAttributes,
                 key_padding_mask: np.ndarray | None = None, *,
                 gate_q_weight: np.ndarray | None = None,
                 gate_k_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Router: softmax over visible key blocks of the block logits (SPEC "Router").

    Training-free logits are scale * mean(q) . mean(k); with the learned gate they are
    (mean(q) . gate_q_weight[h]) . (concat(mean, max, min)(k) . gate_k_weight[h / G]).

    Args:
        q: query [B, Hq, Sq, D] (any float type; cast to float32).
        k: key [B, Hkv, Skv, D].
        attrs: the node's attributes.
        key_padding_mask: optional [B, Skv].
        gate_q_weight: optional float32 [Hq, D, Dg], the learned gate's query projection.
        gate_k_weight: optional float32 [Hkv, 3*D, Dg]; given iff gate_q_weight is.

    Returns:
        (probs float32 [B, Hsel, NQ, NK], visible bool [B, NQ, NK]); invisible blocks have
        probability 0; for select_per = 1 the probabilities are averaged over each KV group.
    """
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    _check_heads(heads_q, heads_kv)
    b = attrs.block_size
    visible = block_visibility(visibility(batch, seq_q, seq_kv, attrs, key_padding_mask), b)
    group = heads_q // heads_kv
    gate = check_gate(gate_q_weight, gate_k_weight, heads_q, heads_kv, dim)
    q_mean, k_feat = block_features(q, k, attrs, key_padding_mask)
    if gate is None:
        k_mean = np.repeat(k_feat[..., :dim], group, axis=1)
        logits = _F32(attrs.resolved_scale(dim)) * np.matmul(q_mean, np.swapaxes(k_mean, -1, -2))
    else:
        logits = _gate_logits(q_mean, k_feat, *gate)
    probs = _masked_softmax_f32(logits.astype(_F32), visible[:, None])
    if attrs.select_per == SELECT_PER_KV_GROUP:
        grouped = probs.reshape(batch, heads_kv, group, *probs.shape[2:])
        probs = (grouped.sum(axis=2, dtype=_F32) / _F32(group)).astype(_F32)
    return probs, visible


def select_blocks(probs: np.ndarray, visible: np.ndarray, attrs: AsaAttributes, seq_q: int,
                  seq_kv: int, head_thresholds: np.ndarray | None = None) -> np.ndarray:
    """Block selection given router scores (SPEC "Threshold" and "Selection").

    Forced blocks (sink, local band) come first in ascending index, then the other visible
    blocks by descending probability (ties: lower index first); a float32 running sum walks
    that order and a non-forced block is kept iff the sum before it is below tau.

    Args:
        probs: float32 [B, Hsel, NQ, NK] router probabilities (0 for invisible blocks).
        visible: bool [B, NQ, NK] block visibility.
        attrs: the node's attributes.
        seq_q: Sq (locates the local band).
        seq_kv: Skv.
        head_thresholds: optional float32 [Hq]; replaces `attrs.threshold` per query head
            (a KV group uses the max over its heads).

    Returns:
        bool [B, Hsel, NQ, NK], True where the block is kept.
    """
    probs = np.asarray(probs, dtype=_F32)
    batch, hsel, nq, nk = probs.shape
    vis = np.broadcast_to(np.asarray(visible, dtype=bool)[:, None], probs.shape)
    tau = _thresholds(attrs, hsel, head_thresholds)[None, :, None, None]
    forced = forced_blocks(attrs, seq_q, seq_kv)[None, None] & vis
    # Walk order: forced (ascending index), other visible by descending P, invisible last.
    index = np.broadcast_to(np.arange(nk), probs.shape)
    group = np.where(forced, 0, np.where(vis, 1, 2))
    desc = np.where(group == 1, -probs, _F32(0))
    order = np.lexsort((index, desc, group), axis=-1)
    p_sorted = np.take_along_axis(np.where(vis, probs, _F32(0)), order, axis=-1)
    running = np.cumsum(p_sorted, axis=-1, dtype=_F32)  # sequential float32 sum
    before = np.concatenate([np.zeros_like(running[..., :1]), running[..., :-1]], axis=-1)
    # The running sum never decreases (P >= 0), so "acc < tau" fails from the first non-kept
    # block on: testing each position is the same as stopping there.
    under = np.empty_like(vis)
    np.put_along_axis(under, order, before < tau, axis=-1)
    return vis & (forced | under | (tau >= _F32(1.0)))


def forced_blocks(attrs: AsaAttributes, seq_q: int, seq_kv: int) -> np.ndarray:
    """bool [NQ, NK]: the blocks always kept where visible (sink and local band, SPEC "Selection").

    Args:
        attrs: sink_blocks, local_blocks, causal, block_size are read.
        seq_q: Sq.
        seq_kv: Skv.

    Returns:
        bool [NQ, NK], before visibility (AND it with the block visibility: forced blocks are
        kept only where visible).
    """
    b = attrs.block_size
    nq, nk = num_blocks(seq_q, b), num_blocks(seq_kv, b)
    last_row = np.minimum((np.arange(nq) + 1) * b, seq_q) - 1
    centre = np.clip((last_row + seq_kv - seq_q) // b, 0, nk - 1)[:, None]
    kb = np.arange(nk)[None, :]
    forced = np.broadcast_to(kb < attrs.sink_blocks, (nq, nk))
    if attrs.causal:
        local = (centre - attrs.local_blocks < kb) & (kb <= centre)
    else:
        local = np.abs(kb - centre) < attrs.local_blocks
    return forced | local


def telemetry(keep: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-capacity telemetry outputs (SPEC "Outputs" 1..3).

    Args:
        keep: bool [B, Hsel, NQ, NK] from `select_blocks`.
        visible: bool [B, NQ, NK].

    Returns:
        (block_indices int32 [B, Hsel, NQ, NK] ascending, padded with -1;
         block_counts int32 [B, Hsel, NQ]; visible_counts int32 [B, NQ]).
    """
    nk = keep.shape[-1]
    counts = keep.sum(axis=-1).astype(np.int32)
    indices = np.full(keep.shape, -1, dtype=np.int32)
    # A stable sort that moves kept blocks to the front keeps them in ascending order.
    order = np.argsort(~keep, axis=-1, kind="stable")
    slots = np.arange(nk) < counts[..., None]
    indices[slots] = order[slots]
    return indices, counts, visible.sum(axis=-1).astype(np.int32)


def asa_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, attrs: AsaAttributes,
                  key_padding_mask: np.ndarray | None = None,
                  attn_bias: np.ndarray | None = None,
                  head_thresholds: np.ndarray | None = None,
                  dtype=np.float64, *,
                  gate_q_weight: np.ndarray | None = None,
                  gate_k_weight: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole op: router, selection, block-sparse attention, telemetry.

    Args:
        q: query [B, Hq, Sq, D].
        k: key [B, Hkv, Skv, D].
        v: value [B, Hkv, Skv, Dv].
        attrs: the node's attributes.
        key_padding_mask: optional [B, Skv], nonzero = keep.
        attn_bias: optional, broadcastable to [B, Hq, Sq, Skv]; added after softcap.
        head_thresholds: optional float32 [Hq].
        dtype: float type of the attention math and of `out` (float64 or float32).
        gate_q_weight: optional float32 [Hq, D, Dg], the learned gate (see `router_probs`).
        gate_k_weight: optional float32 [Hkv, 3*D, Dg]; given iff gate_q_weight is.

    Returns:
        (out [B, Hq, Sq, Dv] in `dtype` (zeros on rows with no visible kept key),
         block_indices, block_counts, visible_counts as in `telemetry`).
    """
    _check_shapes(q, k, v)
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    dtype = np.dtype(dtype).type
    probs, visible = router_probs(q, k, attrs, key_padding_mask, gate_q_weight=gate_q_weight,
                                  gate_k_weight=gate_k_weight)
    keep = select_blocks(probs, visible, attrs, seq_q, seq_kv, head_thresholds)
    vis = visibility(batch, seq_q, seq_kv, attrs, key_padding_mask)
    group = heads_q // heads_kv
    bias = None if attn_bias is None else np.broadcast_to(
        np.asarray(attn_bias), (batch, heads_q, seq_q, seq_kv))
    out = np.zeros((batch, heads_q, seq_q, v.shape[3]), dtype=dtype)
    # One query head at a time keeps memory at B * Sq * Skv (long sequences in kernel tests).
    for h in range(heads_q):
        keep_h = keep[:, h // (heads_q // keep.shape[1])]
        mask = vis & _expand_blocks(keep_h, seq_q, seq_kv, attrs.block_size)
        out[:, h] = _attend(q[:, h], k[:, h // group], v[:, h // group], mask, attrs,
                            None if bias is None else bias[:, h], dtype)
    return (out, *telemetry(keep, visible))


def density(block_counts: np.ndarray, visible_counts: np.ndarray, hsel: int) -> float:
    """Density = sum(block_counts) / (sum(visible_counts) * Hsel).

    Args:
        block_counts: int32 [B, Hsel, NQ].
        visible_counts: int32 [B, NQ].
        hsel: Hsel (query heads or KV heads, after select_per).

    Returns:
        The density in [0, 1]; NaN when no block is visible at all (undefined).
    """
    total = int(np.sum(visible_counts, dtype=np.int64)) * int(hsel)
    if total == 0:
        return float("nan")
    return int(np.sum(block_counts, dtype=np.int64)) / total


def block_features(q: np.ndarray, k: np.ndarray, attrs: AsaAttributes,
                   key_padding_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The router's pooled block features (SPEC "Router"), float32.

    Args:
        q: query [B, Hq, Sq, D].
        k: key [B, Hkv, Skv, D].
        attrs: the node's attributes (block_size is read).
        key_padding_mask: optional [B, Skv]; padded keys are left out of every key feature.

    Returns:
        (q_mean [B, Hq, NQ, D], k_feat [B, Hkv, NK, 3*D] = concat(mean, max, min) over each
        block's kept keys; a block without a kept key gets zeros).
    """
    batch, seq_kv = k.shape[0], k.shape[2]
    b = attrs.block_size
    q_mean = _block_mean(np.asarray(q).astype(_F32), np.ones((1, q.shape[2]), dtype=bool), b)
    keep_key = (np.ones((batch, seq_kv), dtype=bool) if key_padding_mask is None
                else _check_mask(key_padding_mask, batch, seq_kv))
    return q_mean, _key_features(np.asarray(k).astype(_F32), keep_key, b)


def check_gate(gate_q_weight, gate_k_weight, heads_q: int, heads_kv: int,
               dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Validate the learned gate's weights against the node's shapes (SPEC inputs 6-7).

    Args:
        gate_q_weight: None or [Hq, D, Dg].
        gate_k_weight: None or [Hkv, 3*D, Dg].
        heads_q: Hq.
        heads_kv: Hkv.
        dim: D, the query/key head dim.

    Returns:
        None without a gate, else both weights as float32 arrays.

    Raises:
        AsaExportError: one weight without the other, or shapes that do not fit.
    """
    if gate_q_weight is None and gate_k_weight is None:
        return None
    if gate_q_weight is None or gate_k_weight is None:
        raise AsaExportError("gate_q_weight and gate_k_weight come together: pass both "
                             "(a learned gate) or neither (the training-free router)")
    wq = np.asarray(gate_q_weight, dtype=_F32)
    wk = np.asarray(gate_k_weight, dtype=_F32)
    if wq.ndim != 3 or wq.shape[:2] != (heads_q, dim) or wq.shape[2] < 1:
        raise AsaExportError(f"gate_q_weight must have shape [Hq, D, Dg] = [{heads_q}, {dim}, "
                             f"Dg], got {list(wq.shape)}")
    if wk.shape != (heads_kv, 3 * dim, wq.shape[2]):
        raise AsaExportError(f"gate_k_weight must have shape [Hkv, 3*D, Dg] = "
                             f"{[heads_kv, 3 * dim, wq.shape[2]]}, got {list(wk.shape)}")
    return wq, wk


# ---------------------------------------------------------------- helpers


def _key_features(k: np.ndarray, keep: np.ndarray, b: int) -> np.ndarray:
    """float32 [B, Hkv, NK, 3*D]: concat(mean, max, min) of the kept keys of each block.

    A block without a kept key (invisible anyway) gets zeros, so no inf reaches the logits.
    """
    batch, heads, seq, dim = k.shape
    n = num_blocks(seq, b)
    w = np.zeros((keep.shape[0], n * b), dtype=bool)
    w[:, :seq] = keep
    tiles = np.zeros((batch, heads, n * b, dim), dtype=_F32)
    tiles[:, :, :seq] = k
    tiles = tiles.reshape(batch, heads, n, b, dim)
    kept = w.reshape(-1, 1, n, b, 1)
    top = np.where(kept, tiles, _F32(-np.inf)).max(axis=3)
    bottom = np.where(kept, tiles, _F32(np.inf)).min(axis=3)
    empty = ~w.reshape(-1, 1, n, b, 1).any(axis=3)
    top = np.where(empty, _F32(0), top)
    bottom = np.where(empty, _F32(0), bottom)
    return np.concatenate([_block_mean(k, keep, b), top, bottom], axis=-1).astype(_F32)


def _gate_logits(q_mean: np.ndarray, k_feat: np.ndarray, wq: np.ndarray,
                 wk: np.ndarray) -> np.ndarray:
    """float32 [B, Hq, NQ, NK]: (q_mean . Wq[h]) . (k_feat . Wk[h / G]), no scale."""
    q_emb = np.matmul(q_mean, wq[None])                     # [B, Hq, NQ, Dg]
    k_emb = np.matmul(k_feat, wk[None])                     # [B, Hkv, NK, Dg]
    group = q_mean.shape[1] // k_feat.shape[1]
    k_emb = np.repeat(k_emb, group, axis=1)                 # query head h reads KV head h // G
    return np.matmul(q_emb, np.swapaxes(k_emb, -1, -2)).astype(_F32)


def _block_mean(x: np.ndarray, keep: np.ndarray, b: int) -> np.ndarray:
    """Float32 mean of x [B, H, S, D] over the kept rows (keep [B or 1, S]) of each block of b."""
    batch, heads, seq, dim = x.shape
    n = num_blocks(seq, b)
    w = np.zeros((keep.shape[0], n * b), dtype=_F32)
    w[:, :seq] = keep
    xs = np.zeros((batch, heads, n * b, dim), dtype=_F32)
    xs[:, :, :seq] = x * w[:, None, :seq, None]
    total = xs.reshape(batch, heads, n, b, dim).sum(axis=3, dtype=_F32)
    count = np.maximum(w.reshape(-1, n, b).sum(axis=2, dtype=_F32), _F32(1.0))
    return (total / count[:, None, :, None]).astype(_F32)


def _masked_softmax_f32(logits: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Float32 softmax over the last axis restricted to `visible`; all-invisible rows give 0."""
    vis = np.broadcast_to(visible, logits.shape)
    top = np.max(np.where(vis, logits, _F32(-np.inf)), axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, _F32(0.0))
    e = np.where(vis, np.exp(logits - top, dtype=_F32), _F32(0.0))
    total = e.sum(axis=-1, keepdims=True, dtype=_F32)
    return np.where(vis, e / np.where(total > 0, total, _F32(1.0)), _F32(0.0)).astype(_F32)


def _attend(q, k, v, mask, attrs: AsaAttributes, bias, dtype) -> np.ndarray:
    """One head: q [B, Sq, D], k [B, Skv, D], v [B, Skv, Dv], mask [B, Sq, Skv] -> [B, Sq, Dv]."""
    # Contiguous operands let numpy's matmul use BLAS (a strided view takes a slow loop).
    k_t = np.ascontiguousarray(np.swapaxes(k.astype(dtype), -1, -2))
    scores = dtype(attrs.resolved_scale(q.shape[-1])) * np.matmul(q.astype(dtype), k_t)
    if attrs.softcap > 0.0:
        cap = dtype(attrs.softcap)
        scores = cap * np.tanh(scores / cap)
    if bias is not None:
        scores = scores + bias.astype(dtype)
    return np.matmul(_masked_softmax(scores, mask), v.astype(dtype)).astype(dtype)


def _masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over the last axis restricted to `mask`; rows with no key give zeros, not NaN."""
    masked = np.where(mask, scores, -np.inf)
    top = np.max(masked, axis=-1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    masked -= top
    e = np.exp(masked, out=masked)  # exp(-inf) = 0 drops the masked keys
    total = e.sum(axis=-1, keepdims=True)
    total[total == 0] = 1.0
    e /= total
    return e


def _thresholds(attrs: AsaAttributes, hsel: int, head_thresholds) -> np.ndarray:
    """float32 [Hsel]: tau per selection head (a KV group takes the max of its heads)."""
    if head_thresholds is None:
        return np.full(hsel, attrs.threshold, dtype=_F32)
    tau = np.asarray(head_thresholds, dtype=_F32).reshape(-1)
    if tau.size % hsel:
        raise AsaExportError(
            f"head_thresholds has {tau.size} entries, not a multiple of the {hsel} selection heads")
    return tau.reshape(hsel, -1).max(axis=1)


def _expand_blocks(keep: np.ndarray, seq_q: int, seq_kv: int, b: int) -> np.ndarray:
    """Kept blocks [B, NQ, NK] of one head as an element mask [B, Sq, Skv]."""
    rows = np.arange(seq_q) // b
    cols = np.arange(seq_kv) // b
    return keep[:, rows][:, :, cols]


def _check_mask(mask: np.ndarray, batch: int, seq_kv: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (batch, seq_kv):
        raise AsaExportError(
            f"key_padding_mask must have shape [B, Skv] = {[batch, seq_kv]}, "
            f"got {list(mask.shape)}")
    return mask != 0


def _check_heads(heads_q: int, heads_kv: int) -> None:
    if heads_kv <= 0 or heads_q % heads_kv:
        raise AsaExportError(
            f"query heads ({heads_q}) must be a multiple of key/value heads ({heads_kv})")


def _check_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise AsaExportError("query, key and value must be 4-D [B, H, S, D]")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise AsaExportError(f"batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise AsaExportError(f"query and key head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if v.shape[1:3] != k.shape[1:3]:
        raise AsaExportError(
            f"key {list(k.shape)} and value {list(v.shape)} disagree on [Hkv, Skv]")
    _check_heads(q.shape[1], k.shape[1])
