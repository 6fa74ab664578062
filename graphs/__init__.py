"""Test models for asa-export: seeded tiny transformers families and the real SmolLM2-135M,
their ONNX exports (TorchScript opset 17, dynamo opset 18 and 23, with and without KV cache),
an on-disk cache of those exports, and matching feeds.

torch and transformers are imported only when a model is built or exported.
"""

from graphs.cache import default_cache_dir
from graphs.demo import default_model
from graphs.exporters import EXPORTERS, export, export_to, run_onnx, run_torch, wrapped_model
from graphs.families import ATTN_IMPLEMENTATIONS, FAMILIES, FamilySpec, build_model, family_spec
from graphs.inputs import rows_to_compare, sample_inputs, visible_rows
from graphs.variants import CANDIDATES, REFUSED, SLOW, VARIANTS

__all__ = [
    "ATTN_IMPLEMENTATIONS", "CANDIDATES", "EXPORTERS", "FAMILIES", "REFUSED", "SLOW", "VARIANTS",
    "FamilySpec", "build_model", "default_cache_dir", "default_model", "export", "export_to",
    "family_spec", "rows_to_compare", "run_onnx", "run_torch", "sample_inputs", "visible_rows",
    "wrapped_model",
]
