"""CI check that the CUDA kernel core compiles (no GPU needed): CMake + nvcc for one
architecture (sm_90a, the Hopper build), then the C ABI symbols must be exported.

Skipped when nvcc or cmake is missing. The build folder is cached under .cache/ keyed by a hash
of the sources, so an unchanged tree costs nothing on the next run. The SASS checks need
cuobjdump and nvdisasm: from PATH, or from the PyPI wheels nvidia-cuda-cuobjdump /
nvidia-cuda-nvdisasm that the `[test]` extra installs (their binaries land in
site-packages/nvidia/cu13/bin, not on PATH).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCES = [REPO / "plugins" / "CMakeLists.txt", REPO / "plugins" / "core" / "common"]
SOURCES += [REPO / "plugins" / "core" / "cuda", REPO / "plugins" / "core" / "include"]
EXPORTS = ("asa_cuda_workspace_size", "asa_cuda_route", "asa_cuda_attention",
           "asa_cuda_forward", "asa_cuda_key_block_stats", "asa_last_error")

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                                reason="needs nvcc and cmake on PATH")


def source_hash() -> str:
    digest = hashlib.sha256()
    for root in SOURCES:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def built_library():
    build = REPO / ".cache" / "asa_cuda_ci" / source_hash()
    lib = build / "core" / "cuda" / "libasa_cuda.so"
    if not lib.is_file():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(REPO / "plugins"), "-B", str(build), *generator,
                        "-DASA_WITH_CUDA=ON", "-DASA_WITH_CPU=OFF",
                        "-DCMAKE_CUDA_ARCHITECTURES=90a"], check=True, capture_output=True)
        result = subprocess.run(["cmake", "--build", str(build), "-j", "2"],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return lib


def test_library_builds_and_exports_c_abi(built_library):
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(built_library)],
                             capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    missing = [name for name in EXPORTS if name not in exported]
    assert not missing, f"libasa_cuda.so does not export {missing}"


def cuda_tool(name: str) -> str | None:
    """Path of a CUDA binary tool: on PATH, else from an nvidia-cuda-* wheel, else None."""
    found = shutil.which(name)
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        for candidate in sorted(pathlib.Path(root).glob(f"cu*/bin/{name}")):
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def sass(built_library) -> str:
    """The library's machine code (cuobjdump --dump-sass), dumped once for the SASS checks."""
    cuobjdump, nvdisasm = cuda_tool("cuobjdump"), cuda_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        pytest.skip("cuobjdump / nvdisasm not found (pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm, or put them on PATH)")
    env = dict(os.environ, PATH=f"{pathlib.Path(nvdisasm).parent}{os.pathsep}"
                                f"{os.environ.get('PATH', '')}")
    return subprocess.run([cuobjdump, "--dump-sass", str(built_library)], capture_output=True,
                          text=True, check=True, env=env).stdout


def test_hopper_machine_code_has_tensor_core_mma(sass):
    """The attention kernel must run on tensor cores: its sm_90a code holds HMMA instructions."""
    assert "attn_mma_kernel" in sass
    assert "HMMA" in sass


def test_hopper_machine_code_has_wgmma(sass):
    """The Hopper prefill kernel must use warpgroup MMA: its sm_90a code holds HGMMA."""
    assert "attn_wgmma_kernel" in sass
    assert "HGMMA" in sass
