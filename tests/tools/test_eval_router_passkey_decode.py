"""Passkey the way users run it (tools/eval_router.py `passkey --decode`): prefill through a
rewritten KV-cache export, then Sq = 1 decode steps; checked on the tiny llama export."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))

import eval_router as er  # noqa: E402


class NumberTokenizer:
    def decode(self, ids):
        return "".join(f" {int(i)}" for i in ids)


def test_needle_drops_names_heads_missing_all_or_part_of_the_needle():
    last = [[{0, 3, 4}, {0, 4}], [{3}, {1, 2}]]  # layer -> head -> kept blocks
    drops = er.needle_drops(last, {3, 4})
    assert drops == {"none": {1: [1]}, "part": {0: [1], 1: [0]}}


@pytest.fixture(scope="module")
def tiny_kv(tmp_path_factory):
    """The tiny llama KV-cache export, rewritten dense (tau 1) with telemetry and block indices;
    returns (original path, rewritten path)."""
    onnx_ir = pytest.importorskip("onnx_ir")
    import graphs
    from asa_export import check, io
    from asa_export.passes.pipeline import RewriteOptions, rewrite_model

    source = graphs.export("llama", "dynamo23", attn="sdpa", kv_cache=True)
    model = onnx_ir.load(str(source))
    rewrite_model(model, RewriteOptions(threshold=1.0, block_size=64))
    check._add_telemetry_outputs(model, [n for n in model.graph if n.op_type == "AdaptiveSparseAttention"])
    er._expose_block_indices(model)
    path = tmp_path_factory.mktemp("kv") / "tiny_kv_dense.onnx"
    io.save_model(model, path)
    return source, path


def _session(path):
    from asa_export.runtime.ort import session

    return session(str(path), library=None)


def _telemetry(sess):
    counts = [o.name for o in sess.get_outputs() if o.name.endswith("__block_counts")]
    return [(c, c.replace("__block_counts", "__visible_counts")) for c in counts]


def _full_forward_logits(source, ids):
    """Logits of one forward of the ORIGINAL export over all ids (empty past)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    return sess.run(["logits"], er._kv_feeds(sess, ids, past, 0))[0][0]


@pytest.mark.parametrize("split", [0, 1])
def test_dense_decode_matches_one_teacher_forced_forward(tiny_kv, split):
    source, path = tiny_kv
    ids = np.random.default_rng(5).integers(0, 256, size=203).astype(np.int64)
    layout = {"ids": ids, "n_answer": 3, "needle_start": 70, "needle_len": 6}
    sess = _session(path)
    row = er.passkey_decode_case(sess, _telemetry(sess), layout, NumberTokenizer(), split=split)
    logits = _full_forward_logits(source, ids)
    expect = [er._margin(logits[p], int(ids[p + 1])) for p in range(199, 202)]
    np.testing.assert_allclose(row["margins"], expect, atol=2e-3)
    assert row["prefill_kept"] == row["prefill_visible"] > 0  # tau 1: every visible block
    assert row["decode_kept"] == row["decode_visible"] > 0
    assert row["needle_blocks"] == [1]
    assert all(not d["none"] and not d["part"] for d in row["drops"])
    assert len(row["drops"]) == 3
