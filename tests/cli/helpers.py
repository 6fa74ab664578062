"""Helpers of the CLI, io, api and check tests: tiny models built inline, the console script."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ASA_EXPORT = shutil.which("asa-export")


def mlp_model(path, *, scale: float = 1.0, external: bool = False, seed: int = 0,
              location: str | None = None) -> str:
    """x [B, S, 16], attention_mask [B, S] -> Relu(x @ W) * mask: no attention anywhere."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((16, 16)) * scale).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"]),
        helper.make_node("Relu", ["y"], ["z"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last"], ["mask_u"]),
        helper.make_node("Mul", ["z", "mask_u"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 16]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", 16])],
        [numpy_helper.from_array(weight, "W"),
         numpy_helper.from_array(np.array([-1], np.int64), "last")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = os.fspath(path)
    if external:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=location or os.path.basename(path) + ".data", size_threshold=512)
    else:
        onnx.save(model, path)
    return path


def digest(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def listing(directory) -> list[str]:
    """Every entry under `directory`, hidden temporaries included."""
    found = []
    for root, dirs, files in os.walk(directory):
        found += [os.path.relpath(os.path.join(root, n), directory) for n in dirs + files]
    return sorted(found)


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user would."""
    assert ASA_EXPORT, "the asa-export console script is not installed (pip install -e .)"
    return subprocess.run([ASA_EXPORT, *map(os.fspath, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def cached_default_model(tmp_path_factory) -> str:
    """graphs.default_model, exported once per test session (shared by every test module)."""
    import graphs

    directory = tmp_path_factory.getbasetemp() / "default_model"
    done = directory / "PATH"
    if not done.exists():
        directory.mkdir(exist_ok=True)
        done.write_text(os.fspath(graphs.default_model(directory)))
    return done.read_text()
