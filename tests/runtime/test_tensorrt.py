"""asa_export.runtime.tensorrt: the engine copy, profiles, errors, and a real parse + plugin +
build through TensorRT-RTX on the CPU (ahead of time for SM89; no GPU needed).

The TensorRT-RTX part runs tests/runtime/rtx_probe.py once in a child process (its parser needs
LD_LIBRARY_PATH set at process start) and checks its observations. It needs the plugin library
(nvcc + kernel-lens headers, cached under .cache/asa_trt/) and the TensorRT-RTX wheels
`tensorrt-rtx-cu13-libs` + `tensorrt-rtx-cu13-bindings`; it skips with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from asa_export import contract, io
from asa_export.errors import AsaExportError
from asa_export.runtime import tensorrt as art
from tests.passes.attention_graphs import build

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------- engine copy

def test_engine_copy_drops_functions_and_marks_slots(rewritten):
    assert rewritten.functions
    assert art.prepare_for_engine(rewritten, "fp16") == 1
    node = art.asa_nodes(rewritten)[0]
    assert not [k for k in rewritten.functions if k[0] == contract.DOMAIN]
    assert node.overload == ""
    assert node.attributes["optional_inputs"].value == 1  # key_padding_mask only
    assert node.attributes["telemetry_outputs"].value == 0
    assert [v.dtype for v in node.inputs[:3]] == [ir.DataType.FLOAT16] * 3
    assert node.inputs[3].dtype == ir.DataType.INT64  # the mask keeps its type
    assert rewritten.graph.outputs[0].dtype == ir.DataType.FLOAT  # services bind fp32 buffers


def test_engine_copy_closes_gaps_in_optional_inputs():
    node = helper.make_node(contract.OP_TYPE, ["q", "k", "v", "", "", "tau"], ["out"],
                            domain=contract.DOMAIN, name="asa0")
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, [1, 2, 8, 4]) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info("tau", f, [2]))
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("out", f, [1, 2, 8, 4])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid(contract.DOMAIN, 1)]))
    art.prepare_for_engine(model, "bf16")
    asa = art.asa_nodes(model)[0]
    assert [v.name for v in asa.inputs] [:3] == ["q/bfloat16", "k/bfloat16", "v/bfloat16"]
    assert asa.inputs[3].name == "tau" and asa.inputs[3].dtype == ir.DataType.FLOAT
    assert len(asa.inputs) == 4
    assert asa.attributes["optional_inputs"].value == 4  # head_thresholds only


def _gated_node_model(precision: str) -> ir.Model:
    """One ASA node with the learned gate (constants) and head_thresholds, engine copy made."""
    node = helper.make_node(contract.OP_TYPE, ["q", "k", "v", "", "", "tau", "wq", "wk"],
                            ["out"], domain=contract.DOMAIN, name="asa0")
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, [1, 2, 8, 4]) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info("tau", f, [2]))
    weights = [helper.make_tensor("wq", f, [2, 4, 3], [0.5] * 24),
               helper.make_tensor("wk", f, [2, 12, 3], [0.25] * 72)]
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("out", f, [1, 2, 8, 4])],
                              initializer=weights)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid(contract.DOMAIN, 1)]))
    art.prepare_for_engine(model, precision)
    return model


def test_engine_copy_wires_the_learned_gate():
    """Inputs 6-7 follow the thresholds without gaps; optional_inputs has their bits (8, 16)."""
    asa = art.asa_nodes(_gated_node_model("fp32"))[0]
    assert [v.name for v in asa.inputs] == ["q", "k", "v", "tau", "wq", "wk"]
    assert asa.attributes["optional_inputs"].value == 4 | 8 | 16


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_engine_copy_keeps_the_gate_in_float32(precision):
    """SPEC: the gate weights are float32 whatever the attention precision (the plugin accepts
    only kFLOAT there), like head_thresholds."""
    asa = art.asa_nodes(_gated_node_model(precision))[0]
    assert [v.dtype for v in asa.inputs[3:]] == [ir.DataType.FLOAT] * 3


def test_model_without_asa_nodes_is_refused():
    model = ir.from_proto(build(mask="none"))
    with pytest.raises(AsaExportError, match="no AdaptiveSparseAttention nodes"):
        art.prepare_for_engine(model, "fp16")


def test_unsupported_precision_is_refused(rewritten):
    with pytest.raises(AsaExportError, match="unsupported precision 'int8'"):
        art.prepare_for_engine(rewritten, "int8")


# ---------------------------------------------------------------------------- profiles

def test_default_profile_from_max_seq(rewritten):
    profiles = art.make_profiles(rewritten, max_seq=512, max_batch=4)
    assert profiles["q"] == art.Profile((1, 4, 1, 16), (2, 4, 256, 16), (4, 4, 512, 16))
    assert profiles["attention_mask"].max == (4, 512)


def test_dynamic_model_needs_shapes(rewritten):
    with pytest.raises(AsaExportError, match="--max-seq"):
        art.make_profiles(rewritten)


def test_explicit_shapes_are_checked(rewritten):
    shapes = art.parse_shapes("q:1x4x8x16,k:1x2x8x16")
    assert shapes["q"] == (1, 4, 8, 16)
    with pytest.raises(AsaExportError, match="min, opt and max"):
        art.make_profiles(rewritten, min_shapes=shapes, max_seq=64)
    with pytest.raises(AsaExportError, match="not a model input"):
        art.make_profiles(rewritten, min_shapes={"x": (1,)}, opt_shapes={"x": (1,)},
                          max_shapes={"x": (1,)}, max_seq=64)
    with pytest.raises(AsaExportError, match="fixed at 4"):
        bad = {"q": (1, 8, 8, 16)}
        art.make_profiles(rewritten, min_shapes=bad, opt_shapes=bad, max_shapes=bad, max_seq=64)
    with pytest.raises(AsaExportError, match="NAME:DxDxD"):
        art.parse_shapes("q=1x2")


def test_shapes_outside_the_profile_are_refused():
    profiles = {"q": {"min": [1, 4, 1, 16], "max": [2, 4, 256, 16]}}
    art.check_shapes_in_profile(profiles, {"q": (2, 4, 256, 16)})
    with pytest.raises(AsaExportError, match="outside the engine's profile"):
        art.check_shapes_in_profile(profiles, {"q": (1, 4, 257, 16)})


# ---------------------------------------------------------------------- missing software

@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_missing_tensorrt_names_the_install_and_the_onnx_route(tmp_path, rewritten):
    io.save_model(rewritten, tmp_path / "m.asa.onnx")
    with pytest.raises(AsaExportError) as info:
        art.build_engine(tmp_path / "m.asa.onnx", tmp_path / "m.plan", max_seq=64)
    assert "pip install" in str(info.value) and "--out model.asa.onnx" in str(info.value)
    assert not list(tmp_path.glob("m.plan*"))


def test_missing_plugin_library_says_how_to_build(tmp_path):
    with pytest.raises(AsaExportError, match="does not exist"):
        art.plugin_library_path(tmp_path / "nope.so")


# -------------------------------------------------------------------- TensorRT-RTX on CPU

@pytest.fixture(scope="module")
def rtx_setup() -> tuple[Path, dict]:
    """(plugin library, environment with TensorRT-RTX's loader link on LD_LIBRARY_PATH)."""
    if importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        pytest.skip("needs `pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`")
    if shutil.which("nvcc") is None or importlib.util.find_spec("kernel_lens") is None:
        pytest.skip("building the plugin needs nvcc and `pip install kernel-lens`")
    spec = importlib.util.spec_from_file_location("build_trt_plugin",
                                                  REPO / "tools" / "build_trt_plugin.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    library = builder.cached_build(archs="90a")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{art.rtx_loader_dir()}:{env.get('LD_LIBRARY_PATH', '')}"
    return library, env


@pytest.fixture(scope="module")
def rtx(rtx_setup, tmp_path_factory) -> dict:
    library, env = rtx_setup
    work = tmp_path_factory.mktemp("rtx")
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("rtx_probe.py")),
                             str(library), str(work)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_rtx_parser_prefers_our_plugin_over_the_function(rtx):
    """The rewritten model as written (functions, IR >= 10, overloads) parses into one
    IPluginV3 layer once libasa_trt.so is registered (op_type + plugin_namespace/version)."""
    assert rtx["with_plugin_functions_kept"]["ok"]
    assert rtx["with_plugin_functions_kept"]["plugin_layers"] == 1


def test_rtx_plain_dlopen_leaves_the_registry_alone(rtx):
    """Self-registration is for libnvinfer only (TensorRT-RTX's registry vtable differs)."""
    assert rtx["dlopen_registered"] is False


def test_rtx_parser_without_plugin_fails_loudly(rtx):
    """Without the plugin the parser tries the model-local function and rejects it: reported,
    never a silent dense engine (the engine copy has no function at all)."""
    assert not rtx["without_plugin"]["ok"]
    assert "checkLocalFunctionImporter" in rtx["without_plugin"]["errors"][0]


def test_rtx_plugin_sees_half_inputs_after_fp16_conversion(rtx):
    assert rtx["engine_copy_fp16"]["plugin_input_types"] == [
        ["DataType.HALF"] * 3 + ["DataType.INT64"]]
    assert rtx["engine_copy_gap"]["plugin_input_types"] == [["DataType.HALF"] * 4]  # q k v bias


@pytest.mark.parametrize("case", ["build_fp16", "build_bf16", "build_fp32", "build_gap_bf16"])
def test_rtx_builds_sm89_engines_with_the_plugin_embedded(rtx, case):
    built = rtx[case]
    assert "error" not in built, built.get("error")
    assert built["has_field_collection"]  # the plugin's serialized fields are in the plan
    assert built["bytes"] > rtx["library_bytes"]  # the library travels inside the engine
    assert built["sidecar"]["plugin"]["embedded"] is True
    assert built["sidecar"]["asa_nodes"] == 1
    assert built["sidecar"]["profiles"]["q"]["max"] == [2, 4, 256, 16]


def test_rtx_engine_without_embedding_is_small(rtx):
    assert rtx["build_not_embedded"]["bytes"] < rtx["library_bytes"]


def test_rtx_cannot_target_hopper_and_writes_nothing(rtx):
    assert "SM90" in rtx["build_sm90"]["error"]
    assert rtx["build_sm90"]["written"] is False
    assert rtx["build_static_too_small"]["written"] is False


def test_rtx_telemetry_outputs_have_contract_shapes(rtx):
    """IExprBuilder shapes: block_indices [B, Hsel, NQ, NK], counts [B, Hsel, NQ], visible
    [B, NQ] int32; select_per=1 makes Hsel the KV head count (2)."""
    outputs = rtx["engine_copy_telemetry"]["outputs"]
    assert outputs["idx"] == [[-1, 2, -1, -1], "DataType.INT32"]
    assert outputs["cnt"] == [[-1, 2, -1], "DataType.INT32"]
    assert outputs["vis"] == [[-1, -1], "DataType.INT32"]
    assert "error" not in rtx["build_telemetry"]


def test_rtx_builds_the_learned_gate_fp32(rtx):
    """Gate weights (constants) after an empty mask / bias / thresholds gap reach the plugin as
    inputs 3-4; an SM89 engine builds with them."""
    built = rtx["build_gate_fp32"]
    assert "error" not in built, built.get("error")
    assert built["has_field_collection"] and built["sidecar"]["asa_nodes"] == 1


def test_rtx_keeps_the_gate_float32_in_fp16_engines(rtx):
    """With fp16 attention the gate stays float32 (SPEC; the plugin accepts only kFLOAT there)
    and the engine builds."""
    parsed = rtx["engine_copy_gate"]
    assert parsed["ok"], parsed["errors"]
    assert parsed["plugin_input_types"] == [["DataType.HALF"] * 3 + ["DataType.FLOAT"] * 2]
    built = rtx["build_gate_fp16"]
    assert "error" not in built, built.get("error")


def test_rtx_refuses_a_gate_of_the_wrong_shape(rtx):
    """gate_k_weight [2, 48, 5] against gate_q_weight [4, 16, 8]: the build fails, no engine."""
    bad = rtx["build_gate_bad_shape"]
    assert "error" in bad and bad["written"] is False


def test_rtx_invalid_attribute_is_rejected_by_the_creator(rtx):
    assert not rtx["bad_attribute"]["ok"]
    assert "Could not create the plugin" in rtx["bad_attribute"]["errors"][0]


def test_cli_writes_an_engine_with_tensorrt_rtx(rtx_setup, tmp_path):
    """`asa-export model.onnx --out engine.plan` end to end: rewrite, convert, parse, build."""
    library, env = rtx_setup
    model = tmp_path / "m.onnx"
    onnx.save(build(), model)
    result = subprocess.run(
        ["asa-export", str(model), "--out", str(tmp_path / "engine.plan"), "--backend",
         "tensorrt-rtx", "--target", "SM89", "--max-seq", "256", "--plugin-library", str(library)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sidecar = json.loads((tmp_path / "engine.plan.json").read_text())
    assert sidecar["precision"] == "fp16"
    assert (tmp_path / "engine.plan").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.plan", "engine.plan.json", "m.onnx"]


def test_cli_builds_an_engine_from_an_already_rewritten_model(rtx_setup, tmp_path):
    """A rewritten (e.g. calibrated) model goes to an engine as it is; to ONNX it is refused."""
    from asa_export import api
    from asa_export.passes.pipeline import RewriteOptions

    library, env = rtx_setup
    original = tmp_path / "m.onnx"
    onnx.save(build(), original)
    rewritten = tmp_path / "m.asa.onnx"
    api.export(original, rewritten, RewriteOptions(threshold=0.9))
    before = rewritten.read_bytes()
    result = subprocess.run(
        ["asa-export", str(rewritten), "--out", str(tmp_path / "engine.plan"), "--backend",
         "tensorrt-rtx", "--target", "SM89", "--max-seq", "256", "--plugin-library", str(library)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already holds 1 ASA node" in result.stderr
    assert (tmp_path / "engine.plan").stat().st_size > 0
    assert rewritten.read_bytes() == before

    again = subprocess.run(["asa-export", str(rewritten), "--out", str(tmp_path / "again.onnx")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1
    assert "already rewritten" in again.stderr
    assert not (tmp_path / "again.onnx").exists()
