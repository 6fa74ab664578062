"""asa_export: rewrite attention in ONNX exports into AdaptiveSparseAttention (ASA) nodes.

Heavy or optional dependencies (torch, tensorrt) are imported lazily by the modules that need them.
"""

from asa_export.errors import AsaExportError

__version__ = "0.1.0"

__all__ = ["AsaExportError", "__version__"]
