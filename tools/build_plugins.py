#!/usr/bin/env python3
"""Build the native libraries of asa_export (kernel core + adapters) with one command.

    python tools/build_plugins.py                  # CPU core + ONNX Runtime library
    python tools/build_plugins.py --no-ort         # CPU core only
    python tools/build_plugins.py --cuda           # also the CUDA core (needs nvcc)
    python tools/build_plugins.py --cuda --cuda-archs 80   # one architecture (faster, CI)
    python tools/build_plugins.py --torch          # also the torch binding's compiled host path

Fetches build-time dependencies into the build folder and caches them there (idempotent: a
second run only rebuilds what changed):

- ONNX Runtime's C/C++ headers from Debian's `libonnxruntime-dev` (trixie first, then sid), via
  `apt-get download` with a private apt state folder, so the system's apt configuration is left
  untouched; extracted with `dpkg -x`. Never committed to the repository.

Outputs (default build folder plugins/build):
    core/cpu/libasa_cpu.so         C ABI of asa_cpu.h (ctypes tests)
    core/cuda/libasa_cuda.so       C ABI of asa_cuda.h (with --cuda); libasa_ort.so dlopens it
    onnxruntime/libasa_ort.so      ONNX Runtime custom-op library (RegisterCustomOps)
    torch/<python>-<torch>/asa_torch_native.so
                                   the torch binding's compiled host path (with --torch; built
                                   against the running torch, which eager calls then use:
                                   asa_export/runtime/torch_native.py)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
DEFAULT_BUILD = PLUGINS / "build"
ORT_PACKAGE = "libonnxruntime-dev"
# Debian suites offering libonnxruntime-dev (trixie: 1.21, sid: 1.23); the first that works wins.
DEBIAN_SUITES = ("trixie", "sid")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class BuildError(RuntimeError):
    """A build step failed; the message says which and how to fix it."""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, check=False, **kwargs)


def _apt_options(state: Path, suite: str) -> list[str]:
    """apt options that point every file apt writes into `state` (no system change)."""
    sources = state / f"sources-{suite}.list"
    signed = f"[signed-by={KEYRING}] " if Path(KEYRING).exists() else ""
    sources.write_text(f"deb {signed}{DEBIAN_MIRROR} {suite} main\n")
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    opts = [
        "-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
        "-o", "Dir::State::Status=/dev/null", "-o", "Debug::NoLocking=1", "-o", "Quiet=1",
    ]
    if os.geteuid() == 0:
        opts += ["-o", "APT::Sandbox::User=root"]  # the private folders are root's
    return opts


def fetch_ort_headers(deps: Path) -> Path:
    """Download and extract libonnxruntime-dev once; return the folder with onnxruntime_c_api.h.

    Args:
        deps: cache folder for downloaded dependencies.

    Returns:
        Path of `.../usr/include/onnxruntime`.
    """
    root = deps / "onnxruntime-dev"
    include = root / "usr" / "include" / "onnxruntime"
    if (include / "onnxruntime_cxx_api.h").exists():
        return include
    for tool in ("apt-get", "dpkg"):
        if not shutil.which(tool):
            raise BuildError(f"{tool} not found: the ONNX Runtime headers come from Debian's "
                             f"{ORT_PACKAGE}; install them by hand and pass --ort-include DIR")
    state = deps / "apt"
    state.mkdir(parents=True, exist_ok=True)
    errors = []
    for suite in DEBIAN_SUITES:
        opts = _apt_options(state, suite)
        if _run(["apt-get", *opts, "update"]).returncode != 0:
            errors.append(f"apt-get update ({suite}) failed")
            continue
        for old in state.glob(f"{ORT_PACKAGE}_*.deb"):
            old.unlink()
        if _run(["apt-get", *opts, "download", ORT_PACKAGE], cwd=state).returncode != 0:
            errors.append(f"apt-get download {ORT_PACKAGE} ({suite}) failed")
            continue
        debs = sorted(state.glob(f"{ORT_PACKAGE}_*.deb"))
        if not debs:
            errors.append(f"no {ORT_PACKAGE} .deb after download ({suite})")
            continue
        shutil.rmtree(root, ignore_errors=True)
        if _run(["dpkg", "-x", str(debs[-1]), str(root)]).returncode == 0:
            (root / "SOURCE").write_text(f"{debs[-1].name} from Debian {suite}\n")
            return include
        errors.append(f"dpkg -x {debs[-1].name} failed")
    raise BuildError("could not fetch ONNX Runtime headers: " + "; ".join(errors) +
                     ". Needs access to deb.debian.org, or pass --ort-include DIR.")


def configure_and_build(build: Path, ort_include: Path | None, cuda: bool, jobs: int,
                        build_type: str, cuda_archs: str | None = None) -> None:
    """Run CMake configure (once, or when options change) and build."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    if (build / "CMakeCache.txt").exists():
        cache = (build / "CMakeCache.txt").read_text()
        if "CMAKE_GENERATOR:INTERNAL=Ninja" not in cache and gen:
            gen = []  # keep the generator the folder was made with
    cmd = ["cmake", "-S", str(PLUGINS), "-B", str(build), *gen,
           f"-DCMAKE_BUILD_TYPE={build_type}",
           f"-DASA_WITH_ORT={'ON' if ort_include else 'OFF'}",
           f"-DASA_WITH_CUDA={'ON' if cuda else 'OFF'}"]
    if ort_include:
        cmd.append(f"-DORT_INCLUDE_DIR={ort_include}")
    if cuda and cuda_archs:
        cmd.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}")
    if _run(cmd).returncode != 0:
        raise BuildError("CMake configure failed (see above)")
    if _run(["cmake", "--build", str(build), "-j", str(jobs)]).returncode != 0:
        raise BuildError("build failed (see above)")


