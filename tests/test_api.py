"""asa_export.api: export / inspect / check as the CLI composes them."""

from __future__ import annotations

import importlib.util
import json
import os

import onnx
import pytest

from asa_export import api, io
from asa_export.contract import DOMAIN, OP_TYPE
from asa_export.errors import AsaExportError
from asa_export.passes.pipeline import RewriteOptions
from asa_export.report import Rejection, Report
from cli.helpers import cached_default_model, digest, listing, mlp_model


@pytest.fixture(scope="module")
def default_model(tmp_path_factory) -> str:
    return cached_default_model(tmp_path_factory)


def asa_nodes(path) -> list[onnx.NodeProto]:
    proto = onnx.load(os.fspath(path), load_external_data=False)
    return [n for n in proto.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_engine_output_without_tensorrt_names_what_works(tmp_path):
    model = mlp_model(tmp_path / "m.onnx")
    for suffix in (".plan", ".engine"):
        with pytest.raises(AsaExportError, match=r"--out model\.asa\.onnx") as info:
            api.export(model, tmp_path / f"out{suffix}")
        assert "pip install 'tensorrt" in str(info.value)
    assert listing(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize("options, word", [
    (RewriteOptions(block_size=32), "block_size"),
    (RewriteOptions(threshold=0.0), "threshold"),
    (RewriteOptions(threshold=float("nan")), "threshold"),
    (RewriteOptions(sink_blocks=-1), "sink_blocks"),
    (RewriteOptions(select_per=2), "select_per"),
])
def test_invalid_options(tmp_path, options, word):
    model = mlp_model(tmp_path / "m.onnx")
    with pytest.raises(AsaExportError, match=word):
        api.export(model, tmp_path / "out.onnx", options)
    assert listing(tmp_path) == ["m.onnx"]


def test_output_problems_are_found_before_loading(tmp_path, monkeypatch):
    model = mlp_model(tmp_path / "m.onnx")

    def no_load(path):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(io, "load_model", no_load)
    with pytest.raises(AsaExportError, match="is the input file"):
        api.export(model, model)
    with pytest.raises(AsaExportError, match="does not exist"):
        api.export(model, tmp_path / "missing" / "out.onnx")
    with pytest.raises(AsaExportError, match="same file"):
        api.export(model, tmp_path / "out.onnx", report_path=tmp_path / "out.onnx")


def test_model_without_attention(tmp_path):
    model = mlp_model(tmp_path / "m.onnx")
    sha = digest(model)
    with pytest.raises(AsaExportError, match="no attention site found"):
        api.export(model, tmp_path / "out.onnx", report_path=tmp_path / "r.json")
    assert listing(tmp_path) == ["m.onnx"] and digest(model) == sha
    report = api.inspect(model)
    assert report.sites == [] and report.model == model


def test_no_site_message_lists_every_rejection():
    report = Report(rejected=[Rejection("Softmax_3", "softmax_attention", "bias is not finite"),
                              Rejection("Softmax_9", "softmax_attention", "scores not Q.K^T")])
    message = api.no_site_message("m.onnx", report)
    assert "Softmax_3 (softmax_attention): bias is not finite" in message
    assert "Softmax_9 (softmax_attention): scores not Q.K^T" in message


def test_export_default_model(tmp_path, default_model):
    hashes = {p: digest(p) for p in io.model_files(io.load_model(default_model))}
    out, report_path = tmp_path / "m.asa.onnx", tmp_path / "report.json"
    report = api.export(default_model, out, RewriteOptions(threshold=0.9), report_path=report_path)
    assert report.sites, "the default model has attention"
    nodes = asa_nodes(out)
    assert len(nodes) == len(report.sites)
    assert {n.name for n in nodes} == {s.name for s in report.sites}
    assert report.options["threshold"] == 0.9 and report.output == os.fspath(out)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["threshold"] == pytest.approx(0.9) and attrs["block_size"] == 64
    assert json.loads(report_path.read_text()) == json.loads(report.to_json())
    onnx.checker.check_model(os.fspath(out), full_check=True)
    assert {p: digest(p) for p in hashes} == hashes
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_inspect_matches_export(tmp_path, default_model):
    found = api.inspect(default_model)
    done = api.export(default_model, tmp_path / "m.asa.onnx")
    key = [(s.layer, s.rule, s.q_heads, s.kv_heads, s.head_dim, s.causal) for s in found.sites]
    assert key == [(s.layer, s.rule, s.q_heads, s.kv_heads, s.head_dim, s.causal)
                   for s in done.sites]


def test_external_data_model_round_trip(tmp_path, default_model):
    proto = onnx.load(default_model)
    src = tmp_path / "ext.onnx"
    onnx.save(proto, src, save_as_external_data=True, location="ext.weights", size_threshold=512)
    hashes = {p: digest(p) for p in (src, tmp_path / "ext.weights")}
    api.export(src, tmp_path / "out.onnx")
    assert os.path.exists(tmp_path / "out.onnx.data")
    assert {p: digest(p) for p in hashes} == hashes


def test_dense_rewrite_has_parity(tmp_path, default_model):
    out = tmp_path / "dense.asa.onnx"
    api.export(default_model, out, RewriteOptions(threshold=1.0))
    result = api.check(default_model, out, library=False)
    assert result.passed, result.outputs
    assert result.density and all(layer.density == 1.0 for layer in result.density)


def test_library_imports_neither_cli_nor_heavy_dependencies():
    import subprocess
    import sys

    code = ("import sys, asa_export.api, asa_export.check, asa_export.io; "
            "print(sorted(m for m in ('asa_export.cli', 'torch', 'tensorrt', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_report_json_carries_per_head_thresholds(tmp_path, default_model):
    """Per-head thresholds (numpy arrays, as calibrate passes them) reach the JSON report."""
    import numpy as np

    heads = api.inspect(default_model).sites[0].q_heads
    taus = {0: np.linspace(0.9, 0.95, heads, dtype=np.float32)}
    report_path = tmp_path / "r.json"
    api.export(default_model, tmp_path / "m.asa.onnx", RewriteOptions(head_thresholds=taus),
               report_path=report_path)
    data = json.loads(report_path.read_text())
    assert data["options"]["head_thresholds"]["0"] == pytest.approx(taus[0].tolist())
