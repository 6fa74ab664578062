"""Compiled host path of the torch binding's eager call (plugins/torch/asa_torch_op.cpp).

`torch_op._forward` spends most of its host time in Python for a call without optional inputs
(allocations, AsaParams, ctypes). plugins/torch/asa_torch_op.cpp does the same work in C++; it is
compiled against the running torch (torch.utils.cpp_extension, ~30 s) into
``plugins/build/torch/<python>-<torch>/`` and calls the core through the entry points' addresses
taken from the ctypes handle, so it links no CUDA library.

When eager calls take it (``ASA_TORCH_NATIVE``):

- unset (default): when it was built ahead for this Python and torch
  (``python tools/build_plugins.py --torch``) and is not older than its source; never compiles
  during a call;
- ``1``: always, compiling it on first use if needed (~30 s once);
- ``0``: never (the ctypes path).

Where it cannot be built or loaded (no C++ compiler, no ninja) the ctypes path is used, with the
reason kept in `build_error`. The result is the same bits (tests/runtime/test_torch_native.py
compares its params with `torch_op.make_params`; on an H100 the GPU test compares its outputs);
one eager call at S 256 took 41.2 µs of host time against 62.4 through ctypes on an H100 host
(SDPA 28.4; BENCHMARKS.md "Session 18").
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys
import warnings
from typing import Optional

_SOURCE = pathlib.Path(__file__).resolve().parents[2] / "plugins" / "torch" / "asa_torch_op.cpp"
_INCLUDE = _SOURCE.parents[1] / "core" / "include"
_BUILD_ROOT = _SOURCE.parents[1] / "build" / "torch"
_NAME = "asa_torch_native"
_MODULE = None
_BUILT_AHEAD: list = []  # [bool] once asked: `enabled` runs on every eager call
build_error: Optional[str] = None


def build_dir() -> pathlib.Path:
    """Where the extension for this Python and torch is built (an extension built against
    another torch does not load)."""
    import torch
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    return _BUILD_ROOT / tag.replace("+", "_")


def built_ahead(warn: bool = False) -> bool:
    """Whether the extension for this Python and torch exists and is not older than its
    source (so loading it compiles nothing); with `warn`, a stale one is reported."""
    try:
        lib = next(build_dir().glob(f"{_NAME}*.so"))
    except StopIteration:
        return False
    if lib.stat().st_mtime >= _SOURCE.stat().st_mtime:
        return True
    if warn:
        warnings.warn(f"{lib} is older than {_SOURCE.name}: eager calls use the slower ctypes path "
                      f"until `python tools/build_plugins.py --torch` rebuilds it")
    return False


def enabled() -> bool:
    """Whether eager calls take the compiled path (see the module docstring); ValueError for an
    ASA_TORCH_NATIVE other than unset, empty, 0 or 1."""
    setting = os.environ.get("ASA_TORCH_NATIVE")
    if setting == "1":
        return True
    if setting == "0":
        return False
    if setting is None or setting == "":
        if not _BUILT_AHEAD:
            _BUILT_AHEAD.append(built_ahead(warn=True))
        return _BUILT_AHEAD[0]
    raise ValueError(f"ASA_TORCH_NATIVE must be 0 (ctypes), 1 (the compiled host path, built on "
                     f"first use) or unset (the compiled path where built ahead), got {setting!r}")


def module(verbose: bool = False):
    """The compiled extension, built when missing or stale; None (reason in `build_error`) when
    it cannot be built."""
    global _MODULE, build_error
    if _MODULE is None and build_error is None:
        try:
            from torch.utils.cpp_extension import load
            target = build_dir()
            target.mkdir(parents=True, exist_ok=True)
            _MODULE = load(name=_NAME, sources=[str(_SOURCE)],
                           extra_include_paths=[str(_INCLUDE)], extra_cflags=["-O2"],
                           build_directory=str(target), verbose=verbose)
        except Exception as exc:  # noqa: BLE001 - any build failure falls back to ctypes
            build_error = f"{type(exc).__name__}: {exc}"
    return _MODULE


def address(fn) -> int:
    """Address of a ctypes function (an entry point of libasa_cuda.so, or a callback)."""
    return ctypes.cast(fn, ctypes.c_void_p).value


def plain_forward(mod, q, k, v, attrs, dtype_code: int, entries: tuple[int, int, int],
                  stream: int):
    """The compiled call: q, k, v with head-dim stride 1; entries = addresses of
    (asa_cuda_workspace_size, the entry point, asa_last_error). Returns (out, *telemetry)."""
    return mod.plain_forward(q, k, v, dtype_code, attrs.resolved_scale(q.shape[3]),
                             bool(attrs.causal), attrs.block_size, attrs.threshold,
                             attrs.sink_blocks, attrs.local_blocks, attrs.window, attrs.softcap,
                             attrs.select_per, *entries, stream)
