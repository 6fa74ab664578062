"""The ONNX interface of every export: input/output names and named dynamic axes (no torch).

  decoders: input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
            past_key_values.{i}.key / .value [B, Hkv, P, D] (kv variants)
            -> logits [B, S, V], present.{i}.key / .value [B, Hkv, P+S, D] (kv variants)
  bert:     input_ids [B, S], attention_mask [B, S] -> last_hidden_state [B, S, H]
"""

from __future__ import annotations

BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "total"


def past_names(num_layers: int) -> list[str]:
    """Names of the past key/value inputs, key then value for each layer."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Names of the present key/value outputs, key then value for each layer."""
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def io_names(causal: bool, num_layers: int, kv_cache: bool) -> tuple[list[str], list[str]]:
    """Input and output names of an export.

    Args:
        causal: decoder (True) or bert (False).
        num_layers: number of layers (past/present pairs).
        kv_cache: whether past/present tensors are part of the interface.

    Returns:
        (input names, output names).
    """
    if not causal:
        return ["input_ids", "attention_mask"], ["last_hidden_state"]
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    if kv_cache:
        inputs += past_names(num_layers)
        outputs += present_names(num_layers)
    return inputs, outputs


def dynamic_axes(causal: bool, num_layers: int, kv_cache: bool) -> dict[str, dict[int, str]]:
    """Named dynamic axes of every input and output (TorchScript form; dynamo derives from it).

    Args:
        causal, num_layers, kv_cache: as in io_names.

    Returns:
        {tensor name: {axis: dim name}}.
    """
    axes = {"input_ids": {0: BATCH, 1: SEQ}, "attention_mask": {0: BATCH, 1: TOTAL if kv_cache else SEQ}}
    if not causal:
        axes["last_hidden_state"] = {0: BATCH, 1: SEQ}
        return axes
    axes["position_ids"] = {0: BATCH, 1: SEQ}
    axes["logits"] = {0: BATCH, 1: SEQ}
    if kv_cache:
        axes.update({name: {0: BATCH, 2: PAST} for name in past_names(num_layers)})
        axes.update({name: {0: BATCH, 2: TOTAL} for name in present_names(num_layers)})
    return axes
