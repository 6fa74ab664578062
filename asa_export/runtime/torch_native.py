"""Compiled host path of the torch binding's eager call, opt-in with ``ASA_TORCH_NATIVE=1``.

`torch_op._forward` spends most of its host time in Python for a call without optional inputs
(allocations, AsaParams, ctypes). plugins/torch/asa_torch_op.cpp does the same work in C++; it is
compiled on first use against the running torch (torch.utils.cpp_extension, ~30 s once, cached by
torch under ~/.cache/torch_extensions) and calls the core through the entry points' addresses
taken from the ctypes handle, so it links no CUDA library. Where it cannot be built (no C++
compiler, no ninja) the ctypes path is used, with the reason kept in `build_error`.

Opt-in because its first use compiles for ~30 s. The result is the same bits
(tests/runtime/test_torch_native.py compares its params with `torch_op.make_params`; on an H100
the GPU test compares its outputs); one call at S 256 took 53.7 µs of host time against 90.9
through ctypes (BENCHMARKS.md "Session 17, later").
"""

from __future__ import annotations

import ctypes
import os
import pathlib
from typing import Optional

_SOURCE = pathlib.Path(__file__).resolve().parents[2] / "plugins" / "torch" / "asa_torch_op.cpp"
_INCLUDE = _SOURCE.parents[1] / "core" / "include"
_MODULE = None
build_error: Optional[str] = None


def enabled() -> bool:
    """Whether ASA_TORCH_NATIVE=1 asks for the compiled path."""
    return os.environ.get("ASA_TORCH_NATIVE") == "1"


def module():
    """The compiled extension, built on first use; None (reason in `build_error`) when it
    cannot be built."""
    global _MODULE, build_error
    if _MODULE is None and build_error is None:
        try:
            from torch.utils.cpp_extension import load
            _MODULE = load(name="asa_torch_native", sources=[str(_SOURCE)],
                           extra_include_paths=[str(_INCLUDE)], extra_cflags=["-O2"],
                           verbose=False)
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
