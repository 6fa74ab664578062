"""Training-free router statistics: attention-mass recall, density, per-head thresholds.

    captured Q/K of one site  --block_mass-->         true block mass M [B, Hq, NQ, NK]
                              --router_probs-->       router probabilities P (contract v1)
    (P, M, tau grid)          --threshold_curve-->    kept / visible blocks and kept mass per tau
    curves over calibration   --fit_head_thresholds-> per-head tau reaching a mass recall target

Everything follows SPEC.md: the selection itself is `reference.select_blocks`, so a threshold
fitted here means exactly what the `head_thresholds` input [Hq] of an ASA node means.

Definitions (per query head h, over all query blocks i that see at least one key):
- true block mass M[i, k] = mean over the rows r of block i of sum over keys j of block k of the
  dense attention probability A[r, j] (rows with no visible key contribute 0);
- mass recall = sum over i of the mass of the kept blocks / sum over i of the total mass;
- density = kept blocks / visible blocks (the contract's definition).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from asa_export.contract import AsaAttributes, num_blocks
from asa_export.contract import reference
from asa_export.errors import AsaExportError

# tau grid used by default for calibration curves: dense near 1, coarse at low tau.
DEFAULT_TAUS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97,
                0.98, 0.985, 0.99, 0.995, 1.0)


def block_mass(q: np.ndarray, k: np.ndarray, attrs: AsaAttributes,
               key_padding_mask: np.ndarray | None = None, row_chunk: int = 512) -> np.ndarray:
    """True attention mass per (query block, key block): the oracle's block scores.

    Args:
        q: query [B, Hq, Sq, D] (RoPE applied).
        k: key [B, Hkv, Skv, D].
        attrs: the site's attributes (scale, causal, window, block_size are read; softcap too).
        key_padding_mask: optional [B, Skv], nonzero = keep.
        row_chunk: query rows per step (bounds memory at B * Hq * row_chunk * Skv floats).

    Returns:
        float32 [B, Hq, NQ, NK]; each query block's row sums to 1 when all of its rows see a key
        (rows without visible keys count 0).
    """
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    if heads_q % heads_kv:
        raise AsaExportError(f"query heads {heads_q} must be a multiple of KV heads {heads_kv}")
    b = attrs.block_size
    nq, nk = num_blocks(seq_q, b), num_blocks(seq_kv, b)
    vis = reference.visibility(batch, seq_q, seq_kv, attrs, key_padding_mask)
    kk = np.repeat(k.astype(np.float32), heads_q // heads_kv, axis=1)
    scale = np.float32(attrs.resolved_scale(dim))
    sums = np.zeros((batch, heads_q, nq * b, nk), dtype=np.float64)
    step = max(b, row_chunk - row_chunk % b)
    for start in range(0, seq_q, step):
        stop = min(seq_q, start + step)
        lo, hi = _key_span(attrs, start, stop, seq_q, seq_kv, b)
        s = np.matmul(q[:, :, start:stop].astype(np.float32), np.swapaxes(kk[:, :, lo:hi], -1, -2))
        s *= scale
        if attrs.softcap > 0:
            s = attrs.softcap * np.tanh(s / attrs.softcap)
        blocks = _block_probs(s, vis[:, None, start:stop, lo:hi], b)
        sums[:, :, start:stop, lo // b:num_blocks(hi, b)] = blocks
    rows = sums.reshape(batch, heads_q, nq, b, nk).sum(axis=3)
    count = np.minimum(b, seq_q - np.arange(nq) * b)
    return (rows / count[None, None, :, None]).astype(np.float32)


def _key_span(attrs: AsaAttributes, start: int, stop: int, seq_q: int, seq_kv: int,
              b: int) -> tuple[int, int]:
    """Keys [lo, hi) that rows [start, stop) can see at all (causal / window), block aligned:
    the work of a causal chunk shrinks to its visible prefix."""
    offset = seq_kv - seq_q
    lo, hi = 0, seq_kv
    if attrs.causal:
        hi = min(seq_kv, max(0, stop - 1 + offset + 1))
        if attrs.window > 0:
            lo = max(0, start + offset - attrs.window + 1)
    lo = lo - lo % b
    hi = min(seq_kv, -(-hi // b) * b) if hi > 0 else min(seq_kv, b)
    return lo, hi


def _block_probs(s: np.ndarray, vis: np.ndarray, b: int) -> np.ndarray:
    """Softmax over the visible keys of each row, summed per key block, in place on `s`.

    Args:
        s: float32 scores [B, H, R, K] (K starts on a block boundary); overwritten.
        vis: bool [B, 1, R, K] visibility.
        b: block size.

    Returns:
        float64 [B, H, R, ceil(K / b)]; rows without a visible key are 0.
    """
    np.putmask(s, ~np.broadcast_to(vis, s.shape), np.float32(-np.inf))
    top = s.max(axis=-1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    s -= top
    np.exp(s, out=s)
    total = s.sum(axis=-1, keepdims=True, dtype=np.float64)
    width = s.shape[-1]
    nb = num_blocks(width, b)
    if width % b:
        s = np.concatenate([s, np.zeros(s.shape[:-1] + (nb * b - width,), np.float32)], axis=-1)
    blocks = s.reshape(*s.shape[:-1], nb, b).sum(axis=-1, dtype=np.float64)
    return blocks / np.where(total > 0, total, 1.0)


@dataclasses.dataclass
class ThresholdCurve:
    """Selection statistics of one site (or a sum of sites/windows) over a tau grid.

    Args:
        taus: float [T], the grid.
        kept: float [Hq, T], kept blocks summed over batch and query blocks.
        visible: float [Hq], visible blocks summed the same way.
        mass_kept: float [Hq, T], true mass in kept blocks.
        mass_total: float [Hq], true mass in visible blocks.
    """

    taus: np.ndarray
    kept: np.ndarray
    visible: np.ndarray
    mass_kept: np.ndarray
    mass_total: np.ndarray

    def __add__(self, other: "ThresholdCurve") -> "ThresholdCurve":
        if not np.array_equal(self.taus, other.taus):
            raise AsaExportError("curves on different tau grids cannot be added")
        return ThresholdCurve(self.taus, self.kept + other.kept, self.visible + other.visible,
                              self.mass_kept + other.mass_kept, self.mass_total + other.mass_total)

    def density(self) -> np.ndarray:
        """Per-head density [Hq, T] (kept / visible)."""
        return self.kept / np.maximum(self.visible, 1)[:, None]

    def recall(self) -> np.ndarray:
        """Per-head attention-mass recall [Hq, T]."""
        return self.mass_kept / np.maximum(self.mass_total, 1e-30)[:, None]


def threshold_curve(probs: np.ndarray, mass: np.ndarray, visible: np.ndarray,
                    attrs: AsaAttributes, seq_q: int, seq_kv: int,
                    taus=DEFAULT_TAUS) -> ThresholdCurve:
    """Density and mass recall of the contract's selection at every tau of a grid.

    Args:
        probs: router probabilities [B, Hq, NQ, NK] (select_per = 0), e.g. from
            `reference.router_probs`; pass `mass` itself for the oracle.
        mass: true block mass [B, Hq, NQ, NK] from `block_mass`.
        visible: bool [B, NQ, NK] block visibility.
        attrs: sink_blocks, local_blocks, block_size, causal are read (threshold is not).
        seq_q: Sq.
        seq_kv: Skv.
        taus: the tau grid (sorted ascending).

    Returns:
        ThresholdCurve with per-head sums over batch and query blocks.
    """
    taus = np.asarray(taus, dtype=np.float64)
    if np.any(np.diff(taus) < 0):
        raise AsaExportError("the tau grid must be sorted ascending")
    heads = probs.shape[1]
    kept = np.zeros((heads, len(taus)))
    mass_kept = np.zeros((heads, len(taus)))
    for t, tau in enumerate(taus):
        keep = reference.select_blocks(probs, visible, dataclasses.replace(attrs, threshold=float(min(tau, 1.0))),
                                       seq_q, seq_kv)
        kept[:, t] = keep.sum(axis=(0, 2, 3))
        mass_kept[:, t] = np.where(keep, mass, 0).sum(axis=(0, 2, 3), dtype=np.float64)
    vis_count = np.broadcast_to(visible[:, None], probs.shape).sum(axis=(0, 2, 3)).astype(np.float64)
    total = np.where(np.broadcast_to(visible[:, None], mass.shape), mass, 0).sum(axis=(0, 2, 3), dtype=np.float64)
    return ThresholdCurve(taus, kept, vis_count, mass_kept, total)


def fit_head_thresholds(curve: ThresholdCurve, target_recall: float) -> np.ndarray:
    """Per-head tau: the smallest grid value whose mass recall reaches the target.

    Heads whose router ranks blocks well reach the target at a low tau (sparse); heads it ranks
    poorly get a high tau (up to 1.0 = dense for that head). The result is the contract's
    `head_thresholds` input [Hq] of the site the curve was measured on.

    Args:
        curve: calibration statistics of one site (summed over calibration windows).
        target_recall: attention-mass recall to reach per head, in (0, 1].

    Returns:
        float32 [Hq] thresholds from the curve's grid (1.0 where no grid value reaches it).
    """
    if not 0.0 < target_recall <= 1.0:
        raise AsaExportError(f"target recall must be in (0, 1], got {target_recall}")
    recall = curve.recall()
    reached = recall >= target_recall - 1e-12
    first = np.where(reached.any(axis=1), reached.argmax(axis=1), len(curve.taus))
    taus = np.append(curve.taus, 1.0)
    return np.minimum(taus[first], 1.0).astype(np.float32)


def curve_at(curve: ThresholdCurve, head_taus: np.ndarray) -> tuple[float, float]:
    """Density and recall of a site when each head uses its own tau from the grid.

    Args:
        curve: statistics on the same grid that `head_taus` came from.
        head_taus: [Hq] thresholds, each a value of `curve.taus` (or 1.0).

    Returns:
        (density, mass recall) over all heads together.
    """
    index = [int(np.argmin(np.abs(curve.taus - t))) for t in head_taus]
    heads = np.arange(len(index))
    kept = curve.kept[heads, index].sum()
    mass = curve.mass_kept[heads, index].sum()
    return float(kept / max(curve.visible.sum(), 1)), float(mass / max(curve.mass_total.sum(), 1e-30))


def fit_head_thresholds_tradeoff(curve: ThresholdCurve, cost: float) -> np.ndarray:
    """Per-head tau maximizing mass recall minus `cost` times density (a Lagrangian split).

    With one `cost` shared by every site and head, this spends density where it buys the most
    attention mass: the head-by-head optimum of total recall for a total density budget (on the
    grid's convex hull), instead of the same recall for every head.

    Args:
        curve: calibration statistics of one site.
        cost: recall units one unit of density is worth (>= 0; 0 gives tau = 1 everywhere).

    Returns:
        float32 [Hq] thresholds from the curve's grid.
    """
    if cost < 0:
        raise AsaExportError(f"cost must be >= 0, got {cost}")
    gain = curve.recall() - cost * curve.density()
    # Ties (flat gain) go to the larger tau: the safer, denser choice.
    best = gain.shape[1] - 1 - np.argmax(gain[:, ::-1], axis=1)
    return curve.taus[best].astype(np.float32)
