"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from asa_export.passes.pipeline import rewrite_model
from tests.passes.attention_graphs import build


@pytest.fixture
def rewritten() -> ir.Model:
    """A small rewritten model: one ASA site (Hq 4, Hkv 2, D 16, causal + key padding)."""
    model = ir.from_proto(build(hq=4, hkv=2, d=16, mask="causal+padding"))
    rewrite_model(model)
    return model
