"""Feeds for the exports: token ids, padded attention masks, consistent position ids, past KV.

Padding follows how each kind of model is served: decoders are left-padded (batched
generation), bert is right-padded. Row 0 is never padded; row b > 0 has b * total // (2 * batch)
padded slots, so with batch 2 and 100 tokens one row has 25 padded keys. Position ids count
real tokens only (`cumsum(mask) - 1`, padded slots get 1, as transformers' generate does).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from asa_export.errors import AsaExportError
from graphs.families import FamilySpec, check_family, family_spec
from graphs.interface import io_names


def padding_mask(batch: int, total: int, side: str | None) -> np.ndarray:
    """Attention mask [batch, total] int64 with the padding pattern described in the module doc.

    Args:
        batch: rows.
        total: keys per row (past + new tokens).
        side: "left", "right" or None (no padding).

    Returns:
        np.ndarray int64, 1 = real token.
    """
    mask = np.ones((batch, total), dtype=np.int64)
    if side is None:
        return mask
    for b in range(1, batch):
        pad = min(b * total // (2 * batch), total - 1)
        if pad:
            if side == "left":
                mask[b, :pad] = 0
            else:
                mask[b, total - pad:] = 0
    return mask


def position_ids(mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids [B, seq] of the last `seq` slots, counting real tokens only.

    Args:
        mask: attention mask [B, past + seq].
        seq: number of new tokens.

    Returns:
        np.ndarray int64.
    """
    pos = np.cumsum(mask, axis=-1) - 1
    pos = np.where(mask == 0, 1, pos)
    return np.ascontiguousarray(pos[:, mask.shape[1] - seq:]).astype(np.int64)


def visible_rows(mask: np.ndarray, seq: int, causal: bool, window: int | None = None) -> np.ndarray:
    """Which query rows see at least one key; parity is judged on these rows only.

    Row r sits at absolute index p = past + r of the mask; key j is visible iff mask[j] != 0 and,
    when causal, j <= p and, with a window W, p - W < j (transformers' sliding-window rule).

    Args:
        mask: attention mask [B, past + seq].
        seq: number of query rows.
        causal: causal masking.
        window: sliding window in keys, or None.

    Returns:
        bool np.ndarray [B, seq].
    """
    total = mask.shape[1]
    p = np.arange(total - seq, total)[:, None]
    j = np.arange(total)[None, :]
    allowed = np.ones((seq, total), dtype=bool)
    if causal:
        allowed &= j <= p
    if window is not None:
        allowed &= j > p - window
    return ((mask[:, None, :] != 0) & allowed[None]).any(-1)


def _names_and_spec(family: str, source) -> tuple[list[str], FamilySpec]:
    spec = family_spec(family)
    if isinstance(source, (str, os.PathLike)):
        import onnx

        model = onnx.load(pathlib.Path(source), load_external_data=False)
        initializers = {init.name for init in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in initializers]
        return names, spec
    try:
        variant_family, _exporter, _attn, kv_cache = source
    except (TypeError, ValueError):
        raise AsaExportError(f"expected an ONNX path or a (family, exporter, attn, kv_cache) tuple, got {source!r}")
    if variant_family != family:
        raise AsaExportError(f"variant {source!r} is not of family {family!r}")
    return io_names(spec.causal, spec.num_layers, kv_cache)[0], spec


def sample_inputs(family: str, onnx_path_or_variant, *, batch: int = 2, seq: int = 100, past: int = 0,
                  pad: bool | str = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for one export, keyed by its input names.

    Args:
        family: one of graphs.FAMILIES.
        onnx_path_or_variant: path of an export (its input names are read), or a
            (family, exporter, attn, kv_cache) tuple.
        batch: batch size B.
        seq: new tokens S.
        past: past length P (KV variants only; 0 gives empty past tensors).
        pad: True for the family's usual side (decoders left, bert right), "left", "right",
            or False for no padding.
        seed: seed of the token ids and past tensors.

    Returns:
        {input name: np.ndarray}: input_ids [B, S] int64, attention_mask [B, P+S] int64,
        position_ids [B, S] int64 (decoders), past_key_values.{i}.key/value [B, Hkv, P, D] fp32.
    """
    check_family(family)
    names, spec = _names_and_spec(family, onnx_path_or_variant)
    has_past = any(n.startswith("past_key_values.") for n in names)
    if past and not has_past:
        raise AsaExportError(f"past={past} needs a KV-cache export; this one has inputs {names}")
    if batch < 1 or seq < 1 or past < 0:
        raise AsaExportError(f"need batch >= 1, seq >= 1, past >= 0; got {batch}, {seq}, {past}")
    side = ("left" if spec.causal else "right") if pad is True else (pad or None)
    if side not in (None, "left", "right"):
        raise AsaExportError(f"pad must be True, False, 'left' or 'right', got {pad!r}")
    rng = np.random.default_rng(seed)
    mask = padding_mask(batch, past + seq, side)
    feeds = {
        "input_ids": rng.integers(0, spec.vocab_size, size=(batch, seq), dtype=np.int64),
        "attention_mask": mask,
        "position_ids": position_ids(mask, seq),
    }
    kv_shape = (batch, spec.num_kv_heads, past, spec.head_dim)
    for name in names:
        if name.startswith("past_key_values."):
            feeds[name] = rng.standard_normal(kv_shape, dtype=np.float32)
    missing = [n for n in names if n not in feeds]
    if missing:
        raise AsaExportError(f"no sample data for inputs {missing} of the {family} export")
    return {n: feeds[n] for n in names}


def rows_to_compare(family: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Rows [B, S] with at least one visible key for these feeds (see visible_rows).

    Args:
        family: the family the feeds were built for.
        feeds: output of sample_inputs.

    Returns:
        bool np.ndarray [B, S].
    """
    spec = family_spec(family)
    return visible_rows(feeds["attention_mask"], feeds["input_ids"].shape[1], spec.causal, spec.window)
