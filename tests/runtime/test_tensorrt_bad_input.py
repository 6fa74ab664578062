"""asa_export.runtime.tensorrt bad input: plugin libraries TensorRT cannot use, profiles that
contradict the model. The console-script side is in tests/cli/test_bad_input.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import onnx_ir as ir
import pytest

from asa_export.errors import AsaExportError
from asa_export.runtime import tensorrt as art
from tests.passes.attention_graphs import build

# Three libraries of the right file name that are no ASA plugin: not ELF, ELF without a
# getCreators export, ELF whose getCreators returns no creator.
_FAKE_SOURCES = {
    "no_getcreators": "int answer(void) { return 42; }\n",
    "no_creators": "#include <stdint.h>\n"
                   "void *getCreators(int32_t *n) { *n = 0; return 0; }\n"
                   "void setLoggerFinder(void *finder) { (void)finder; }\n",
}


def fake_plugin_libraries(directory) -> dict[str, str]:
    """{kind: path of a file named libasa_trt.so}; the ELF kinds need a C compiler."""
    libraries = {}
    not_elf = directory / "not_elf" / art.LIBRARY_NAME
    not_elf.parent.mkdir(parents=True, exist_ok=True)
    not_elf.write_text("not a library\n")
    libraries["not_elf"] = str(not_elf)
    compiler = shutil.which("cc") or shutil.which("gcc")
    for kind, source in _FAKE_SOURCES.items():
        if compiler is None:
            continue
        folder = directory / kind
        folder.mkdir(exist_ok=True)
        (folder / "lib.c").write_text(source)
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(folder / art.LIBRARY_NAME),
                        str(folder / "lib.c")], check=True, capture_output=True)
        libraries[kind] = str(folder / art.LIBRARY_NAME)
    return libraries


def test_opt_shapes_above_max_shapes_are_refused(rewritten):
    small, large = art.parse_shapes("q:1x4x64x16"), art.parse_shapes("q:1x4x128x16")
    with pytest.raises(AsaExportError, match=r"input 'q' axis 2: need min <= opt <= max, got "
                                             r"64, 128, 64"):
        art.make_profiles(rewritten, min_shapes=small, opt_shapes=large, max_shapes=small,
                          max_seq=256)


def static_model(length: int = 128):
    """build(mask="causal") with the sequence axis fixed at `length` (batch stays dynamic)."""
    model = build(mask="causal")
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "S":
                dim.dim_value = length
    return model


def test_max_seq_below_a_fixed_sequence_axis_is_refused():
    static = ir.from_proto(static_model(128))
    with pytest.raises(AsaExportError, match="fixes its sequence length at 128 .* --max-seq 64"):
        art.make_profiles(static, max_seq=64)
    assert art.make_profiles(static, max_seq=128)["q"].max[1:] == (4, 128, 16)
    with pytest.raises(AsaExportError, match="at least 1"):
        art.make_profiles(static, max_seq=0)


def test_hidden_size_above_max_seq_is_no_sequence_axis(rewritten):
    """Only axes whose role is a length are checked: head dim 16 > --max-seq 8 is fine."""
    assert art.make_profiles(rewritten, max_seq=8)["q"].max == (1, 4, 8, 16)


def test_plugin_library_that_is_not_a_shared_library_is_refused(tmp_path):
    fake = fake_plugin_libraries(tmp_path)["not_elf"]
    with pytest.raises(AsaExportError, match=f"{fake} is not a shared library"):
        art.plugin_library_path(fake)


def test_load_failure_without_exception_is_named(tmp_path):
    """TensorRT(-RTX)'s registry returns no handle (no exception) for a library it cannot use;
    the real registry's behaviour is checked below with TensorRT-RTX."""
    registry = type("Registry", (), {"load_library": lambda self, path: None,
                                     "get_creator": lambda self, *key: None})
    trt = type("trt", (), {"__name__": "fake_trt", "get_plugin_registry": staticmethod(registry)})
    with pytest.raises(AsaExportError, match="could not load the plugin library .*getCreators"):
        art.load_plugin(trt, tmp_path / art.LIBRARY_NAME)


_PROBE = """
import json, sys
import tensorrt_rtx_bindings as trt
from asa_export.errors import AsaExportError
from asa_export.runtime import tensorrt as art
seen = {}
for kind, path in json.loads(sys.argv[1]).items():
    handle = trt.get_plugin_registry().load_library(path) if kind != "not_elf" else "skipped"
    try:
        art.load_plugin(trt, art.plugin_library_path(path))
        seen[kind] = {"raw_handle": repr(handle), "error": None}
    except AsaExportError as err:
        seen[kind] = {"raw_handle": repr(handle), "error": str(err)}
print(json.dumps(seen))
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                    reason="needs `pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`")
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="needs a C compiler for the fake libraries")
def test_real_tensorrt_rtx_registry_refuses_wrong_libraries(tmp_path):
    """Real TensorRT-RTX 1.7: each wrong library gives our message naming it, in a child
    process (a registry keeps what it loaded)."""
    libraries = fake_plugin_libraries(tmp_path)
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(libraries)],
                            capture_output=True, text=True, timeout=120, check=False,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "is not a shared library" in seen["not_elf"]["error"]
    for kind in _FAKE_SOURCES:
        assert seen[kind]["raw_handle"] == "None"  # TensorRT-RTX: no handle, no exception
        assert seen[kind]["error"].startswith(
            f"TensorRT could not load the plugin library {libraries[kind]}: it is not a TensorRT "
            "plugin library")
