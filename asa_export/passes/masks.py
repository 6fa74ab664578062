"""Mask analysis: prove that a site's mask is one the contract expresses, by running it.

    mask terms of a site (additive tensors, boolean keep-tensors)
      ->  MaskSpec(causal, window, padding input)   or   a reason it is not expressible

The terms' backward slice is evaluated on generated inputs (several batch sizes, lengths, left and
right padding, with and without past KV) and compared with the contract's visibility rule
(SPEC.md "Geometry"): key j visible to row r iff padding keeps j, j <= p(r) when causal, and
p(r) - W < j with a window. Rows the hypothesis leaves without any visible key are not compared
(frameworks fill fully masked rows differently; the contract outputs zeros there).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from asa_export import inputs as feed_gen
from asa_export.passes import graph as g
from asa_export.passes.probe import Probe, ProbeError, backward_slice

# Additive mask entries at or below this are "masked" (exp underflows to 0 in float32 softmax).
MASKED_BELOW = -1.0e4
_CACHE_KEY = "asa_export.masks.cache"
# Longest probe: sliding windows are found when a probe is longer than the window.
_MAX_PROBE_KEYS = 9000


@dataclasses.dataclass(frozen=True)
class MaskTerm:
    """One mask input of a site: `additive` tensors are added to the scores; `keep` tensors are
    booleans where True keeps the score (the Where-with-fill form)."""

    value: ir.Value
    kind: str  # "additive" or "keep"


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    causal: bool = False
    window: int = -1
    padding: ir.Value | None = None  # the graph input [B, Skv] (nonzero = keep)
    # [B] last kept key index per batch (GroupQueryAttention's seqlens_k: key j kept iff
    # j <= last_kept[b]); the rule's prepare step turns it into `padding` at rewrite time.
    last_kept: ir.Value | None = None

    def describe(self) -> str:
        parts = []
        if self.causal:
            parts.append("causal")
        if self.window > 0:
            parts.append(f"window={self.window}")
        if self.padding is not None:
            parts.append("padding")
        if self.last_kept is not None:
            parts.append("padding(lengths)")
        return "+".join(parts) if parts else "none"


class MaskError(Exception):
    """The mask is not expressible by the contract; the message is the reason."""


def _visibility(term: MaskTerm, array: np.ndarray) -> np.ndarray:
    if term.kind == "keep":
        return array.astype(bool)
    visible = array > MASKED_BELOW
    finite_visible = array[visible]
    if finite_visible.size and np.any(finite_visible != 0):
        raise MaskError(
            "the additive mask carries a bias (values other than 0 and -inf), "
            "e.g. ALiBi or relative positions; not rewritten"
        )
    return visible


def _to_rows(visible: list[np.ndarray]) -> np.ndarray:
    """Intersect the terms' visibilities as [B, Sq, Skv]; the mask must be the same on every head.

    Sizes are read off the evaluated mask itself (a dim of 1 broadcasts), so the probe does not
    need to know how the model names its sequence dimensions.
    """
    terms = []
    for v in visible:
        if v.ndim < 2 or v.ndim > 4:
            raise MaskError(f"mask of rank {v.ndim} is not broadcastable to [B, H, Sq, Skv]")
        terms.append(v.reshape((1,) * (4 - v.ndim) + v.shape))
    try:
        combined = np.logical_and.reduce(np.broadcast_arrays(*terms))
    except ValueError as exc:
        raise MaskError(f"mask terms of shapes {[t.shape for t in terms]} do not broadcast") from exc
    if combined.shape[1] > 1 and not np.all(combined == combined[:, :1]):
        raise MaskError("the mask differs between heads; not expressible by the contract")
    return combined[:, 0]


def hypothesis(batch, sq, skv, causal, window, padding) -> np.ndarray:
    """Contract visibility [B, Sq, Skv] for the given mask parameters."""
    p = np.arange(sq)[:, None] + (skv - sq)
    j = np.arange(skv)[None, :]
    vis = np.ones((sq, skv), dtype=bool)
    if causal:
        vis &= j <= p
        if window > 0:
            vis &= p - window < j
    elif window > 0:
        vis &= np.abs(p - j) < window
    vis = np.broadcast_to(vis, (batch, sq, skv)).copy()
    if padding is not None:
        vis &= padding[:, None, :]
    return vis


def _fit(visible: np.ndarray, sq: int, skv: int) -> tuple[bool, int]:
    """Causality and window read off batch row 0 (never padded by the feed generator)."""
    row0 = visible[0]
    p = np.arange(sq) + (skv - sq)
    causal = not np.any(row0 & (np.arange(skv)[None, :] > p[:, None]))
    window = -1
    for r in range(sq):
        keys = np.flatnonzero(row0[r])
        if keys.size == 0:
            continue
        reach = p[r] - keys.min() + 1 if causal else max(p[r] - keys.min(), keys.max() - p[r]) + 1
        full = p[r] + 1 if causal else max(p[r] + 1, skv - p[r])
        if reach < full:
            window = max(window, int(reach))
    return causal, window


def _long_probe_length(terms: list[MaskTerm]) -> int | None:
    """A probe length beyond every integer constant in the mask's slice (a possible window)."""
    nodes, _, inits = backward_slice([t.value for t in terms])
    candidates = []
    constants = [n.outputs[0] for n in nodes if n.op_type == "Constant"] + inits
    for value in constants:
        array = g.const_array(value)
        if array is not None and array.size <= 8 and np.issubdtype(array.dtype, np.number):
            candidates += [int(x) for x in array.reshape(-1) if 16 < abs(x) < _MAX_PROBE_KEYS]
    return max(candidates) + 19 if candidates else None


