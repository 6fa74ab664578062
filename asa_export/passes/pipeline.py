"""The compiler pipeline: canonicalize -> match attention sites -> rewrite into ASA nodes.

    model (onnx_ir)  ->  canonicalize  ->  match (one rule module per attention shape family)
                     ->  rewrite each site into AdaptiveSparseAttention + model-local function

Everything here works on an in-memory `onnx_ir.Model`; loading and saving files is asa_export.io.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from asa_export.report import Report


@dataclasses.dataclass(frozen=True)
class RewriteOptions:
    """Router settings written into every ASA node (contract attributes).

    Args:
        block_size: router block size (64 or 128).
        threshold: cumulative threshold tau; 1.0 means exactly dense attention.
        sink_blocks: leading key blocks always kept.
        local_blocks: local band (in blocks) always kept.
        select_per: 0 = one block list per query head, 1 = per KV group.
    """

    block_size: int = 64
    threshold: float = 0.95
    sink_blocks: int = 1
    local_blocks: int = 1
    select_per: int = 0


def find_sites(model: ir.Model) -> Report:
    """Match every attention site without changing the model (`asa-export inspect`).

    Returns:
        A Report whose `sites` are the matches and `rejected` the regions that looked like
        attention but did not match, each with its reason.
    """
    raise NotImplementedError("being written")


def rewrite_model(model: ir.Model, options: RewriteOptions = RewriteOptions()) -> Report:
    """Rewrite every matched attention site of `model` in place into one ASA node each.

    Returns:
        The Report of what was rewritten and what was left unchanged (with reasons).
    """
    raise NotImplementedError("being written")
