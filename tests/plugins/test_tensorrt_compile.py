"""CI check that the TensorRT plugin compiles against TensorRT 10.14's public headers (from the
`kernel-lens` wheel) and the CUDA toolkit's, with the kernel core for sm_90a, and that the
library has the shape TensorRT expects of a plugin library.

Skipped without nvcc/cmake or without kernel-lens. The build is cached under .cache/asa_trt/
keyed by a hash of the sources (tools/build_trt_plugin.py cached_build).
"""

from __future__ import annotations

import ctypes
import importlib.util
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                       reason="needs nvcc and cmake on PATH"),
    pytest.mark.skipif(importlib.util.find_spec("kernel_lens") is None,
                       reason="needs the TensorRT headers of `pip install kernel-lens`"),
]


def _builder():
    spec = importlib.util.spec_from_file_location("build_trt_plugin",
                                                  REPO / "tools" / "build_trt_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def library() -> pathlib.Path:
    return _builder().cached_build(archs="90a")


def test_headers_are_tensorrt_10_14():
    version = (_builder().tensorrt_headers() / "NvInferVersion.h").read_text()
    assert "#define TRT_MAJOR_ENTERPRISE 10" in version
    assert "#define TRT_MINOR_ENTERPRISE 14" in version


def test_exports_only_the_plugin_entry_points(library):
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True,
                             text=True, check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert exported == {"getCreators", "setLoggerFinder"}


def test_links_neither_tensorrt_nor_the_shared_cuda_runtime(library):
    """One binary for TensorRT and TensorRT-RTX: TensorRT is reached only through interfaces,
    and the CUDA runtime is static, so an engine can embed this single file."""
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True,
                             check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic
    assert not [n for n in needed if "nvinfer" in n or "tensorrt" in n or "cudart" in n], needed


def test_get_creators_returns_one_creator_without_tensorrt(library):
    lib = ctypes.CDLL(str(library))
    lib.getCreators.restype = ctypes.POINTER(ctypes.c_void_p)
    lib.getCreators.argtypes = [ctypes.POINTER(ctypes.c_int32)]
    count = ctypes.c_int32(-1)
    creators = lib.getCreators(ctypes.byref(count))
    assert count.value == 1
    assert creators[0]  # a non-null IPluginCreatorV3One*


def test_kernel_core_device_code_is_inside(library):
    """The CUDA kernels travel in the library itself (a fat binary section), not in a sidecar."""
    sections = subprocess.run(["readelf", "-S", "-W", str(library)], capture_output=True,
                              text=True, check=True).stdout
    assert ".nv_fatbin" in sections
