"""`eval_router.py passkey --decode` with a `file:NAME` model (written by `asa-export calibrate`):
the KV-cache export is rewritten and given the calibrated model's router; checked on the tiny
llama exports against one forward of the calibrated (no-KV) model."""

from __future__ import annotations

import argparse
import pathlib
import sys
import types

import numpy as np
import pytest

from asa_export.errors import AsaExportError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))

import eval_router as er  # noqa: E402

onnx_ir = pytest.importorskip("onnx_ir")


class NumberTokenizer:
    def decode(self, ids):
        return "".join(f" {int(i)}" for i in ids)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A calibrated-like tiny llama model (tau 0.9 sink 1 local 1, seeded per-head thresholds)."""
    import graphs
    from asa_export import io
    from asa_export.passes import rewrite
    from asa_export.passes.pipeline import RewriteOptions, rewrite_model

    model = onnx_ir.load(str(graphs.export("llama", "dynamo23", attn="sdpa")))
    rewrite_model(model, RewriteOptions(threshold=0.9, local_blocks=1))
    rng = np.random.default_rng(11)
    for node in rewrite.asa_nodes(model):
        rewrite.set_router_inputs(model, node, head_thresholds=rng.uniform(0.5, 0.9, 8).astype(np.float32))
    rewrite.refresh_functions(model)
    path = tmp_path_factory.mktemp("cal") / "tiny.asa.onnx"
    io.save_model(model, path)
    return path


@pytest.fixture
def no_library(monkeypatch):
    """Sessions run the contract's function bodies (no native library needed in CI)."""
    from asa_export.runtime.ort import session

    monkeypatch.setattr(er, "_ort_session", lambda path: session(str(path), library=False))


def test_file_model_decode_matches_the_calibrated_model(calibrated, tmp_path, no_library):
    import graphs
    from asa_export.runtime.ort import session

    args = argparse.Namespace(out=str(tmp_path), asa_model=[f"cal={calibrated}"])
    kv_source = graphs.export("llama", "dynamo23", attn="sdpa", kv_cache=True)
    sess, telemetry = er.ort_model(args, "file:cal", kv_source, kv=True)
    assert (tmp_path / "ort" / "models" / "file-cal-kv.onnx").exists()
    assert any(o.name.endswith("__block_indices") for o in sess.get_outputs())
    ids = np.random.default_rng(5).integers(0, 256, size=323).astype(np.int64)
    layout = {"ids": ids, "n_answer": 3, "needle_start": 70, "needle_len": 6}
    row = er.passkey_decode_case(sess, telemetry, layout, NumberTokenizer())
    # The prefill's last row predicts the first answer token: the calibrated model's own forward
    # over the prompt gives the same logits there (same routing through the same router).
    ref = session(str(calibrated), library=False)
    prompt = ids[:-3]
    logits = ref.run(["logits"], {"input_ids": prompt[None], "attention_mask": np.ones((1, len(prompt)), np.int64),
                                  "position_ids": np.arange(len(prompt), dtype=np.int64)[None]})[0][0]
    assert row["margins"][0] == pytest.approx(er._margin(logits[-1], int(ids[-3])), abs=2e-3)
    assert row["prefill_kept"] < row["prefill_visible"]  # the thresholds do prune


def test_file_model_without_its_path_is_a_user_error(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), asa_model=None)
    with pytest.raises(AsaExportError, match="--asa-model cal=PATH"):
        er.ort_model(args, "file:cal", "unused.onnx", kv=True)


def test_file_model_from_another_network_is_refused(calibrated, tmp_path):
    import graphs

    args = argparse.Namespace(out=str(tmp_path), asa_model=[f"cal={calibrated}"])
    gpt2_kv = graphs.export("gpt2", "dynamo23", attn="sdpa", kv_cache=True)
    with pytest.raises(AsaExportError, match="do not correspond"):
        er.ort_model(args, "file:cal", gpt2_kv, kv=True)
