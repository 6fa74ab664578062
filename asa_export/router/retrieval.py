"""Retrieval heads: the query heads that read a far-away fact, kept dense through `head_thresholds`.

    dense attention on calibration passkey prompts --needle_mass--> score [L, Hq]
        (attention mass that the answer-predicting rows put on the needle's tokens)
    --top_heads(n)--> {layer: [heads]} --dense_heads(thresholds, heads)--> head_thresholds with
        those heads at tau 1 (contract input 5: no contract change)

Why: the training-free router scores a key block by its mean key; a 20-30 token needle inside
a 64-token block of ordinary text has an ordinary mean key, so a head with tau < 1 can drop the
block that a retrieval head needs (measured on SmolLM2 passkey prompts, BENCHMARKS.md "Router
accuracy"). Perplexity hardly sees it: few tokens depend on such heads' far reads.
numpy only; the capture of q / k lives in tools/eval_router.py (torch research path).
"""

from __future__ import annotations

import numpy as np

from asa_export.errors import AsaExportError


def needle_mass(q: np.ndarray, k: np.ndarray, scale: float, rows, needle) -> np.ndarray:
    """Causal dense attention mass on the needle's keys, averaged over `rows`, per query head.

    Args:
        q: float [Hq, S, D] queries (RoPE applied) of one sequence.
        k: float [Hkv, S, D] keys; Hq is a multiple of Hkv (grouped-query attention).
        scale: score scale.
        rows: query positions to average over (e.g. the rows that predict the answer).
        needle: key positions of the needle (all before every row in `rows`).

    Returns:
        float64 [Hq]: mean over rows of sum over needle keys of softmax(scale * q . k).
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    if heads % kv_heads:
        raise AsaExportError(f"query heads {heads} are not a multiple of key heads {kv_heads}")
    rows, needle = np.asarray(rows), np.asarray(needle)
    if needle.size == 0 or rows.size == 0 or needle.max() > rows.min():
        raise AsaExportError("needle_mass needs a non-empty needle before every scored row")
    kk = np.repeat(k.astype(np.float64), heads // kv_heads, axis=0)
    s = scale * np.einsum("hrd,hkd->hrk", q[:, rows].astype(np.float64), kk)
    s = np.where(np.arange(k.shape[1])[None, None, :] > rows[None, :, None], -np.inf, s)  # causal
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p[:, :, needle].sum(-1).mean(-1)


def top_heads(scores: np.ndarray, count: int) -> dict:
    """The `count` (layer, head) pairs with the highest scores.

    Args:
        scores: [L, Hq] (e.g. mean needle_mass over calibration prompts).
        count: how many heads.

    Returns:
        {layer: sorted list of heads}, layers without a chosen head omitted.
    """
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=None, kind="stable")[:count]
    chosen = {}
    for flat in order:
        layer, head = divmod(int(flat), scores.shape[1])
        chosen.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def dense_heads(thresholds: dict | None, heads: dict, layers: int, num_heads: int,
                tau: float = 1.0) -> dict:
    """Per-head thresholds with the given heads at `tau` (1.0: exactly dense for those heads).

    Args:
        thresholds: {layer: [Hq] tau} or None; a float means that tau for every head.
        heads: {layer: [head indices]} (e.g. from top_heads).
        layers: number of layers.
        num_heads: Hq.
        tau: the threshold the chosen heads get.

    Returns:
        {layer: float32 [Hq]} for every layer (the contract's head_thresholds input).
    """
    out = {}
    for layer in range(layers):
        base = thresholds if not isinstance(thresholds, dict) else thresholds.get(layer, 1.0)
        row = np.broadcast_to(np.asarray(base, dtype=np.float32), (num_heads,)).copy()
        row[heads.get(layer, [])] = tau
        out[layer] = row
    return out
