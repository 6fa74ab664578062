"""Generated inputs for exported transformer models: the feeds of `check` and of the rewriter's probes.

Roles are read off the graph's structure first (an integer input that indexes an embedding table
holds token ids; a float input of rank 4 is a past key/value cache) and off common input names only
where structure is silent (a 2-D integer input that is not a token id is a padding mask, unless its
name says position ids). Dynamic dimensions get consistent values: one value per symbolic name,
the padding mask's length is past + sequence.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

_INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT8, ir.DataType.UINT8)
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass
class InputRole:
    """What one graph input means to the generator."""

    name: str
    role: str  # "tokens", "padding_mask", "positions", "cache_position", "past", "float", "int"
    dtype: ir.DataType
    shape: list  # int for static dims, str for symbolic ones, None for unknown
    vocab: int | None = None  # token id range, where an embedding table says it


def _as_ir(model) -> ir.Model:
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return model


def _dims(value: ir.Value) -> list:
    if value.shape is None:
        return []
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value)  # symbolic name (str) or None
    return out


def _embedding_vocab(value: ir.Value) -> int | None:
    """Rows of the table when `value` indexes an embedding table through Gather, else None."""
    for use in value.uses():
        node, index = use.node, use.idx
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 1:
            table = node.inputs[0]
            if table is not None and table.shape is not None and len(table.shape) >= 2:
                rows = table.shape[0]
                if isinstance(rows, int):
                    return rows
    return None


def input_roles(model) -> list[InputRole]:
    """Classify every graph input of `model` (onnx.ModelProto or onnx_ir.Model)."""
    model = _as_ir(model)
    roles = []
    for value in model.graph.inputs:
        dtype = value.dtype
        shape = _dims(value)
        name = value.name.lower()
        vocab = _embedding_vocab(value) if dtype in _INT_TYPES else None
        if vocab is not None and "position" not in name and "type" not in name:
            role = "tokens"
        elif dtype in _FLOAT_TYPES and len(shape) == 4:
            role = "past"
        elif dtype in _FLOAT_TYPES:
            role = "float"
        elif len(shape) == 1 and "position" in name:
            role = "cache_position"
        elif len(shape) == 2 and "position" in name:
            role = "positions"
        elif len(shape) == 2 and (dtype == ir.DataType.BOOL or "mask" in name):
            role = "padding_mask"
        else:
            role = "int"
        roles.append(InputRole(value.name, role, dtype, shape, vocab))
    return roles


def _resolve_dims(roles: list[InputRole], batch: int, seq: int, past: int) -> dict:
    """One value per symbolic dimension name."""
    values: dict = {}
    for r in roles:  # token ids and positions fix batch and sequence
        if r.role in ("tokens", "positions") and len(r.shape) == 2:
            for dim, v in zip(r.shape, (batch, seq)):
                if isinstance(dim, str):
                    values.setdefault(dim, v)
    for r in roles:
        if r.role == "past":
            for dim, v in zip(r.shape, (batch, None, past, None)):
                if isinstance(dim, str) and v is not None:
                    values.setdefault(dim, v)
        elif r.role == "padding_mask" and len(r.shape) == 2:
            for dim, v in zip(r.shape, (batch, seq + past)):
                if isinstance(dim, str):
                    values.setdefault(dim, v)
        elif r.role == "cache_position" and isinstance(r.shape[0], str):
            values.setdefault(r.shape[0], seq)
    return values


def _np_dtype(dtype: ir.DataType):
    return np.dtype(dtype.numpy())


def padding_mask(batch: int, total: int, pad: str | None, seed: int) -> np.ndarray:
    """[batch, total] int64 mask: row 0 unpadded, other rows padded on the `pad` side."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, total), dtype=np.int64)
    if pad is None:
        return mask
    for row in range(1, batch):
        n_pad = int(rng.integers(1, max(2, total // 2)))
        if pad == "left":
            mask[row, :n_pad] = 0
        else:
            mask[row, total - n_pad:] = 0
    return mask


def generate_feeds(
    model,
    *,
    batch: int = 2,
    seq: int = 16,
    past: int = 0,
    pad: str | None = "left",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Feeds for every graph input of `model`.

    Args:
        model: onnx.ModelProto or onnx_ir.Model.
        batch: batch size for symbolic batch dims.
        seq: number of new tokens.
        past: past KV length for cache inputs (0 = empty cache, where the export allows it).
        pad: "left", "right" or None: where the padding mask puts its zeros (row 0 is never padded).
        seed: seed of every random draw.

    Returns:
        Mapping input name -> numpy array. Position ids follow the padding mask like transformers
        builds them (cumulative sum of the mask minus one, clipped at 0).
    """
    roles = input_roles(model)
    dims = _resolve_dims(roles, batch, seq, past)
    rng = np.random.default_rng(seed)
    mask = padding_mask(batch, seq + past, pad, seed)
    feeds = {}
    for r in roles:
        shape = [d if isinstance(d, int) else dims.get(d, seq) for d in r.shape]
        np_dtype = _np_dtype(r.dtype)
        if r.role == "tokens":
            feeds[r.name] = rng.integers(0, r.vocab, size=shape).astype(np_dtype)
        elif r.role == "padding_mask":
            feeds[r.name] = mask[:, -shape[1]:].astype(np_dtype)
        elif r.role == "positions":
            pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -shape[1]:]
            feeds[r.name] = pos.astype(np_dtype)
        elif r.role == "cache_position":
            feeds[r.name] = np.arange(past, past + shape[0]).astype(np_dtype)
        elif r.role in ("past", "float"):
            feeds[r.name] = rng.standard_normal(shape).astype(np_dtype)
        else:
            feeds[r.name] = np.zeros(shape, dtype=np_dtype)
    return feeds


def key_padding(feeds: dict[str, np.ndarray], model) -> np.ndarray | None:
    """The [B, past + seq] padding mask among `feeds` (nonzero = keep), or None."""
    for r in input_roles(model):
        if r.role == "padding_mask" and r.name in feeds:
            return feeds[r.name] != 0
    return None
