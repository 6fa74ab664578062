"""asa_export.io: round trips with and without external data, atomic saves, clear load errors."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from asa_export import io
from asa_export.errors import AsaExportError
from cli.helpers import digest, listing, mlp_model


def run(path, seed=1):
    rng = np.random.default_rng(seed)
    mask = np.ones((2, 5), np.int64)
    mask[1, :2] = 0
    feed = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32), "attention_mask": mask}
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"]).run(
        None, feed)[0]


def external_locations(path) -> set[str]:
    proto = onnx.load(os.fspath(path), load_external_data=False)
    return {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }


def test_round_trip_inline(tmp_path):
    src = mlp_model(tmp_path / "in.onnx")
    model = io.load_model(src)
    io.save_model(model, tmp_path / "out.onnx")
    assert listing(tmp_path) == ["in.onnx", "out.onnx"]
    np.testing.assert_array_equal(run(tmp_path / "out.onnx"), run(src))
    onnx.checker.check_model(os.fspath(tmp_path / "out.onnx"), full_check=True)


def test_round_trip_external_data_keeps_external_and_moves_with_output(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = mlp_model(tmp_path / "a" / "in.onnx", external=True)
    hashes = {p: digest(p) for p in (src, src + ".data")}
    model = io.load_model(src)
    io.save_model(model, tmp_path / "b" / "out.onnx")
    assert listing(tmp_path / "b") == ["out.onnx", "out.onnx.data"]
    # The output refers to its own data file, relative to itself, never to the input's.
    assert external_locations(tmp_path / "b" / "out.onnx") == {"out.onnx.data"}
    np.testing.assert_array_equal(run(tmp_path / "b" / "out.onnx"), run(src))
    assert {p: digest(p) for p in hashes} == hashes


def test_load_is_independent_of_the_working_directory(tmp_path, monkeypatch):
    src = mlp_model(tmp_path / "in.onnx", external=True)
    monkeypatch.chdir(tmp_path)
    model = io.load_model("in.onnx")
    monkeypatch.chdir("/")
    weight = model.graph.initializers["W"].const_value.numpy()
    assert weight.shape == (16, 16)
    assert io.model_files(model) == [src, src + ".data"]


def test_external_data_forced_and_automatic(tmp_path, monkeypatch):
    src = mlp_model(tmp_path / "in.onnx")
    model = io.load_model(src)
    io.save_model(model, tmp_path / "forced.onnx", external_data=True)
    assert external_locations(tmp_path / "forced.onnx") == {"forced.onnx.data"}
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    io.save_model(model, tmp_path / "auto.onnx")
    assert os.path.exists(tmp_path / "auto.onnx.data")
    np.testing.assert_array_equal(run(tmp_path / "auto.onnx"), run(src))


def test_external_input_saved_inline_on_request(tmp_path):
    src = mlp_model(tmp_path / "in.onnx", external=True)
    model = io.load_model(src)
    io.save_model(model, tmp_path / "inline.onnx", external_data=False)
    assert external_locations(tmp_path / "inline.onnx") == set()
    assert not os.path.exists(tmp_path / "inline.onnx.data")
    np.testing.assert_array_equal(run(tmp_path / "inline.onnx"), run(src))
    # The in-memory model still reads its weights from the input's data file.
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)


def test_failed_save_leaves_nothing_and_keeps_an_existing_output(tmp_path, monkeypatch):
    src = mlp_model(tmp_path / "in.onnx", external=True)
    model = io.load_model(src)
    (tmp_path / "out.onnx").write_bytes(b"previous output")
    before = listing(tmp_path)

    def broken_save(model, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(AsaExportError, match="No space left"):
        io.save_model(model, tmp_path / "out.onnx")
    assert listing(tmp_path) == before
    assert (tmp_path / "out.onnx").read_bytes() == b"previous output"


def test_too_large_for_one_protobuf_is_a_clear_error(tmp_path, monkeypatch):
    from google.protobuf.message import EncodeError

    model = io.load_model(mlp_model(tmp_path / "in.onnx"))

    def too_large(model, path, **kwargs):
        raise EncodeError("Failed to serialize proto")

    monkeypatch.setattr(ir, "save", too_large)
    with pytest.raises(AsaExportError, match="too large for one protobuf file"):
        io.save_model(model, tmp_path / "out.onnx", external_data=False)
    assert listing(tmp_path) == ["in.onnx"]


def test_failed_rename_takes_back_the_data_file(tmp_path, monkeypatch):
    src = mlp_model(tmp_path / "in.onnx", external=True)
    model = io.load_model(src)
    before = listing(tmp_path)
    real_replace = os.replace

    def replace(a, b):
        if os.fspath(b).endswith("out.onnx"):
            raise OSError(5, "Input/output error")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(AsaExportError, match="Input/output error"):
        io.save_model(model, tmp_path / "out.onnx")
    assert listing(tmp_path) == before


def test_save_refuses_the_input_and_its_data(tmp_path):
    src = mlp_model(tmp_path / "in.onnx", external=True)
    model = io.load_model(src)
    for target in (src, src + ".data", tmp_path / "sub" / ".." / "in.onnx"):
        with pytest.raises(AsaExportError, match="is the input file"):
            io.save_model(model, target)
    # A new output whose data file would be the input's data file.
    other = mlp_model(tmp_path / "other.onnx", external=True, location="shared.onnx.data")
    sha = digest(tmp_path / "shared.onnx.data")
    with pytest.raises(AsaExportError, match="is the input file"):
        io.save_model(io.load_model(other), tmp_path / "shared.onnx")
    assert digest(tmp_path / "shared.onnx.data") == sha
    assert not os.path.exists(tmp_path / "shared.onnx")


@pytest.mark.parametrize("content, message", [
    (b"", "not an ONNX model"),
    (b"\x08\x07" + b"\xff" * 40, "not a readable ONNX model"),
    ("plain text\n" * 30, "not (an|a readable) ONNX model"),
], ids=["empty", "binary", "text"])
def test_load_rejects_non_models(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    with pytest.raises(AsaExportError, match=message):
        io.load_model(path)


def test_load_rejects_truncated_and_missing_pieces(tmp_path):
    src = mlp_model(tmp_path / "in.onnx", external=True)
    data = src + ".data"
    with open(data, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(AsaExportError, match="truncated"):
        io.load_model(src)
    os.unlink(data)
    with pytest.raises(AsaExportError, match=r"in\.onnx\.data.*missing"):
        io.load_model(src)
    with pytest.raises(AsaExportError, match="no such file"):
        io.load_model(tmp_path / "absent.onnx")
    with pytest.raises(AsaExportError, match="is a directory"):
        io.load_model(tmp_path)


def test_write_text_atomic(tmp_path):
    io.write_text_atomic(tmp_path / "r.json", "{}\n")
    assert (tmp_path / "r.json").read_text() == "{}\n"
    assert listing(tmp_path) == ["r.json"]
    with pytest.raises(AsaExportError, match="does not exist"):
        io.write_text_atomic(tmp_path / "missing" / "r.json", "{}")


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            pathlib.Path(tmp).write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["out.bin"]
    with io.atomic_path(target, suffix=".npz") as tmp:
        assert tmp.endswith(".npz") and os.path.dirname(tmp) == str(tmp_path)
        pathlib.Path(tmp).write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert listing(tmp_path) == ["out.bin"]
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~mask
