"""Child process of test_tensorrt.py: everything that needs TensorRT-RTX, in one process.

TensorRT-RTX's parser dlopens `libtensorrt_rtx.so`, found only through LD_LIBRARY_PATH as it was
when the process started, so the test runs this script with that variable set. It prints one
JSON object of observations; the test asserts on them.

    python rtx_probe.py PLUGIN_LIBRARY WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "passes")]

from attention_graphs import build  # noqa: E402

from asa_export import contract, io  # noqa: E402
from asa_export.errors import AsaExportError  # noqa: E402
from asa_export.passes.pipeline import rewrite_model  # noqa: E402
from asa_export.runtime import tensorrt as art  # noqa: E402


def rewritten(work: Path) -> Path:
    model = ir.from_proto(build(hq=4, hkv=2, d=16, mask="causal+padding"))
    rewrite_model(model)
    path = work / "model.asa.onnx"
    io.save_model(model, path)
    return path


def single_node(work: Path, name: str, inputs: list[str], outputs: list[str],
                initializers=(), **attrs) -> Path:
    """A model of one hand-written ASA node: q [B,4,S,16], k/v [B,2,S,16], bias [1,4,S,S];
    `initializers` are constant inputs (TensorProtos, e.g. the learned gate's weights)."""
    values = contract.AsaAttributes(causal=True, threshold=0.9).as_onnx_attributes()
    values.update(attrs)
    node = helper.make_node(contract.OP_TYPE, inputs, outputs, name="asa0",
                            domain=contract.DOMAIN, plugin_namespace="asa", plugin_version="1",
                            **values)
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    shapes = {"q": ["B", 4, "S", 16], "k": ["B", 2, "S", 16], "v": ["B", 2, "S", 16],
              "bias": [1, 4, "S", "S"]}
    out_types = {"out": (f, ["B", 4, "S", 16]), "idx": (i32, None), "cnt": (i32, None),
                 "vis": (i32, None)}
    constant = {t.name for t in initializers}
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, f, shapes[n]) for n in inputs if n and n not in constant],
        [helper.make_tensor_value_info(n, *out_types[n]) for n in outputs if n],
        initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("asa", 1)])
    path = work / f"{name}.asa.onnx"
    onnx.save(model, path)
    return path


def bias_without_mask(work: Path) -> Path:
    """An ASA node whose mask slot is empty and whose bias slot is set (a gap in the inputs)."""
    return single_node(work, "bias", ["q", "k", "v", "", "bias"], ["out"])


def gated(work: Path, name: str, dg_k: int = 8) -> Path:
    """One ASA node with the learned gate as constants: gate_q [4, 16, 8], gate_k [2, 48, dg_k]
    (dg_k != 8 breaks the contract), after an empty mask / bias / thresholds gap."""
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor("wq", TensorProto.FLOAT, [4, 16, 8],
                                  rng.standard_normal(4 * 16 * 8).astype(np.float32)),
               helper.make_tensor("wk", TensorProto.FLOAT, [2, 48, dg_k],
                                  rng.standard_normal(2 * 48 * dg_k).astype(np.float32))]
    return single_node(work, name, ["q", "k", "v", "", "", "", "wq", "wk"], ["out"], weights)


def parse(trt, path: Path) -> dict:
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plugins = [l for l in layers if l.type == trt.LayerType.PLUGIN_V3]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    return {
        "outputs": {t.name: [list(t.shape), str(t.dtype)] for t in outputs},
        "ok": bool(ok),
        "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)],
        "plugin_layers": len(plugins),
        "plugin_input_types": [[str(l.get_input(i).dtype) for i in range(l.num_inputs)]
                               for l in plugins],
    }


def engine_copy(model_path: Path, work: Path, precision: str) -> Path:
    model = io.load_model(model_path)
    art.prepare_for_engine(model, precision)
    out = work / f"copy_{precision}.onnx"
    io.save_model(model, out)
    return out


def build_case(model: Path, work: Path, name: str, target: str = "SM89", **kw) -> dict:
    engine = work / f"{name}.plan"
    try:
        art.build_engine(model, engine, backend="tensorrt-rtx", target=target, max_seq=256,
                         max_batch=2, **kw)
    except AsaExportError as exc:
        return {"error": str(exc), "written": engine.exists()}
    sidecar = json.loads(engine.with_name(engine.name + ".json").read_text())
    data = engine.read_bytes()
    return {"bytes": len(data), "sidecar": sidecar,
            "has_field_collection": b"PluginFieldCollection" in data}


def main() -> None:
    library, work = Path(sys.argv[1]), Path(sys.argv[2])
    trt = art.import_tensorrt("tensorrt-rtx")
    out = {"version": trt.__version__}
    model, gap = rewritten(work), bias_without_mask(work)
    # Before our library is registered: what the parser does with the function alone.
    out["without_plugin"] = parse(trt, model)
    # A plain dlopen (Polygraphy --plugins) must neither crash nor touch TensorRT-RTX's registry.
    import ctypes

    ctypes.CDLL(str(library))
    registry = trt.get_plugin_registry()
    out["dlopen_registered"] = registry.get_creator(contract.OP_TYPE, "1", "asa") is not None
    art.load_plugin(trt, library)
    out["with_plugin_functions_kept"] = parse(trt, model)
    out["engine_copy_fp16"] = parse(trt, engine_copy(model, work, "fp16"))
    out["engine_copy_gap"] = parse(trt, engine_copy(gap, work, "fp16"))
    for precision in ("fp16", "bf16", "fp32"):
        out[f"build_{precision}"] = build_case(model, work, precision, precision=precision,
                                               plugin_library=library)
    telemetry = single_node(work, "telemetry", ["q", "k", "v"], ["out", "idx", "cnt", "vis"],
                            select_per=1, block_size=64)
    out["engine_copy_telemetry"] = parse(trt, engine_copy(telemetry, work, "fp16"))
    out["build_telemetry"] = build_case(telemetry, work, "telemetry", precision="fp16",
                                        plugin_library=library)
    bad = single_node(work, "bad", ["q", "k", "v"], ["out"], block_size=96)
    out["bad_attribute"] = parse(trt, engine_copy(bad, work, "fp32"))
    out["build_gap_bf16"] = build_case(gap, work, "gap", precision="bf16", plugin_library=library)
    out["build_not_embedded"] = build_case(model, work, "bare", precision="fp16",
                                           plugin_library=library, embed_plugin=False)
    out["build_sm90"] = build_case(model, work, "sm90", precision="fp16", plugin_library=library,
                                   target="SM90")
    out["build_static_too_small"] = build_case(
        model, work, "badshape", precision="fp16", plugin_library=library,
        min_shapes={"q": (1, 4, 1, 16)}, opt_shapes={"q": (1, 4, 8, 16)},
        max_shapes={"q": (1, 4, 16, 8)})
    gate = gated(work, "gate")
    out["engine_copy_gate"] = parse(trt, engine_copy(gate, work, "fp16"))
    for precision in ("fp32", "fp16"):
        out[f"build_gate_{precision}"] = build_case(gate, work, f"gate_{precision}",
                                                    precision=precision, plugin_library=library)
    out["build_gate_bad_shape"] = build_case(gated(work, "gate_bad", dg_k=5), work, "gate_bad",
                                             precision="fp32", plugin_library=library)
    out["library_bytes"] = library.stat().st_size
    print("\n" + json.dumps(out))  # last line; TensorRT's logger writes to stdout too


if __name__ == "__main__":
    np.random.seed(0)
    main()
