"""asa_export.router.calibrate end to end on the tiny llama export and a locally trained tokenizer."""

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from asa_export import contract
from asa_export.errors import AsaExportError
from asa_export.passes.pipeline import RewriteOptions
from asa_export.router import calibrate as cal
from asa_export.runtime.ort import session

CONTEXT, WINDOWS = 512, 2  # 8 blocks of 64 per window: room for the router to drop blocks


def _text() -> str:
    from pydoc_data.topics import topics  # in every CPython

    return "\n\n".join(topics[k] for k in sorted(topics))[:40000]


def _word_tokenizer(path, text: str, vocab: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=vocab,
                                                              special_tokens=["[UNK]"]))
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, text file, tokenizer.json, work folder): the tiny llama has a 256-token vocab."""
    root = tmp_path_factory.mktemp("calibrate")
    text = root / "text.txt"
    text.write_text(_text())
    tokenizer = _word_tokenizer(root / "tokenizer.json", _text(), 256)
    return graphs.export("llama", "dynamo", attn="sdpa"), str(text), tokenizer, root


def _options(**kw) -> cal.CalibrateOptions:
    return cal.CalibrateOptions(**{"context": CONTEXT, "windows": WINDOWS, **kw})


@pytest.fixture(scope="module")
def first(setup):
    """One resumable run at recall 0.95 with report and plots (shared by several tests)."""
    model, text, tokenizer, root = setup
    out = root / "first.asa.onnx"
    report = cal.calibrate(model, [text], tokenizer, out, _options(target_recall=0.95),
                           report_path=root / "first.json", plots_dir=root / "plots",
                           resume_dir=root / "work")
    return report, out


def _thresholds(path) -> dict:
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    slot = contract.INPUTS.index("head_thresholds")
    return {n.name: inits[n.input[slot]] for n in proto.graph.node
            if n.op_type == contract.OP_TYPE}


def _feeds(n=CONTEXT):
    ids = (np.arange(n, dtype=np.int64) * 7 % 256)[None]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(n, dtype=np.int64)[None]}


def test_calibrated_model_carries_the_fitted_thresholds(setup, first):
    report, out = first
    root = setup[3]
    written = _thresholds(out)
    assert [s["name"] for s in report["sites"]] == sorted(written)
    for site in report["sites"]:
        np.testing.assert_allclose(written[site["name"]], site["thresholds"], atol=1e-6)
        # Every head reaches the recall target (or is dense).
        for tau, recall in zip(site["thresholds"], site["head_recall"]):
            assert recall >= 0.95 - 1e-9 or tau == 1.0
    assert report["totals"]["density"] < 1.0  # the router drops blocks here
    assert json.loads((root / "first.json").read_text())["totals"] == report["totals"]
    assert sorted(p.name for p in (root / "plots").iterdir()) == ["density_recall.png",
                                                                  "head_density.png"]
    assert (root / "plots" / "density_recall.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrated_model_runs_with_and_without_the_library(first):
    _, out = first
    outs = []
    for library in (None, False):
        sess = session(str(out), library=library)
        outs.append(sess.run(None, _feeds())[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-3, rtol=1e-3)


def test_lower_recall_target_gives_lower_thresholds_and_density(setup, first):
    model, text, tokenizer, root = setup
    low = cal.calibrate(model, [text], tokenizer, root / "low.asa.onnx",
                        _options(target_recall=0.8), resume_dir=root / "work")
    high = first[0]
    assert low["totals"]["density"] < high["totals"]["density"]
    for a, b in zip(low["sites"], high["sites"]):
        assert all(x <= y for x, y in zip(a["thresholds"], b["thresholds"]))
    # Resumed: the captures and statistics of the first run were reused.
    assert low["wall_s"]["capture"] == [0.0] * WINDOWS
    assert low["wall_s"]["phase1"] == [0.0] * WINDOWS
    assert len(list((root / "work").glob("tokens-*.npy"))) == 1  # token ids cached too


def test_layer_recall_replaces_the_target_in_those_layers_only(setup, first):
    """`layer_recall` fits the named sites at their own recall (here lower: thresholds no higher,
    the recall bar is theirs), every other site exactly as with the plain target."""
    model, text, tokenizer, root = setup
    report = cal.calibrate(model, [text], tokenizer, root / "layer.asa.onnx",
                           _options(target_recall=0.95, layer_recall=((0, 0.6),)),
                           resume_dir=root / "work")
    base = first[0]["sites"]
    low, rest = report["sites"][0], report["sites"][1:]
    assert all(x <= y for x, y in zip(low["thresholds"], base[0]["thresholds"]))
    assert low["thresholds"] != base[0]["thresholds"]  # 0.6 is a different fit on this model
    for tau, recall in zip(low["thresholds"], low["head_recall"]):
        assert recall >= 0.6 - 1e-9 or tau == 1.0
    assert [s["thresholds"] for s in rest] == [s["thresholds"] for s in base[1:]]
    assert report["settings"]["layer_recall"] == {"0": 0.6}


@pytest.mark.parametrize("kw, match", [
    ({"target_recall": 0.9, "layer_recall": ((99, 0.9),)}, r"layer\(s\) \[99\]"),
    ({"target_density": 0.5, "layer_recall": ((0, 0.9),)}, "target-recall fit"),
    ({"target_recall": 0.9, "layer_recall": ((0, 1.5),)}, "recall in"),
])
def test_bad_layer_recall_is_refused(setup, tmp_path, kw, match):
    model, text, tokenizer, _ = setup
    with pytest.raises(AsaExportError, match=match):
        cal.calibrate(model, [text], tokenizer, tmp_path / "o.onnx", _options(**kw))
    assert not (tmp_path / "o.onnx").exists()


def test_deterministic_given_the_seed(setup, first):
    model, text, tokenizer, root = setup
    again = cal.calibrate(model, [text], tokenizer, root / "again.asa.onnx",
                          _options(target_recall=0.95))  # fresh temporary work folder
    assert again["wall_s"]["capture"][0] > 0.0
    assert again["sites"] == first[0]["sites"]
    assert again["settings"]["window_offsets"] == first[0]["settings"]["window_offsets"]
    other = cal.choose_windows(20 * CONTEXT, CONTEXT, WINDOWS, seed=1)
    assert other != cal.choose_windows(20 * CONTEXT, CONTEXT, WINDOWS, seed=0)


def test_already_rewritten_input_is_calibrated_from_its_dense_attention(setup, first):
    """Calibrating the calibrated model again reads its ASA nodes; the capture runs dense
    (its thresholds do not change what the next layers see), so the fit is the same."""
    model, text, tokenizer, root = setup
    report = cal.calibrate(first[1], [text], tokenizer, root / "twice.asa.onnx",
                           _options(target_recall=0.95))
    assert report["rewritten_here"] is False and first[0]["rewritten_here"] is True
    assert [s["thresholds"] for s in report["sites"]] == [s["thresholds"] for s in first[0]["sites"]]


def test_target_density_and_fixed_threshold(setup, first):
    model, text, tokenizer, root = setup
    budget = first[0]["totals"]["density"] - 0.05
    dens = cal.calibrate(model, [text], tokenizer, root / "dens.asa.onnx",
                         _options(target_density=budget), resume_dir=root / "work")
    assert dens["totals"]["density"] <= budget
    assert dens["totals"]["recall_target"] < 0.95
    fixed = cal.calibrate(model, [text], tokenizer, root / "fixed.asa.onnx",
                          _options(threshold=0.9), resume_dir=root / "work")
    assert all(t == pytest.approx(0.9) for s in fixed["sites"] for t in s["thresholds"])
    assert all(t == pytest.approx(0.9) for v in _thresholds(root / "fixed.asa.onnx").values()
               for t in v)


def test_select_per_group_thresholds_are_repeated_over_the_group(setup):
    """The tiny llama has 8 query heads in 2 KV groups: one tau per group, written per head."""
    model, text, tokenizer, root = setup
    opts = _options(rewrite=RewriteOptions(select_per=1))
    report = cal.calibrate(model, [text], tokenizer, root / "group.asa.onnx", opts)
    written = _thresholds(root / "group.asa.onnx")
    for site in report["sites"]:
        assert len(site["thresholds"]) == 2
        np.testing.assert_allclose(written[site["name"]], np.repeat(site["thresholds"], 4))


# ---------------------------------------------------------------------------- retrieval heads


@pytest.fixture(scope="module")
def with_retrieval(setup, first):
    """The `first` run again (same work folder) with 2 retrieval heads at tau 1."""
    model, text, tokenizer, root = setup
    out = root / "retrieval.asa.onnx"
    report = cal.calibrate(model, [text], tokenizer, out,
                           _options(target_recall=0.95, retrieval_heads=2),
                           report_path=root / "retrieval.json", resume_dir=root / "work")
    return report, out


def _with_heads_dense(thresholds: dict, report: dict, heads) -> dict:
    names = [s["name"] for s in report["sites"]]
    out = {name: np.array(taus, copy=True) for name, taus in thresholds.items()}
    for layer, head in heads:
        out[names[layer]][head] = 1.0
    return out


def test_retrieval_heads_are_exactly_the_top_scored_heads_at_tau_1(setup, first, with_retrieval):
    report, out = with_retrieval
    info = report["retrieval"]
    heads = info["heads"]
    assert len(heads) == 2 and report["settings"]["retrieval_heads"] == 2
    scores = np.array(info["scores"], dtype=np.float64)
    top = np.argsort(-scores, axis=None, kind="stable")[:2]
    assert sorted(heads) == sorted([list(divmod(int(f), scores.shape[1])) for f in top])
    assert info["head_scores"] == [scores[layer, head] for layer, head in heads]
    assert np.all((scores >= 0) & (scores <= 1))
    # Written model = the run without retrieval heads + exactly the listed heads at 1.0.
    expected = _with_heads_dense(_thresholds(first[1]), report, heads)
    written = _thresholds(out)
    assert sorted(written) == sorted(expected)
    for name in written:
        np.testing.assert_array_equal(written[name], expected[name])
    # The report's thresholds and totals describe the written model.
    for site in report["sites"]:
        np.testing.assert_allclose(written[site["name"]], site["thresholds"], atol=1e-6)
    assert info["fitted"]["density"] == first[0]["totals"]["density"]
    assert report["totals"]["density"] >= info["fitted"]["density"]
    assert json.loads((setup[3] / "retrieval.json").read_text())["retrieval"]["heads"] == heads


def test_retrieval_heads_resume_from_the_work_folder(setup, with_retrieval, tmp_path):
    model, text, tokenizer, root = setup
    assert list((root / "work").glob("retrieval-*.npy"))  # the scores are cached
    again = cal.calibrate(model, [text], tokenizer, tmp_path / "again.asa.onnx",
                          _options(target_recall=0.95, retrieval_heads=2),
                          resume_dir=root / "work")
    assert again["wall_s"]["capture"] == [0.0] * WINDOWS
    assert again["retrieval"]["scores"] == with_retrieval[0]["retrieval"]["scores"]
    assert again["sites"] == with_retrieval[0]["sites"]
    # atomic writes (io.atomic_path) leave no temporary file in the work or output folder
    assert not [p for d in (root / "work", tmp_path) for p in d.rglob(".*.tmp*")]


def test_retrieval_heads_with_select_per_group_make_the_group_dense(setup, with_retrieval):
    model, text, tokenizer, root = setup
    out = root / "group-retrieval.asa.onnx"
    report = cal.calibrate(model, [text], tokenizer, out,
                           _options(rewrite=RewriteOptions(select_per=1), retrieval_heads=1),
                           resume_dir=root / "work")
    (layer, head), = report["retrieval"]["heads"]
    written = _thresholds(out)[report["sites"][layer]["name"]]
    group = slice(head // 4 * 4, head // 4 * 4 + 4)  # 8 query heads, 2 KV groups
    assert np.all(written[group] == 1.0)


def test_retrieval_context_sets_the_prompt_length(setup, with_retrieval):
    model, text, tokenizer, root = setup
    cached = set((root / "work").glob("retrieval-*.npy"))
    report = cal.calibrate(model, [text], tokenizer, root / "rctx.asa.onnx",
                           _options(target_recall=0.95, retrieval_heads=2,
                                    retrieval_context=CONTEXT * 2), resume_dir=root / "work")
    assert report["retrieval"]["context"] == 2 * CONTEXT
    assert report["settings"]["context"] == CONTEXT
    assert len(set((root / "work").glob("retrieval-*.npy")) - cached) == 1  # scored, cached apart
    assert report["retrieval"]["scores"] != with_retrieval[0]["retrieval"]["scores"]


@pytest.mark.parametrize("count, match", [(-1, "must be >= 0"), (10**6, "more than the model")])
def test_bad_retrieval_head_counts_are_refused(setup, tmp_path, count, match):
    model, text, tokenizer, _ = setup
    with pytest.raises(AsaExportError, match=match):
        cal.calibrate(model, [text], tokenizer, tmp_path / "o.onnx",
                      _options(retrieval_heads=count))
    assert not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------------------- bad input


def test_empty_text_is_a_user_error(setup, tmp_path):
    model, _, tokenizer, _ = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(AsaExportError, match="is empty"):
        cal.calibrate(model, [empty], tokenizer, tmp_path / "o.onnx", _options())
    assert not (tmp_path / "o.onnx").exists()


def test_text_shorter_than_a_window_is_a_user_error(setup, tmp_path):
    model, _, tokenizer, _ = setup
    short = tmp_path / "short.txt"
    short.write_text("def class return " * 20)
    with pytest.raises(AsaExportError, match="fewer than one window of 512"):
        cal.calibrate(model, [short], tokenizer, tmp_path / "o.onnx", _options())


def test_tokenizer_vocabulary_mismatch_is_a_user_error(setup, tmp_path):
    model, text, _, _ = setup
    big = _word_tokenizer(tmp_path / "big.json", _text(), 2000)
    with pytest.raises(AsaExportError, match="vocabulary has 256 entries"):
        cal.calibrate(model, [text], big, tmp_path / "o.onnx", _options())


def test_model_without_attention_is_a_user_error(setup, tmp_path):
    from onnx import TensorProto, helper

    _, text, tokenizer, _ = setup
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    with pytest.raises(AsaExportError, match="no attention site"):
        cal.calibrate(path, [text], tokenizer, tmp_path / "o.onnx", _options())


def test_gate_without_the_gate_module_is_a_user_error(setup, tmp_path, monkeypatch):
    model, text, tokenizer, _ = setup
    monkeypatch.setitem(sys.modules, "asa_export.router.gate", None)  # import fails
    with pytest.raises(AsaExportError, match="--gate needs the learned gate"):
        cal.calibrate(model, [text], tokenizer, tmp_path / "o.onnx", _options(gate=True))


def test_foreign_resume_folder_is_refused(setup, first, tmp_path):
    model, text, tokenizer, root = setup
    with pytest.raises(AsaExportError, match="holds a run with other settings"):
        cal.calibrate(model, [text], tokenizer, tmp_path / "o.onnx",
                      _options(context=256), resume_dir=root / "work")


def test_two_targets_are_refused(setup, tmp_path):
    model, text, tokenizer, _ = setup
    with pytest.raises(AsaExportError, match="at most one"):
        cal.calibrate(model, [text], tokenizer, tmp_path / "o.onnx",
                      _options(target_recall=0.9, threshold=0.9))


# ---------------------------------------------------------------------------- phase 2


def test_gate_phase_writes_gate_inputs(setup, tmp_path):
    pytest.importorskip("asa_export.router.gate")
    pytest.importorskip("torch")
    model, text, tokenizer, root = setup
    out = tmp_path / "gate.asa.onnx"
    report = cal.calibrate(model, [text], tokenizer, out,
                           _options(gate=True, gate_steps=10, gate_dim=8, retrieval_heads=1),
                           resume_dir=root / "work")
    assert {s["router"] for s in report["sites"]} == {"gate"}
    (layer, head), = report["retrieval"]["heads"]  # retrieval heads work with the gate
    assert _thresholds(out)[report["sites"][layer]["name"]][head] == 1.0
    assert "training_free" in report["totals"]
    proto = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in (n for n in proto.graph.node if n.op_type == contract.OP_TYPE):
        wq = inits[node.input[contract.INPUTS.index("gate_q_weight")]]
        wk = inits[node.input[contract.INPUTS.index("gate_k_weight")]]
        assert wq.shape[2] == wk.shape[2] == 8 and wk.shape[1] == 3 * wq.shape[1]
    outs = [session(str(out), library=lib).run(None, _feeds())[0] for lib in (None, False)]
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-3, rtol=1e-3)


def test_vocab_size_from_the_embedding_table_when_there_is_no_logits_output():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["hidden"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", 4])],
        [numpy_helper.from_array(np.zeros((300, 4), np.float32), "table")])
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert cal.model_vocab_size(model) == 300


def test_folder_without_a_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(AsaExportError, match="holds no tokenizer"):
        cal.load_tokenizer(tmp_path)
    with pytest.raises(AsaExportError, match="does not exist"):
        cal.load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("seq_q, seq_kv, kw, pad", [
    (97, 300, dict(causal=True, window=70), True),      # past keys, causal window, padding
    (300, 100, dict(causal=True), False),               # more rows than keys: early rows see none
    (150, 150, dict(causal=False, softcap=2.0), True),
    (130, 130, dict(causal=False, window=40), False),
    (200, 200, dict(causal=True, block_size=128), False),
])
def test_block_mass_skips_only_invisible_keys(seq_q, seq_kv, kw, pad):
    """stats.block_mass computes each row chunk over its visible key span only: it must equal
    the block sums of the full masked softmax (float64) in every geometry."""
    from asa_export.contract import AsaAttributes, reference
    from asa_export.router import stats

    rng = np.random.default_rng(3)
    q = (rng.standard_normal((2, 4, seq_q, 16)) * 2).astype(np.float32)
    k = rng.standard_normal((2, 2, seq_kv, 16)).astype(np.float32)
    mask = None
    if pad:
        mask = np.ones((2, seq_kv), np.int64)
        mask[1, :seq_kv // 3] = 0
    attrs = AsaAttributes(**kw)
    b = attrs.block_size
    vis = reference.visibility(2, seq_q, seq_kv, attrs, mask)[:, None]
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64),
                  np.repeat(k, 2, axis=1).astype(np.float64)) / 4.0
    if attrs.softcap:
        s = attrs.softcap * np.tanh(s / attrs.softcap)
    s = np.where(vis, s, -np.inf)
    top = np.max(s, -1, keepdims=True)
    e = np.where(vis, np.exp(s - np.where(np.isfinite(top), top, 0)), 0)
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    nq, nk = -(-seq_q // b), -(-seq_kv // b)
    want = np.zeros((2, 4, nq, nk))
    for i in range(nq):
        for j in range(nk):
            want[:, :, i, j] = p[:, :, i * b:(i + 1) * b, j * b:(j + 1) * b].sum(-1).mean(-1)
    for chunk in (64, 512):
        np.testing.assert_allclose(stats.block_mass(q, k, attrs, mask, row_chunk=chunk), want,
                                   atol=2e-6)


def test_gate_thresholds_are_fitted_on_windows_the_gate_did_not_see():
    assert cal.gate_split(1) == ([0], [0])
    assert cal.gate_split(2) == ([0], [1])
    assert cal.gate_split(4) == ([0, 1], [2, 3])
    train, fit = cal.gate_split(5)
    assert train == [0, 1, 2] and fit == [3, 4] and not set(train) & set(fit)
