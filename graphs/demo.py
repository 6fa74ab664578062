"""The default model of `asa-export demo`: a small Llama-architecture decoder, random weights.

4 layers, hidden 256, 8 query heads / 2 KV heads of dim 32, vocab 512, RoPE, up to 8192
positions; exported by the dynamo exporter at opset 18 with the sdpa code path (transformers'
default), so attention appears as MatMul/Softmax subgraphs with a boolean mask.
"""

from __future__ import annotations

import os
import pathlib

DEMO_FAMILY = "llama_demo"
DEMO_EXPORTER = "dynamo"
DEMO_ATTN = "sdpa"


def default_model(out_dir: os.PathLike) -> pathlib.Path:
    """Export (or reuse) the demo model in `out_dir`.

    Args:
        out_dir: folder to hold the export (created if needed); a previous export of the same
            builder and library versions there is reused.

    Returns:
        Path of the ONNX file (inputs input_ids, attention_mask, position_ids; output logits).
    """
    from graphs.exporters import export

    return export(DEMO_FAMILY, DEMO_EXPORTER, attn=DEMO_ATTN, kv_cache=False, cache_dir=out_dir)
