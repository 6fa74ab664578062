"""Flat-signature torch Modules around the transformers models, the form the exporters see.

transformers' cache classes change between versions (tuple of tuples, DynamicCache with
key_cache lists, DynamicCache with layers, the `past_key_values` -> `cache` keyword rename), so
the ONNX interface is fixed here instead: flat past tensors in, flat present tensors out.

The interface they implement is described in graphs/interface.py.
"""

from __future__ import annotations

import inspect

import torch


def _cache_keyword(model) -> str:
    # transformers 5.x renames `past_key_values` to `cache` (the old name is deprecated).
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layer_tensors(cache) -> list[torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for i in range(len(cache.key_cache)) for t in (cache.key_cache[i], cache.value_cache[i])]


class DecoderWrapper(torch.nn.Module):
    """input_ids, attention_mask, position_ids[, *past] -> logits[, *present]."""

    def __init__(self, model, num_layers: int, kv_cache: bool):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.kv_cache = kv_cache
        self.cache_keyword = _cache_keyword(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        if not self.kv_cache:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False)
            return out.logits
        from transformers import DynamicCache

        # No config: plain full-length layers even for mistral, so present = past ++ new
        # (the window is applied by the mask, not by trimming the cache).
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_keyword: cache})
        return (out.logits, *_layer_tensors(cache))


class EncoderWrapper(torch.nn.Module):
    """input_ids, attention_mask -> last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def wrap(model, causal: bool, num_layers: int, kv_cache: bool) -> torch.nn.Module:
    """Wrap a transformers model in the flat ONNX interface, in eval mode.

    eval() matters: torch.onnx.export (TorchScript) restores the training flag of the module it
    was given recursively, and a fresh wrapper is in training mode, which would switch GPT-2's
    dropout on in the wrapped model after the export.

    Args:
        model: transformers model.
        causal: decoder or bert.
        num_layers: layers of the model.
        kv_cache: add past/present tensors.

    Returns:
        torch.nn.Module.
    """
    wrapper = DecoderWrapper(model, num_layers, kv_cache) if causal else EncoderWrapper(model)
    return wrapper.eval()