def build_torch_host_path() -> Path:
    """Compile plugins/torch/asa_torch_op.cpp against the running torch (~30 s; nothing when it
    is up to date) into the folder eager calls look in; returns that folder."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise BuildError(f"--torch needs torch installed: {exc}") from exc
    sys.path.insert(0, str(REPO))
    from asa_export.runtime import torch_native
    print(f"+ torch.utils.cpp_extension.load -> {torch_native.build_dir()}", flush=True)
    if torch_native.module(verbose=True) is None:
        raise BuildError(f"the torch host path did not build: {torch_native.build_error}")
    return torch_native.build_dir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD)
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime library")
    ap.add_argument("--ort-include", type=Path, help="use these ONNX Runtime headers instead")
    ap.add_argument("--cuda", action="store_true", help="also build the CUDA kernel core")
    ap.add_argument("--cuda-archs", help='CUDA architectures, e.g. "80" (default: the core\'s own)')
    ap.add_argument("--torch", action="store_true",
                    help="also build the torch binding's compiled host path against this torch")
    ap.add_argument("--jobs", "-j", type=int, default=2)
    ap.add_argument("--build-type", default="Release")
    args = ap.parse_args(argv)
    build = args.build_dir.resolve()
    if args.torch and build != DEFAULT_BUILD.resolve():
        print("build_plugins: error: --torch builds into plugins/build/torch only (where the "
              "torch binding looks); drop --build-dir", file=sys.stderr)
        return 2
    build.mkdir(parents=True, exist_ok=True)
    try:
        ort_include = None
        if not args.no_ort:
            ort_include = args.ort_include or fetch_ort_headers(build / "_deps")
        configure_and_build(build, ort_include, args.cuda, args.jobs, args.build_type,
                            args.cuda_archs)
        torch_dir = build_torch_host_path() if args.torch else None
    except BuildError as e:
        print(f"build_plugins: error: {e}", file=sys.stderr)
        return 1
    for lib in ("core/cpu/libasa_cpu.so", "core/cuda/libasa_cuda.so", "onnxruntime/libasa_ort.so"):
        if (build / lib).exists():
            print(f"built {build / lib}")
    if torch_dir is not None:
        print(f"built {next(torch_dir.glob('asa_torch_native*.so'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
