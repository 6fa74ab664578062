"""Which (family, exporter, attn, kv_cache) variants export here; filled by the probe below."""

from __future__ import annotations

import itertools

from graphs.exporters import EXPORTERS
from graphs.families import ATTN_IMPLEMENTATIONS, FAMILIES, family_spec

KV_FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "smollm2")


def _candidates():
    out = []
    for family, exporter, attn in itertools.product(FAMILIES, EXPORTERS, ATTN_IMPLEMENTATIONS):
        out.append((family, exporter, attn, False))
        if family in KV_FAMILIES:
            out.append((family, exporter, attn, True))
    return out


CANDIDATES = _candidates()
VARIANTS = []
REFUSED = []
SLOW = []
