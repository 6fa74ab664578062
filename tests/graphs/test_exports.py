"""Every exportable variant: ONNX Runtime output matches the torch model on rows with a visible key.

Exports are cached (graphs.export); a cold cache costs a few seconds per TorchScript export and
10-30 s per dynamo export on 2 cores. SmolLM2 tests are marked slow.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import graphs  # noqa: E402
from asa_export.errors import AsaExportError  # noqa: E402
from graphs.variants import failure_reason  # noqa: E402

# fp32 exports of fp32 models, error relative to the output's magnitude on compared rows.
# Observed: tiny families <= 3.3e-6; SmolLM2 (30 layers) 6e-6 .. 7e-5.
RTOL = {"smollm2": 1e-3}
RTOL_TINY = 1e-4


def _param(variant):
    marks = [pytest.mark.slow] if variant in graphs.SLOW else []
    return pytest.param(variant, id="-".join(str(x) for x in variant), marks=marks)


def _shapes(variant):
    """(batch, seq, past) cases: prefill with padding, and decoding steps over a padded past."""
    if variant[3]:
        return [(2, 100, 0), (3, 7, 60), (2, 1, 130)]
    return [(2, 100, 0), (3, 37, 0)]


def _assert_close(name, got, want, where, rtol):
    scale = float(np.abs(want[where]).max())
    err = float(np.abs(got[where] - want[where]).max())
    assert np.isfinite(got[where]).all(), f"{name}: non-finite values on compared rows"
    assert err <= rtol * max(scale, 1.0), f"{name}: max abs error {err:.3g} vs magnitude {scale:.3g}"


@pytest.mark.parametrize("variant", [_param(v) for v in graphs.VARIANTS])
def test_variant_matches_torch(variant):
    family, exporter, attn, kv_cache = variant
    path = graphs.export(family, exporter, attn=attn, kv_cache=kv_cache)
    model, _ = graphs.build_model(family, attn)
    rtol = RTOL.get(family, RTOL_TINY)
    for batch, seq, past in _shapes(variant):
        feeds = graphs.sample_inputs(family, path, batch=batch, seq=seq, past=past)
        got = graphs.run_onnx(path, feeds)
        want = graphs.run_torch(family, feeds, attn=attn, kv_cache=kv_cache, model=model)
        assert len(got) == len(want)
        rows = graphs.rows_to_compare(family, feeds)
        assert rows.any()
        _assert_close("output", got[0], want[0], rows, rtol)
        # present = past ++ new keys; new positions from rows without a visible key differ
        # between frameworks (layer >= 1), so they are left out like those rows.
        positions = np.concatenate([np.ones((batch, past), bool), rows], axis=1)
        for g, w in zip(got[1:], want[1:]):
            assert g.shape == w.shape == (batch, graphs.family_spec(family).num_kv_heads, past + seq, g.shape[-1])
            _assert_close("present", g, w, np.broadcast_to(positions[:, None, :, None], g.shape), rtol)


@pytest.mark.parametrize("variant,reason", [pytest.param(v, r, id="-".join(map(str, v))) for v, r in graphs.REFUSED])
def test_refused_variant_still_fails(variant, reason, tmp_path):
    family, exporter, attn, kv_cache = variant
    with pytest.raises(Exception) as info:
        graphs.export_to(tmp_path / "x.onnx", family, exporter, attn=attn, kv_cache=kv_cache)
    assert failure_reason(info.value) == reason


def test_variants_cover_required_matrix():
    tiny = [f for f in graphs.FAMILIES if f != "smollm2"]
    for family in tiny:
        for exporter in graphs.EXPORTERS:
            for attn in graphs.ATTN_IMPLEMENTATIONS:
                assert (family, exporter, attn, False) in graphs.VARIANTS + [v for v, _ in graphs.REFUSED]
    kv = {(v[0], v[1]) for v in graphs.VARIANTS if v[3]}
    assert {("llama", e) for e in graphs.EXPORTERS} <= kv
    assert {("gpt2", e) for e in graphs.EXPORTERS} <= kv


def test_dynamo23_sdpa_emits_onnx_attention():
    path = graphs.export("llama", "dynamo23", attn="sdpa")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("Attention") == graphs.family_spec("llama").num_layers
    eager = [n.op_type for n in onnx.load(graphs.export("llama", "dynamo23", attn="eager")).graph.node]
    assert "Attention" not in eager and "Softmax" in eager


def test_exports_have_dynamic_axes():
    path = graphs.export("llama", "torchscript", kv_cache=True)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in onnx.load(path).graph.input}
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["attention_mask"] == ["batch", "total"]
    spec = graphs.family_spec("llama")
    assert inputs["past_key_values.0.key"] == ["batch", spec.num_kv_heads, "past", spec.head_dim]


def test_export_is_cached(tmp_path):
    first = graphs.export("gpt2", "torchscript", cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = graphs.export("gpt2", "torchscript", cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    other = graphs.export("gpt2", "torchscript", kv_cache=True, cache_dir=tmp_path)
    assert other != first


def test_concurrent_exports_share_one_file(tmp_path):
    """Two writers of one key: the producer runs once, the other waits and reuses its file."""
    from graphs.cache import cached_file

    calls = []

    def produce(path):
        calls.append(path)
        time.sleep(0.5)  # hold the lock while the other thread arrives
        onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), path)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: cached_file(tmp_path, "key", produce), range(2)))
    assert paths[0] == paths[1] == tmp_path / "key.onnx"
    assert len(calls) == 1
    assert sorted(f for f in os.listdir(tmp_path) if not f.endswith(".lock")) == ["key.onnx"]
    onnx.checker.check_model(str(paths[0]))


def test_new_export_replaces_other_versions(tmp_path):
    from graphs.cache import cached_file

    for name in ("llama-dynamo-eager-kv-000000000000.onnx", "llama-dynamo-eager-kv-000000000000.lock",
                 "llama-dynamo23-eager-kv-000000000000.onnx"):
        (tmp_path / name).write_bytes(b"old")
    cached_file(tmp_path, "llama-dynamo-eager-kv-111111111111", lambda p: p.write_bytes(b"new"))
    left = sorted(f for f in os.listdir(tmp_path) if not f.endswith(".lock"))
    assert left == ["llama-dynamo-eager-kv-111111111111.onnx", "llama-dynamo23-eager-kv-000000000000.onnx"]


def test_failed_export_leaves_nothing(tmp_path):
    from graphs.cache import cached_file

    def produce(path):
        path.write_bytes(b"half")
        raise RuntimeError("exporter failed")

    with pytest.raises(RuntimeError):
        cached_file(tmp_path, "key", produce)
    assert [f for f in os.listdir(tmp_path) if not f.endswith(".lock")] == []


def test_sample_inputs_padding_and_positions():
    feeds = graphs.sample_inputs("llama", ("llama", "dynamo", "eager", True), batch=3, seq=5, past=20)
    assert list(feeds)[:3] == ["input_ids", "attention_mask", "position_ids"]
    mask = feeds["attention_mask"]
    assert mask.shape == (3, 25) and mask[0].all() and mask[1, 0] == 0 and mask[1, -1] == 1  # left padded
    assert feeds["past_key_values.1.value"].shape == (3, 2, 20, 16)
    # positions count real tokens only
    np.testing.assert_array_equal(feeds["position_ids"][1], mask[1].sum() - 5 + np.arange(5))
    bert = graphs.sample_inputs("bert", ("bert", "dynamo", "eager", False), batch=2, seq=10)
    assert list(bert) == ["input_ids", "attention_mask"]
    assert bert["attention_mask"][1, 0] == 1 and bert["attention_mask"][1, -1] == 0  # right padded


def test_sample_inputs_rejects_bad_requests():
    with pytest.raises(AsaExportError, match="KV-cache"):
        graphs.sample_inputs("llama", ("llama", "dynamo", "eager", False), past=4)
    with pytest.raises(AsaExportError, match="unknown model family"):
        graphs.sample_inputs("opt", ("opt", "dynamo", "eager", False))
    with pytest.raises(AsaExportError, match="no KV-cache"):
        graphs.export("bert", "dynamo", kv_cache=True)
    with pytest.raises(AsaExportError, match="unknown exporter"):
        graphs.export("llama", "tflite")


def test_visible_rows_window_and_padding():
    mask = np.array([[0, 0, 1, 1, 1, 1]])
    # causal, last 4 rows are queries at positions 2..5: all see key 2 or later
    assert graphs.visible_rows(mask, 6, causal=True).tolist() == [[False, False, True, True, True, True]]
    # window 1: each row sees only itself
    assert graphs.visible_rows(mask, 6, causal=True, window=1).tolist() == [[False, False, True, True, True, True]]
    # bidirectional: every row sees the real keys
    assert graphs.visible_rows(mask, 6, causal=False).all()
    # mistral's window really masks keys at the test length
    assert graphs.family_spec("mistral").window < 100


def test_models_are_deterministic():
    a, _ = graphs.build_model("qwen2")
    b, _ = graphs.build_model("qwen2")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert a.model.layers[0].self_attn.q_proj.bias is not None  # qwen2's qkv bias
    spec = graphs.family_spec("llama")
    assert spec.num_heads > spec.num_kv_heads  # GQA


def test_cli_exports_one(tmp_path):
    out = tmp_path / "x.onnx"
    env = dict(os.environ, ASA_GRAPHS_CACHE=str(graphs.default_cache_dir()))
    run = subprocess.run([sys.executable, "-m", "graphs", "--family", "llama", "--exporter", "torchscript",
                          "--out", str(out)], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(graphs.__file__)))
    assert run.returncode == 0, run.stderr
    onnx.checker.check_model(str(out))
    bad = subprocess.run([sys.executable, "-m", "graphs", "--family", "llama", "--out", str(out), "--exporter", "x"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(graphs.__file__)))
    assert bad.returncode == 2


def test_default_model_runs():
    path = graphs.default_model(graphs.default_cache_dir() / "demo")
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    feeds = graphs.sample_inputs("llama_demo", path, batch=1, seq=300)
    logits = graphs.run_onnx(path, feeds)[0]
    assert logits.shape == (1, 300, 512) and np.isfinite(logits).all()


def test_smollm2_gguf_shapes():
    pytest.importorskip("gguf")
    spec = graphs.family_spec("smollm2")
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)


@pytest.mark.slow
def test_smollm2_loads_and_predicts():
    from graphs import smollm2

    model, config = graphs.build_model("smollm2")
    assert config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    tokenizer = smollm2.load_tokenizer()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"