def _probe_plans(model: ir.Model, terms: list[MaskTerm]) -> list[dict]:
    has_past = any(r.role == "past" for r in feed_gen.input_roles(model))
    plans = [
        dict(batch=2, seq=9, past=5 if has_past else 0, pad="left", seed=1),
        dict(batch=3, seq=12, past=7 if has_past else 0, pad="right", seed=2),
        dict(batch=1, seq=1 if has_past else 20, past=23 if has_past else 0, pad=None, seed=3),
    ]
    long = _long_probe_length(terms)
    if long is not None:
        plans.append(
            dict(batch=2, seq=3 if has_past else long, past=long if has_past else 0,
                 pad="left", seed=4)
        )
    return plans


def analyze(model: ir.Model, terms: list[MaskTerm]) -> MaskSpec:
    """Prove which contract mask the site's mask terms compute.

    Args:
        model: the model holding the terms.
        terms: the site's mask terms (empty: no mask).

    Returns:
        The MaskSpec.

    Raises:
        MaskError: with the reason when no contract mask matches on every probe.
    """
    if not terms:
        return MaskSpec()
    # Layers share one mask: prove it once per model (results and refusals alike).
    cache = model.meta.setdefault(_CACHE_KEY, {})
    key = tuple((t.value.name, t.kind) for t in terms)
    if key not in cache:
        try:
            cache[key] = _analyze(model, terms)
        except MaskError as exc:
            cache[key] = exc
    if isinstance(cache[key], MaskError):
        raise cache[key]
    return cache[key]


def _analyze(model: ir.Model, terms: list[MaskTerm]) -> MaskSpec:
    for term in terms:
        if term.value.is_graph_input():
            raise MaskError(
                f"the mask is the model input {term.value.name!r} itself (a full mask tensor); "
                "only key-padding masks [B, S] are expressible"
            )
    try:
        probe = Probe(model, [t.value for t in terms])
    except ProbeError as exc:
        raise MaskError(f"the mask could not be evaluated: {exc}") from exc
    roles = {r.name: r for r in feed_gen.input_roles(model)}
    padding_inputs = [
        v for v in model.graph.inputs
        if v.name in probe.input_names and roles[v.name].role == "padding_mask"
    ]
    if len(padding_inputs) > 1:
        raise MaskError("the mask depends on more than one padding input")
    padding = padding_inputs[0] if padding_inputs else None
    spec = None
    for plan in _probe_plans(model, terms):
        feeds = feed_gen.generate_feeds(model, **plan)
        try:
            arrays = probe.run(feeds)
        except ProbeError as exc:
            raise MaskError(f"the mask could not be evaluated: {exc}") from exc
        visible = _to_rows([_visibility(t, np.asarray(a)) for t, a in zip(terms, arrays)])
        pad = feeds[padding.name] != 0 if padding is not None else None
        if pad is not None:
            visible = np.broadcast_to(visible, (pad.shape[0],) + visible.shape[1:])
        if visible.shape[1] == 1 and plan["seq"] > 1:  # rows broadcast: the same for every query
            visible = np.broadcast_to(visible, (visible.shape[0], plan["seq"], visible.shape[2]))
        batch, sq, skv = visible.shape
        if pad is not None and pad.shape[1] != skv:
            raise MaskError(
                f"the padding input {padding.name!r} has {pad.shape[1]} keys, the mask {skv}"
            )
        if spec is None or (spec.window < 0 and _fit(visible, sq, skv)[1] > 0):
            causal, window = _fit(visible, sq, skv)
            spec = MaskSpec(causal=causal, window=window, padding=padding)
        expected = hypothesis(batch, sq, skv, spec.causal, spec.window, pad)
        rows = expected.any(axis=-1)
        if not np.array_equal(visible[rows], expected[rows]):
            raise MaskError(
                f"the mask is not causal/window/key-padding (best fit {spec.describe()} disagrees "
                f"at batch={batch}, Sq={sq}, Skv={skv})"
            )
    return spec
