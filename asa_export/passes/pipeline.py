"""The compiler pipeline: canonicalize -> match attention sites -> rewrite into ASA nodes.

    model (onnx_ir)  ->  canonicalize  ->  match (one rule module per attention shape family)
                     ->  rewrite each site into AdaptiveSparseAttention + model-local function

Everything here works on an in-memory `onnx_ir.Model`; loading and saving files is asa_export.io.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from asa_export.passes import rewrite
from asa_export.passes.canonicalize import infer_shapes
from asa_export.passes.rules import ms_attention, onnx_attention, softmax_attention
from asa_export.errors import AsaExportError
from asa_export.passes.rules.base import Match, NoMatch
from asa_export.report import Rejection, Report, Site


@dataclasses.dataclass(frozen=True)
class RewriteOptions:
    """Router settings written into every ASA node (contract attributes).

    Args:
        block_size: router block size (64 or 128).
        threshold: cumulative threshold tau; 1.0 means exactly dense attention.
        sink_blocks: leading key blocks always kept.
        local_blocks: local band (in blocks) always kept.
        select_per: 0 = one block list per query head, 1 = per KV group.
        head_thresholds: per-site per-query-head tau, {site index: [Hq] floats}; written as
            each listed site's `head_thresholds` input (contract input 5) initializer, which
            replaces `threshold` for that site. `asa-export calibrate` fits them.
        gates: per-site learned gates, {site index: object with `q_weight` [Hq, D, Dg] and
            `k_weight` [Hkv, 3*D, Dg]} (asa_export.router.gate.Gate): contract inputs 6-7.
    """

    block_size: int = 64
    # Measured on SmolLM2-135M with KJV text (BENCHMARKS.md "Router accuracy"): tau 0.98 with a
    # 2-block local band keeps perplexity within +1% of dense at 2K context at density 0.59.
    threshold: float = 0.98
    sink_blocks: int = 1
    local_blocks: int = 2
    select_per: int = 0
    head_thresholds: Mapping[int, Sequence[float]] | None = None
    gates: Mapping[int, Any] | None = None

    def summary(self) -> dict:
        """The options as JSON-ready values (arrays become lists, gates their shapes)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.head_thresholds is not None:
            data["head_thresholds"] = {int(k): [float(t) for t in np.asarray(v).ravel()]
                                       for k, v in self.head_thresholds.items()}
        if self.gates is not None:
            data["gates"] = {int(k): {"q_weight": list(np.shape(v.q_weight)),
                                      "k_weight": list(np.shape(v.k_weight))}
                             for k, v in self.gates.items()}
        return data


RULES = (softmax_attention, onnx_attention, ms_attention)


def _match_all(model: ir.Model) -> tuple[list[Match], list[Rejection]]:
    infer_shapes(model)
    matches, rejected = [], []
    for rule in RULES:
        for anchor in rule.anchors(model):
            try:
                matches.append(rule.match(model, anchor))
            except NoMatch as exc:
                rejected.append(Rejection(anchor=anchor.name or anchor.op_type, rule=rule.NAME,
                                          reason=str(exc)))
    order = {id(n): i for i, n in enumerate(model.graph)}
    matches.sort(key=lambda m: order[id(m.anchor)])
    return matches, rejected


def _site(match: Match, layer: int, name: str) -> Site:
    return Site(
        name=name, layer=layer, rule=match.rule, anchor=match.anchor.name or "",
        q_heads=match.q_heads, kv_heads=match.kv_heads, head_dim=match.head_dim,
        head_dim_v=match.head_dim_v, causal=match.mask.causal, window=match.mask.window,
        softcap=match.softcap, mask=match.mask.describe(), past_kv=match.past_kv,
        scale=match.scale, notes=list(match.notes),
    )


def _site_name(layer: int) -> str:
    return f"asa_attention_{layer}"


def find_sites(model: ir.Model) -> Report:
    """Match every attention site without changing the model (`asa-export inspect`).

    Args:
        model: the model; value shapes are refined in place (canonicalize), nodes untouched.

    Returns:
        A Report whose `sites` are the matches and `rejected` the regions that looked like
        attention but did not match, each with its reason.
    """
    matches, rejected = _match_all(model)
    sites = [_site(m, i, _site_name(i)) for i, m in enumerate(matches)]
    return Report(sites=sites, rejected=rejected)


def rewrite_model(model: ir.Model, options: RewriteOptions = RewriteOptions()) -> Report:
    """Rewrite every matched attention site of `model` in place into one ASA node each.

    Args:
        model: the model to rewrite (in place).
        options: router attributes written into every node.

    Returns:
        The Report of what was rewritten and what was left unchanged (with reasons).
    """
    matches, rejected = _match_all(model)
    _check_site_keys(options, len(matches))
    report = Report(rejected=rejected, options=options.summary())
    nodes = []
    for layer, match in enumerate(matches):
        name = _site_name(layer)
        attrs = rewrite.site_attributes(match, options)
        nodes.append(rewrite.rewrite_site(model, match, attrs, name))
        report.sites.append(_site(match, layer, name))
    if nodes:
        RemoveUnusedNodesPass()(model)
        apply_router_inputs(model, nodes, options)
        rewrite.add_functions(model, nodes)
    return report


def apply_router_inputs(model: ir.Model, nodes: Sequence[ir.Node], options: RewriteOptions) -> None:
    """Wire `options.head_thresholds` / `options.gates` into the ASA nodes (site i = nodes[i]).

    Function overloads are not updated here (rewrite.add_functions / refresh_functions do).

    Raises:
        AsaExportError: a key that is not a site index, or weights of the wrong shape.
    """
    _check_site_keys(options, len(nodes))
    taus = options.head_thresholds or {}
    gates = options.gates or {}
    for index, node in enumerate(nodes):
        if index in taus or index in gates:
            rewrite.set_router_inputs(model, node, head_thresholds=taus.get(index),
                                      gate=gates.get(index))


def _check_site_keys(options: RewriteOptions, count: int) -> None:
    for what, table in (("head_thresholds", options.head_thresholds), ("gates", options.gates)):
        bad = sorted(k for k in (table or {}) if not (isinstance(k, (int, np.integer)) and 0 <= k < count))
        if bad:
            raise AsaExportError(f"{what} names site(s) {bad}, but the model has {count} attention "
                                 f"site(s) (indices 0..{count - 1} in graph order)")
