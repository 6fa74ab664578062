"""The ASA op contract v1, in machine-readable form.

SPEC.md beside this file states the semantics; this module holds the names, order and defaults
that every implementation (reference, ONNX function, kernels, plugins) reads from one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

OP_TYPE = "AdaptiveSparseAttention"
DOMAIN = "asa"
VERSION = 1
PLUGIN_NAMESPACE = "asa"
PLUGIN_VERSION = "1"

# Input and output slots, in order (SPEC.md "Inputs" / "Outputs").
INPUTS = ("query", "key", "value", "key_padding_mask", "attn_bias", "head_thresholds",
          "gate_q_weight", "gate_k_weight")
OPTIONAL_INPUTS = frozenset(INPUTS[3:])
# The learned gate (SPEC.md "Router (learned gate)"): both given or neither.
GATE_INPUTS = INPUTS[6:8]
OUTPUTS = ("output", "block_indices", "block_counts", "visible_counts")

BLOCK_SIZES = (64, 128)
SELECT_PER_QUERY_HEAD = 0
SELECT_PER_KV_GROUP = 1


@dataclasses.dataclass(frozen=True)
class AsaAttributes:
    """Attributes of one ASA node (SPEC.md "Attributes").

    Args:
        scale: score scale; 0.0 means 1/sqrt(head dim).
        causal: causal mask with bottom-right alignment.
        block_size: router block size b (64 or 128); part of the semantics.
        threshold: cumulative-probability threshold tau; >= 1 keeps every visible block.
        sink_blocks: leading key blocks always kept.
        local_blocks: width of the always-kept local band, in blocks.
        window: sliding window in keys, -1 for none.
        softcap: logit soft-cap, 0.0 for none.
        select_per: 0 = one block list per query head, 1 = one per KV group.
    """

    scale: float = 0.0
    causal: bool = False
    block_size: int = 64
    threshold: float = 1.0
    sink_blocks: int = 1
    local_blocks: int = 1
    window: int = -1
    softcap: float = 0.0
    select_per: int = SELECT_PER_QUERY_HEAD

    def __post_init__(self):
        errors = self.validation_errors()
        if errors:
            raise ValueError("invalid ASA attributes: " + "; ".join(errors))

    def validation_errors(self) -> list[str]:
        errors = []
        if self.block_size not in BLOCK_SIZES:
            errors.append(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if not (self.scale >= 0.0 and math.isfinite(self.scale)):
            errors.append(f"scale must be finite and >= 0, got {self.scale}")
        if not (self.threshold > 0.0 and math.isfinite(self.threshold)):
            errors.append(f"threshold must be finite and > 0, got {self.threshold}")
        if self.sink_blocks < 0 or self.local_blocks < 0:
            errors.append("sink_blocks and local_blocks must be >= 0")
        if self.window == 0 or self.window < -1:
            errors.append(f"window must be -1 (none) or > 0, got {self.window}")
        if not (self.softcap >= 0.0 and math.isfinite(self.softcap)):
            errors.append(f"softcap must be finite and >= 0, got {self.softcap}")
        if self.select_per not in (SELECT_PER_QUERY_HEAD, SELECT_PER_KV_GROUP):
            errors.append(f"select_per must be 0 or 1, got {self.select_per}")
        return errors

    def resolved_scale(self, head_dim: int) -> float:
        return self.scale if self.scale > 0.0 else 1.0 / math.sqrt(head_dim)

    def as_onnx_attributes(self) -> dict:
        """Attribute values as an ONNX node carries them (ints for flags)."""
        return {
            "scale": float(self.scale),
            "causal": int(bool(self.causal)),
            "block_size": int(self.block_size),
            "threshold": float(self.threshold),
            "sink_blocks": int(self.sink_blocks),
            "local_blocks": int(self.local_blocks),
            "window": int(self.window),
            "softcap": float(self.softcap),
            "select_per": int(self.select_per),
        }

    @classmethod
    def from_onnx_attributes(cls, values: dict) -> "AsaAttributes":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields - {"plugin_namespace", "plugin_version"}
        if unknown:
            raise ValueError(f"unknown ASA attributes: {sorted(unknown)}")
        kwargs = {k: v for k, v in values.items() if k in fields}
        if "causal" in kwargs:
            kwargs["causal"] = bool(kwargs["causal"])
        return cls(**kwargs)

    def function_name(self) -> str:
        """Unique, stable name of the model-local function for this attribute set."""
        text = repr(sorted(self.as_onnx_attributes().items()))
        return f"{OP_TYPE}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)
