#!/usr/bin/env python3
"""Build the TensorRT plugin library libasa_trt.so (CUDA kernel core + IPluginV3 adapter).

    python tools/build_trt_plugin.py                        # sm_90a + sm_80, TensorRT 10.14 headers
    python tools/build_trt_plugin.py --archs 90a            # Hopper only (faster)
    python tools/build_trt_plugin.py --tensorrt-root /opt/TensorRT-10.14

TensorRT headers: --tensorrt-root (or $TENSORRT_ROOT) when given, else the public headers of the
`kernel-lens` wheel (TensorRT 10.14, Apache-2.0; `pip install kernel-lens`; this script installs
nothing). They are read from site-packages at build time and never copied into the repository.

Output: <build-dir>/tensorrt/libasa_trt.so (default build dir plugins/tensorrt/build), which
asa_export.runtime.tensorrt finds by default. Separate from tools/build_plugins.py (CPU core and
ONNX Runtime library) so that neither build waits for the other.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
DEFAULT_BUILD = PLUGINS / "tensorrt" / "build"
DEFAULT_ARCHS = "90a;80"


class BuildError(RuntimeError):
    """A build step failed; the message says which and how to fix it."""


def tensorrt_headers(tensorrt_root: str | os.PathLike | None = None) -> Path:
    """Folder holding NvInferRuntime.h.

    Args:
        tensorrt_root: a TensorRT install (its include/ is used); None tries $TENSORRT_ROOT,
            then the kernel-lens wheel.

    Returns:
        The include folder.

    Raises:
        BuildError: no headers found, with what to install.
    """
    root = tensorrt_root or os.environ.get("TENSORRT_ROOT")
    if root:
        include = Path(root) / "include"
    else:
        spec = importlib.util.find_spec("kernel_lens")
        include = Path(spec.origin).parent / "include" / "tensorrt" if spec and spec.origin else None
    if include is None or not (include / "NvInferRuntime.h").is_file():
        raise BuildError(
            "TensorRT headers not found: `pip install kernel-lens` (TensorRT 10.14 public headers) "
            "or pass --tensorrt-root / set TENSORRT_ROOT to a TensorRT install"
        )
    return include


def build(build_dir: str | os.PathLike = DEFAULT_BUILD, *, archs: str = DEFAULT_ARCHS,
          tensorrt_root: str | os.PathLike | None = None, jobs: int = 2) -> Path:
    """Configure and build libasa_trt.so (idempotent: an unchanged tree rebuilds nothing).

    Args:
        build_dir: CMake build folder.
        archs: CUDA architectures of the kernel core, ";"-separated (e.g. "90a" or "90a;80").
        tensorrt_root: TensorRT install whose headers to use; None = $TENSORRT_ROOT or kernel-lens.
        jobs: parallel compile jobs.

    Returns:
        Path of the built library.

    Raises:
        BuildError: nvcc or cmake missing, headers missing, or a failed step (with its output).
    """
    for tool in ("cmake", "nvcc"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found on PATH: the plugin needs the CUDA toolkit and CMake")
    include = tensorrt_headers(tensorrt_root)
    build_dir = Path(build_dir)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    cache = build_dir / "CMakeCache.txt"
    if cache.exists() and "CMAKE_GENERATOR:INTERNAL=Ninja" not in cache.read_text() and generator:
        generator = []  # an existing folder keeps the generator it was made with
    configure = ["cmake", "-S", str(PLUGINS), "-B", str(build_dir), *generator,
                 "-DASA_WITH_CPU=OFF", "-DASA_WITH_CUDA=ON", "-DASA_WITH_TENSORRT=ON",
                 f"-DCMAKE_CUDA_ARCHITECTURES={archs}", f"-DTENSORRT_INCLUDE_DIR={include}",
                 f"-DPython3_EXECUTABLE={sys.executable}"]
    _run(configure, "configure")
    _run(["cmake", "--build", str(build_dir), "--target", "asa_trt", "-j", str(jobs)], "build")
    library = build_dir / "tensorrt" / "libasa_trt.so"
    if not library.is_file():
        raise BuildError(f"the build finished but {library} is missing")
    return library


def source_hash(archs: str) -> str:
    """Hash of everything the library is built from (sources, CMake files, archs, headers)."""
    import hashlib

    digest = hashlib.sha256(archs.encode())
    roots = [PLUGINS / "CMakeLists.txt", PLUGINS / "core" / "common", PLUGINS / "core" / "cuda",
             PLUGINS / "core" / "include", PLUGINS / "tensorrt"]
    for root in roots:
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and "build" not in p.relative_to(root).parts)
        for path in files:
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    digest.update(str(tensorrt_headers()).encode())
    return digest.hexdigest()[:16]


def cached_build(cache_root: str | os.PathLike = REPO / ".cache" / "asa_trt", *,
                 archs: str = "90a") -> Path:
    """build() into `cache_root/<source hash>`: an unchanged tree costs nothing (tests, CI).

    Returns:
        Path of the built library.
    """
    folder = Path(cache_root) / source_hash(archs)
    library = folder / "tensorrt" / "libasa_trt.so"
    if library.is_file():
        return library
    library = build(folder, archs=archs)
    for stale in Path(cache_root).iterdir():  # builds of older trees
        if stale.is_dir() and stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    return library


def _run(cmd: list[str], step: str) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{step} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build-dir", default=str(DEFAULT_BUILD))
    parser.add_argument("--archs", default=DEFAULT_ARCHS, help='CUDA architectures, e.g. "90a;80"')
    parser.add_argument("--tensorrt-root", default=None)
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        library = build(args.build_dir, archs=args.archs, tensorrt_root=args.tensorrt_root,
                        jobs=args.jobs)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
