"""What the pipeline found and did: attention sites, rejected regions and their reasons.

The rewrite pass, `asa-export inspect` and the JSON report all read these plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass
class Site:
    """One attention site (matched, and rewritten unless the report comes from `inspect`).

    Attributes:
        name: name of the ASA node that replaces (or would replace) the site.
        layer: index of the site in graph order (0-based).
        rule: the rule module that matched it (e.g. "softmax_attention", "onnx_attention").
        anchor: name of the node the match started from (its Softmax or Attention node).
        q_heads, kv_heads, head_dim, head_dim_v: static sizes (None where dynamic).
        causal: causal mask with bottom-right alignment.
        window: sliding window in keys, -1 for none.
        softcap: logit soft-cap, 0.0 for none.
        mask: "none", "padding", "causal", "causal+padding", "window", "window+padding", ...
        past_kv: keys include a past KV cache (Skv may exceed Sq).
        scale: the resolved score scale.
        notes: anything a reader should know (e.g. "kv repeat not recognized: treated as MHA").
    """

    name: str
    layer: int
    rule: str
    anchor: str
    q_heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    head_dim_v: int | None = None
    causal: bool = False
    window: int = -1
    softcap: float = 0.0
    mask: str = "none"
    past_kv: bool = False
    scale: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Rejection:
    """A region that looked like attention but was left unchanged.

    Attributes:
        anchor: name of the node the match started from.
        rule: the rule module that tried it.
        reason: why it was not rewritten, in words a user can act on.
    """

    anchor: str
    rule: str
    reason: str


@dataclasses.dataclass
class Report:
    """Result of matching (and rewriting) one model."""

    model: str = ""
    sites: list[Site] = dataclasses.field(default_factory=list)
    rejected: list[Rejection] = dataclasses.field(default_factory=list)
    options: dict = dataclasses.field(default_factory=dict)
    output: str = ""

    def counts_per_rule(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for site in self.sites:
            counts[site.rule] = counts.get(site.rule, 0) + 1
        return counts

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["counts_per_rule"] = self.counts_per_rule()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
