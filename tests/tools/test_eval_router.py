"""tools/eval_router.py helpers: passkey prompt and scoring, result aggregation (no model)."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))

import eval_router as er  # noqa: E402
from asa_export.errors import AsaExportError  # noqa: E402


class CharTokenizer:
    """One token per character (ids = code points): enough to check positions and lengths."""

    def __call__(self, text):
        class Out:
            input_ids = [ord(c) for c in text]

        return Out()


def test_passkey_ids_length_and_needle_depth():
    tok = CharTokenizer()
    filler = np.full(5000, ord("."), dtype=np.int64)
    for depth in (0.1, 0.5, 0.9):
        ids, n_answer = er.passkey_ids(tok, filler, 1000, depth, "12345")
        text = "".join(chr(i) for i in ids)
        assert len(ids) == 1000
        assert n_answer == len(" 12345") and text.endswith("The pass key is 12345")
        assert text.startswith(er.PASSKEY_PREFIX)
        body = text[len(er.PASSKEY_PREFIX):]
        # the needle sits at `depth` of the filler (filler dots before it / all filler dots)
        before = body.index("\nThe pass key is 12345.")
        assert abs(before / body.count(".", 0, len(body) - 60) - depth) < 0.02


def test_passkey_ids_no_room():
    with pytest.raises(er.AsaExportError):
        er.passkey_ids(CharTokenizer(), np.zeros(10, np.int64), 100, 0.5, "12345")


def test_passkey_score_greedy_and_margin():
    ids = np.array([5, 6, 7, 1, 2, 3])
    logits = np.zeros((len(ids), 10), np.float32)
    for p in range(len(ids) - 1):
        logits[p, ids[p + 1]] = 2.0
    score = er.passkey_score(logits, ids, 3)
    assert score["greedy"] and score["first_wrong"] == -1 and score["margin"] == pytest.approx(2.0)
    logits[3, 9] = 3.0  # the second answer token loses to token 9
    score = er.passkey_score(logits, ids, 3)
    assert not score["greedy"] and score["first_wrong"] == 1 and score["margin"] == pytest.approx(-1.0)
    assert score["logprob"] < 0


def _write(folder: pathlib.Path, setting: str, window: int, nll_per_token: float, kept=10, visible=10):
    folder.mkdir(parents=True, exist_ok=True)
    row = {"setting": setting, "text": "kjv", "context": 2048, "window": window, "nll": nll_per_token * 100,
           "tokens": 100, "kept": kept, "visible": visible, "wall_s": 1.0}
    (folder / f"w{window}.json").write_text(json.dumps(row))


def test_aggregate_and_delta_use_the_same_engine_dense(tmp_path):
    torch_dense, ort = tmp_path / "kjv/2048/dense", tmp_path / "ort/kjv/2048"
    for w in range(2):
        _write(torch_dense, "dense", w, 2.0)
        _write(ort / "dense", "ort:dense", w, 2.1)  # a different dense: the ORT rows must use it
        _write(ort / "naive_tau=0.98", "ort:naive:tau=0.98", w, 2.1 + 0.01 * (w + 1), kept=5)
    rows = er.aggregate(tmp_path)
    key = ("kjv", 2048, "ort:naive:tau=0.98")
    assert rows[key]["n"] == 2 and rows[key]["kept"] / rows[key]["visible"] == 0.5
    d, per = er.delta(rows, key)
    assert per == pytest.approx([100 * (np.exp(0.01) - 1), 100 * (np.exp(0.02) - 1)])
    assert d == pytest.approx(100 * (np.exp(0.015) - 1))


def test_delta_without_baseline_covering_windows(tmp_path):
    _write(tmp_path / "kjv/2048/dense", "dense", 0, 2.0)
    _write(tmp_path / "kjv/2048/naive", "naive:tau=0.9", 1, 2.0)
    rows = er.aggregate(tmp_path)
    assert er.delta(rows, ("kjv", 2048, "naive:tau=0.9")) == (None, [])


def test_layer_list_ranges_and_singles():
    assert er.layer_list("0-2+5+28-29") == [0, 1, 2, 5, 28, 29]


def test_dense_layers_make_exactly_those_layers_tau_1():
    setting = er.parse_setting("naive:tau=0.9,local=2,dense=1+3-4", None)
    assert setting.threshold == pytest.approx(0.9) and setting.local_blocks == 2
    rows = setting.head_thresholds
    assert sorted(rows) == list(range(er.SMOLLM2_LAYERS))
    for layer, row in rows.items():
        assert row.shape == (er.SMOLLM2_HEADS,)
        assert np.all(row == (1.0 if layer in (1, 3, 4) else np.float32(0.9)))
    assert er.parse_setting("naive:tau=0.9", None).head_thresholds is None


def test_dense_layers_outside_contract_v1_are_refused():
    with pytest.raises(AsaExportError, match="dense=LAYERS"):
        er.parse_setting("oracle:tau=0.9,dense=0-1", None)


def test_floor_raises_only_the_thresholds_below_it(tmp_path):
    from asa_export.router import research, stats

    # Per head, recall 0.99 from the given tau up, 0.5 below it.
    taus = np.asarray(stats.DEFAULT_TAUS, dtype=np.float64)

    def curve(at):
        mass = np.where(taus[None, :] >= np.asarray(at, dtype=np.float64)[:, None], 0.99, 0.5)
        return stats.ThresholdCurve(taus, taus[None, :].repeat(2, 0) * 10, np.full(2, 10.0), mass, np.ones(2))

    path = tmp_path / "curves.npz"
    np.savez(path, **research.curves_to_arrays({("naive", 1, 2): {0: curve([0.5, 0.95]), 1: curve([0.5, 0.5])}}))
    plain = er.parse_setting("perhead:recall=0.9,local=2", path).head_thresholds
    floored = er.parse_setting("perhead:recall=0.9,local=2,floor=0.85", path).head_thresholds
    np.testing.assert_allclose(plain[0], [0.5, 0.95])
    np.testing.assert_allclose(floored[0], [0.85, 0.95])
    np.testing.assert_allclose(floored[1], [0.85, 0.85])


def test_ort_window_nll_in_row_chunks_equals_one_log_softmax(monkeypatch):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=2300)
    logits = rng.normal(size=(2300, 50)).astype(np.float32) * 3
    monkeypatch.setattr(er, "ort_forward", lambda sess, telemetry, x: (logits, 7, 9))
    nll, n, kept, visible = er.ort_window(None, None, ids)
    whole = er._log_softmax(logits[:-1])
    assert (n, kept, visible) == (2299, 7, 9)
    assert nll == pytest.approx(-whole[np.arange(2299), ids[1:]].sum(), rel=1e-12)


def test_plot_family_overrides_first_match_wins_else_default():
    overrides = er.family_overrides(["per-layer=^ort:file:w16_", "any file=file:"])
    assert er.plot_family("ort:file:w16_95_92", overrides) == "per-layer"
    assert er.plot_family("ort:file:tf_r95", overrides) == "any file"
    assert er.plot_family("ort:naive:tau=0.98,local=2", overrides) == er.family("ort:naive:tau=0.98")
    for bad in ("no-equals", "=x", "name=(unclosed"):
        with pytest.raises(AsaExportError):
            er.family_overrides([bad])
    with pytest.raises(AsaExportError, match="--match"):
        er.compile_regex("(unclosed", "--match")


def test_decode_list_overlap_counts_match_a_direct_comparison():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, 300, 16)).astype(np.float32)
    k = rng.standard_normal((2, 300, 16)).astype(np.float32)
    counts = er.decode_list_overlap(q, k, 0.25, 64, [0.6], steps=40)[0.6]
    from asa_export.contract import AsaAttributes, reference

    attrs = AsaAttributes(scale=0.25, causal=True, block_size=64, threshold=0.6, select_per=1)
    lists = []
    for t in range(260, 300):
        probs, vis = reference.router_probs(q[None, :, t:t + 1], k[None, :, :t + 1], attrs)
        lists.append(reference.select_blocks(probs, vis, attrs, 1, t + 1)[0, :, 0])
    kept = sum(int(a.sum()) for a in lists[1:])
    hit = sum(int((a & np.pad(b, ((0, 0), (0, a.shape[1] - b.shape[1])))).sum())
              for b, a in zip(lists, lists[1:]))
    assert counts["kept"] == kept and counts["hit"] == hit
    assert 0 < counts["hit"] < counts["kept"]  # random queries: the lists differ, but not wholly
    assert counts["kept_free"] < counts["kept"]  # sink and local blocks are kept and forced


def test_decode_list_overlap_at_tau_1_inside_one_block_and_across_a_boundary():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 200, 16)).astype(np.float32)
    k = rng.standard_normal((1, 200, 16)).astype(np.float32)
    # tau 1 keeps every visible block: positions 140..189 share key blocks 0-2, so every list
    # equals the previous one; 150..199 also meet block 3 at position 192 (one new block).
    inside = er.decode_list_overlap(q[:, :190], k[:, :190], 0.25, 64, [1.0], steps=50)[1.0]
    assert inside["hit"] == inside["kept"] == inside["prev"] == 49 * 3
    across = er.decode_list_overlap(q, k, 0.25, 64, [1.0], steps=50)[1.0]
    assert across["kept"] == across["hit"] + 1 and across["prev"] == across["hit"]


def test_decode_list_overlap_refuses_steps_outside_the_window():
    q = np.zeros((2, 100, 16), np.float32)
    k = np.zeros((1, 100, 16), np.float32)
    for steps in (1, 101):
        with pytest.raises(AsaExportError, match="steps must be between 2 and"):
            er.decode_list_overlap(q, k, 0.25, 64, [0.9], steps)


def test_kjv_text_names_a_missing_file(tmp_path):
    with pytest.raises(AsaExportError, match="KJV text file not found"):
        er.kjv_text(str(tmp_path / "missing.txt"))
