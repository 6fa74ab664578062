"""Torch binding of the CUDA kernel core: the custom op ``asa::sparse_attention``.

The op calls the core's C ABI (plugins/core/include/asa/asa_cuda.h) through ctypes with tensor
pointers and the current CUDA stream, so no torch extension has to be compiled against the torch
of the machine that runs it (the CPU and GPU machines run different torch versions). The shared
library is found through ``$ASA_CUDA_LIB`` or under ``plugins/build/``; ``build_cuda_library``
builds it with CMake. Eager calls without optional inputs take a C++ host path compiled against
the running torch instead where it was built ahead (``python tools/build_plugins.py --torch``) or
``ASA_TORCH_NATIVE=1`` asks for it (runtime/torch_native.py).

    out, block_indices, block_counts, visible_counts = torch.ops.asa.sparse_attention(
        q, k, v, key_padding_mask, attn_bias, head_thresholds, gate_q_weight, gate_k_weight,
        scale, causal, block_size, threshold, sink_blocks, local_blocks, window, softcap,
        select_per)

Semantics: asa_export/contract/SPEC.md. torch is imported lazily by the functions that need it;
importing this module imports torch (it registers the op).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import subprocess
import warnings
from typing import Optional

import torch

try:  # private in torch; without it every call goes through the dispatcher (_direct_call_ok)
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - older or newer torch
    _get_current_dispatch_mode = None

from asa_export.contract import AsaAttributes, num_blocks
from asa_export.runtime import torch_native
from asa_export.runtime.abi import AsaParams
from asa_export.errors import AsaExportError

_REPO = pathlib.Path(__file__).resolve().parents[2]
_DEFAULT_BUILD = _REPO / "plugins" / "build" / "cuda"
_LIB_NAME = "libasa_cuda.so"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MASK_DTYPES = {torch.bool: 1, torch.uint8: 1, torch.int32: 2, torch.int64: 3}


def build_cuda_library(build_dir: Optional[os.PathLike] = None, archs: str = "90a;80",
                       jobs: int = 2) -> pathlib.Path:
    """Configure and build libasa_cuda.so with CMake (nvcc must be on PATH).

    Args:
        build_dir: CMake build folder; default plugins/build/cuda (git-ignored).
        archs: CMAKE_CUDA_ARCHITECTURES, e.g. "90a;80" or "90a".
        jobs: parallel compile jobs.

    Returns:
        Path of the built shared library.
    """
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        raise AsaExportError("building libasa_cuda.so needs nvcc and cmake on PATH")
    build = pathlib.Path(build_dir) if build_dir else _DEFAULT_BUILD
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(_REPO / "plugins"), "-B", str(build), *generator,
                    "-DASA_WITH_CUDA=ON", "-DASA_WITH_CPU=OFF",
                    f"-DCMAKE_CUDA_ARCHITECTURES={archs}"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(jobs)], check=True)
    return build / "core" / "cuda" / _LIB_NAME


def find_cuda_library() -> pathlib.Path:
    """Locate libasa_cuda.so: $ASA_CUDA_LIB, then the default build folders.

    Returns:
        Path of the library.
    """
    env = os.environ.get("ASA_CUDA_LIB")
    candidates = [pathlib.Path(env)] if env else []
    candidates += [_DEFAULT_BUILD / "core" / "cuda" / _LIB_NAME,
                   _REPO / "plugins" / "build" / "core" / "cuda" / _LIB_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise AsaExportError(
        "libasa_cuda.so not found: set ASA_CUDA_LIB or build it with "
        "asa_export.runtime.torch_op.build_cuda_library()")


_LIB = None


def _library() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(find_cuda_library()))
        lib.asa_cuda_workspace_size.restype = ctypes.c_size_t
        lib.asa_cuda_workspace_size.argtypes = [ctypes.POINTER(AsaParams)]
        for name in ("asa_cuda_route", "asa_cuda_attention", "asa_cuda_forward"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(AsaParams), ctypes.c_void_p, ctypes.c_size_t,
                           ctypes.c_void_p]
        lib.asa_cuda_key_block_stats.restype = ctypes.c_int
        lib.asa_cuda_key_block_stats.argtypes = [ctypes.POINTER(AsaParams), ctypes.c_void_p,
                                                 ctypes.c_int, ctypes.c_void_p]
        lib.asa_last_error.restype = ctypes.c_char_p
        _LIB = lib
    return _LIB


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def make_params(q, k, v, out, telemetry, attrs: AsaAttributes, key_padding_mask=None,
                attn_bias=None, head_thresholds=None, gate_q_weight=None,
                gate_k_weight=None, key_block_stats=None,
                key_block_stats_blocks=None) -> tuple[AsaParams, list]:
    """Fill AsaParams from tensors (validated by the core).

    Args:
        q, k, v, out: [B, H, S, D] CUDA tensors, head-dim stride 1.
        telemetry: (block_indices, block_counts, visible_counts) int32 tensors.
        attrs: the node's attributes.
        key_padding_mask, attn_bias, head_thresholds: optional inputs (SPEC.md).
        gate_q_weight, gate_k_weight: the learned gate, [Hq, D, Dg] and [Hkv, 3*D, Dg]
            (SPEC.md inputs 6-7), both or neither; made float32 and contiguous.
        key_block_stats: optional caller-kept router statistics [B, Hkv, C, F] float32
            (see `key_block_stats`); not a contract input, the result is unchanged.
        key_block_stats_blocks: how many leading rows of key_block_stats are valid
            (default min(C, NK)); the router pools the later blocks itself.

    Returns:
        (params, keep_alive) where keep_alive holds tensors the params point into.
    """
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_kv, dim_v = v.shape[1], k.shape[2], v.shape[3]
    p = AsaParams(batch=batch, heads_q=heads_q, heads_kv=heads_kv, seq_q=seq_q, seq_kv=seq_kv,
                  head_dim=dim, head_dim_v=dim_v, dtype=_DTYPES[q.dtype])
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        setattr(p, "out" if name == "o" else name, t.data_ptr())
        sb, sh, ss = _strides(t)
        setattr(p, f"{name}_stride_b", sb)
        setattr(p, f"{name}_stride_h", sh)
        setattr(p, f"{name}_stride_s", ss)
    keep = []
    if key_padding_mask is not None:
        mask = key_padding_mask.contiguous()
        if mask.dtype not in _MASK_DTYPES:
            raise AsaExportError(f"key_padding_mask must be bool/int32/int64, got {mask.dtype}")
        p.key_padding_mask, p.mask_dtype = mask.data_ptr(), _MASK_DTYPES[mask.dtype]
        p.mask_stride_b = mask.stride(0)
        keep.append(mask)
    if attn_bias is not None:
        bias = attn_bias.to(q.dtype)
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        bias = bias.expand(batch, heads_q, seq_q, seq_kv)
        p.bias = bias.data_ptr()
        p.bias_stride_b, p.bias_stride_h, p.bias_stride_q, p.bias_stride_k = bias.stride()
        keep.append(bias)
    if head_thresholds is not None:
        tau = head_thresholds.to(torch.float32).contiguous()
        p.head_thresholds = tau.data_ptr()
        keep.append(tau)
    keep += _set_gate(p, gate_q_weight, gate_k_weight, heads_q, heads_kv, dim)
    if key_block_stats is not None:
        _set_key_block_stats(p, key_block_stats, key_block_stats_blocks, k, attrs,
                             gate_q_weight is not None)
        keep.append(key_block_stats)
    p.scale = attrs.resolved_scale(dim)
    p.causal, p.block_size, p.threshold = int(attrs.causal), attrs.block_size, attrs.threshold
    p.sink_blocks, p.local_blocks = attrs.sink_blocks, attrs.local_blocks
    p.window, p.softcap, p.select_per = attrs.window, attrs.softcap, attrs.select_per
    p.block_indices, p.block_counts, p.visible_counts = (t.data_ptr() for t in telemetry)
    return p, keep


def _set_gate(p: AsaParams, gate_q_weight, gate_k_weight, heads_q: int, heads_kv: int,
              dim: int) -> list:
    """Point `p` at the learned gate's float32 weights after checking SPEC.md's shapes."""
    if gate_q_weight is None and gate_k_weight is None:
        return []
    if gate_q_weight is None or gate_k_weight is None:
        raise AsaExportError("gate_q_weight and gate_k_weight come together (inputs 6 and 7): "
                             "pass both (a learned gate) or neither")
    wq, wk = (w.to(torch.float32).contiguous() for w in (gate_q_weight, gate_k_weight))
    if wq.dim() != 3 or tuple(wq.shape[:2]) != (heads_q, dim) or wq.shape[2] < 1:
        raise AsaExportError(f"gate_q_weight must have shape [Hq, D, Dg] = [{heads_q}, {dim}, "
                             f"Dg], got {list(wq.shape)}")
    if tuple(wk.shape) != (heads_kv, 3 * dim, wq.shape[2]):
        raise AsaExportError(f"gate_k_weight must have shape [Hkv, 3*D, Dg] = "
                             f"{[heads_kv, 3 * dim, wq.shape[2]]}, got {list(wk.shape)}")
    p.gate_q_weight, p.gate_k_weight, p.gate_dim = wq.data_ptr(), wk.data_ptr(), wq.shape[2]
    return [wq, wk]


def _check_stats_buffer(stats, key, attrs: AsaAttributes, gate: bool) -> None:
    """SPEC.md "Acceleration": stats are float32 [B, Hkv, C, F] on the keys' device."""
    batch, heads_kv, _, dim = key.shape
    width = 3 * dim if gate else dim
    if (stats.dtype != torch.float32 or stats.device != key.device or stats.dim() != 4
            or not stats.is_contiguous() or tuple(stats.shape[:2]) != (batch, heads_kv)
            or stats.shape[3] != width or stats.shape[2] < 1):
        raise AsaExportError(
            f"key_block_stats must be a contiguous float32 tensor [B, Hkv, C, F] = "
            f"[{batch}, {heads_kv}, C, {width}] on {key.device} (F = {'3*D' if gate else 'D'}"
            f"{' with the learned gate' if gate else ''}), got {stats.dtype} "
            f"{list(stats.shape)} on {stats.device}")


def _set_key_block_stats(p: AsaParams, stats, blocks, key, attrs: AsaAttributes,
                         gate: bool) -> None:
    """Point `p` at the caller's key block statistics (the core checks `blocks`)."""
    _check_stats_buffer(stats, key, attrs, gate)
    nk = num_blocks(key.shape[2], attrs.block_size)
    p.key_block_stats = stats.data_ptr()
    p.key_block_stats_capacity = stats.shape[2]
    p.key_block_stats_blocks = min(stats.shape[2], nk) if blocks is None else int(blocks)


def key_block_stats(key, attrs: AsaAttributes = AsaAttributes(), key_padding_mask=None,
                    gate: bool = False, out=None, first_block: int = 0):
    """The router's key block statistics, for a caller that keeps them across decode steps.

    Equal bit for bit to what the router pools (SPEC.md "Acceleration (kernel ABI only)"): the
    mean of each block's kept keys, and with the learned gate concat(mean, max, min). A decode
    loop computes them once for the prompt, then after appending keys refreshes only from the
    block of the first new key (`first_block`), and passes them to `route` /
    `sparse_attention` as ``key_block_stats``. Rows depend on key_padding_mask: refresh every
    block whose kept keys changed.

    Fastest decode step: pass ``key_block_stats_blocks = NK - 1`` so that the router pools the
    last, still filling block itself, in the same call, and refresh a row here only once its
    block is full (every block_size steps). Refreshing the last block here before every step
    makes two calls per step, and the second cannot start under the first: 9-11 us more per
    step at 128K on an H100 (BENCHMARKS.md optimization step 49).

    Args:
        key: [B, Hkv, Skv, D] CUDA tensor (head-dim stride 1).
        attrs: the node's attributes (block_size matters).
        key_padding_mask: optional [B, Skv] mask, as given to the router.
        gate: True when the router runs with the learned gate (rows of 3*D), else rows of D.
        out: optional float32 [B, Hkv, C, F] buffer with C >= NK to refresh in place;
            a new [B, Hkv, NK, F] tensor when None.
        first_block: first block to (re)compute; rows before it are left as they are.

    Returns:
        The stats tensor (`out` when given).
    """
    k = _inner_contiguous(key)
    batch, heads_kv, seq_kv, dim = k.shape
    nk = num_blocks(seq_kv, attrs.block_size)
    if out is None:
        out = torch.zeros(batch, heads_kv, nk, 3 * dim if gate else dim, dtype=torch.float32,
                          device=k.device)
    _check_stats_buffer(out, k, attrs, gate)
    dummy_out = k.new_empty(1, 1, 1, 1)  # q, v and out are not read: only the params' checks
    telemetry = [torch.empty(0, dtype=torch.int32, device=k.device)] * 3
    params, keep = make_params(k, k, k, dummy_out, telemetry, attrs, key_padding_mask)
    if gate:
        # F = 3*D is chosen by the gate being set; the stats kernel never reads the weights.
        placeholder = torch.zeros(1, dtype=torch.float32, device=k.device)
        params.gate_q_weight = params.gate_k_weight = placeholder.data_ptr()
        params.gate_dim = 1
        keep.append(placeholder)
    params.key_block_stats_capacity = out.shape[2]
    lib = _library()
    stream = torch.cuda.current_stream(k.device).cuda_stream
    err = lib.asa_cuda_key_block_stats(ctypes.byref(params), ctypes.c_void_p(out.data_ptr()),
                                       int(first_block), ctypes.c_void_p(stream))
    if err != 0:
        raise AsaExportError(f"asa_cuda_key_block_stats returned CUDA error {err}: "
                             f"{lib.asa_last_error().decode()}")
    return out


def workspace_size(params: AsaParams) -> int:
    """Bytes of device workspace the core needs for `params` (asa_cuda_workspace_size); raises
    with the core's message when it rejects the params."""
    lib = _library()
    size = lib.asa_cuda_workspace_size(ctypes.byref(params))
    if size == 0 and lib.asa_last_error():
        raise AsaExportError(lib.asa_last_error().decode())
    return size


def run_core(entry: str, params: AsaParams, device: torch.device,
             size: Optional[int] = None) -> None:
    """Call one C entry point (asa_cuda_route / _attention / _forward) on the current stream.

    Args:
        entry: name of the entry point.
        params: filled AsaParams.
        device: CUDA device of the tensors.
        size: the workspace bytes when already known for these shapes (`workspace_size`).
    """
    lib = _library()
    if size is None:
        size = workspace_size(params)
    workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream
    err = getattr(lib, entry)(ctypes.byref(params), ctypes.c_void_p(workspace.data_ptr()),
                              ctypes.c_size_t(size), ctypes.c_void_p(stream))
    if err != 0:
        raise AsaExportError(f"{entry} returned CUDA error {err}: "
                             f"{lib.asa_last_error().decode()}")


def telemetry_shapes(q: torch.Tensor, k: torch.Tensor, attrs: AsaAttributes):
    """Shapes of block_indices, block_counts, visible_counts (SPEC.md "Outputs")."""
    batch, heads_q, seq_q, _ = q.shape
    hsel = k.shape[1] if attrs.select_per else heads_q
    nq, nk = num_blocks(seq_q, attrs.block_size), num_blocks(k.shape[2], attrs.block_size)
    return (batch, hsel, nq, nk), (batch, hsel, nq), (batch, nq)


def _attrs(scale, causal, block_size, threshold, sink_blocks, local_blocks, window, softcap,
           select_per) -> AsaAttributes:
    try:
        return AsaAttributes(scale=scale, causal=bool(causal), block_size=block_size,
                             threshold=threshold, sink_blocks=sink_blocks,
                             local_blocks=local_blocks, window=window, softcap=softcap,
                             select_per=select_per)
    except ValueError as exc:
        raise AsaExportError(str(exc)) from exc


@torch.library.custom_op("asa::sparse_attention", mutates_args=())
def sparse_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        key_padding_mask: Optional[torch.Tensor],
                        attn_bias: Optional[torch.Tensor],
                        head_thresholds: Optional[torch.Tensor],
                        gate_q_weight: Optional[torch.Tensor],
                        gate_k_weight: Optional[torch.Tensor],
                        scale: float, causal: bool, block_size: int, threshold: float,
                        sink_blocks: int, local_blocks: int, window: int, softcap: float,
                        select_per: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """ASA op on CUDA tensors: router + block-sparse attention (contract v1)."""
    attrs = _attrs(scale, causal, block_size, threshold, sink_blocks, local_blocks, window,
                   softcap, select_per)
    return _forward(query, key, value, attrs, key_padding_mask, attn_bias, head_thresholds,
                    gate_q_weight, gate_k_weight)


def _forward(query, key, value, attrs: AsaAttributes, key_padding_mask, attn_bias,
             head_thresholds, gate_q_weight, gate_k_weight, key_block_stats=None,
             key_block_stats_blocks=None):
    """asa_cuda_forward through ctypes (with no optional input and the compiled host path
    enabled, `torch_native.enabled`, through that path instead: `_native_forward`); returns
    (out, *telemetry)."""
    if not query.is_cuda:
        raise AsaExportError("asa::sparse_attention runs on CUDA tensors only")
    q, k, v = (_inner_contiguous(t) for t in (query, key, value))
    optional = (key_padding_mask, attn_bias, head_thresholds, gate_q_weight, gate_k_weight,
                key_block_stats)
    plain = all(t is None for t in optional)
    try:
        compiled_path = plain and torch_native.enabled()
    except ValueError as exc:  # a bad ASA_TORCH_NATIVE
        raise AsaExportError(str(exc)) from exc
    if compiled_path:
        result = _native_forward(q, k, v, attrs)
        if result is not None:
            return result
    out = torch.empty(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    shapes = telemetry_shapes(q, k, attrs)
    telemetry = [torch.empty(s, dtype=torch.int32, device=q.device) for s in shapes]
    if plain:
        params, size = _plain_params(q, k, v, out, telemetry, attrs)
        run_core("asa_cuda_forward", params, q.device, size)
        return (out, *telemetry)
    params, _keep = make_params(q, k, v, out, telemetry, attrs, key_padding_mask, attn_bias,
                                head_thresholds, gate_q_weight, gate_k_weight, key_block_stats,
                                key_block_stats_blocks)
    run_core("asa_cuda_forward", params, q.device)
    return (out, *telemetry)


def _native_forward(q, k, v, attrs: AsaAttributes):
    """`_forward` of a call without optional inputs through the compiled host path
    (runtime/torch_native.py); None when it cannot be built (warned once, ctypes is used)."""
    mod = torch_native.module()
    if mod is None:
        if not _NATIVE_WARNED:
            _NATIVE_WARNED.append(True)
            warnings.warn(f"the compiled host path could not be built or loaded, using ctypes: "
                          f"{torch_native.build_error}")
        return None
    if not _NATIVE_ENTRIES:
        lib = _library()
        _NATIVE_ENTRIES.extend(torch_native.address(fn) for fn in (
            lib.asa_cuda_workspace_size, lib.asa_cuda_forward, lib.asa_last_error))
    stream = torch.cuda.current_stream(q.device).cuda_stream
    try:
        return tuple(torch_native.plain_forward(mod, q, k, v, attrs, _DTYPES[q.dtype],
                                                tuple(_NATIVE_ENTRIES), stream))
    except ValueError as exc:  # the core's message, as run_core raises it
        raise AsaExportError(str(exc)) from exc


_NATIVE_WARNED: list = []
_NATIVE_ENTRIES: list = []  # addresses of asa_cuda_workspace_size, asa_cuda_forward, asa_last_error


# Params of calls without optional inputs, per (dtype, shapes, strides, attributes): a model
# calls the op with the same few signatures in every layer, and building AsaParams field by field
# plus the workspace query is most of the binding's Python time. Bounded: a decode loop whose
# key length grows makes a new signature every step.
_PLAIN_PARAMS: dict = {}
_PLAIN_PARAMS_MAX = 64


def _plain_params(q, k, v, out, telemetry, attrs: AsaAttributes) -> tuple[AsaParams, int]:
    """(AsaParams, workspace bytes) of a call with no optional input: equal to what
    `make_params` and `workspace_size` give, from a cached template with the pointers set."""
    key = (q.device, q.dtype, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(),
           attrs)
    entry = _PLAIN_PARAMS.get(key)
    if entry is None:
        template, _ = make_params(q, k, v, out, telemetry, attrs)
        entry = (template, workspace_size(template))
        if len(_PLAIN_PARAMS) >= _PLAIN_PARAMS_MAX:
            _PLAIN_PARAMS.pop(next(iter(_PLAIN_PARAMS)))  # the oldest signature
        _PLAIN_PARAMS[key] = entry
    params = AsaParams.from_buffer_copy(entry[0])
    params.q, params.k, params.v, params.out = (q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                                out.data_ptr())
    params.block_indices, params.block_counts, params.visible_counts = (
        t.data_ptr() for t in telemetry)
    return params, entry[1]


@sparse_attention_op.register_fake
def _(query, key, value, key_padding_mask, attn_bias, head_thresholds, gate_q_weight,
      gate_k_weight, scale, causal, block_size, threshold, sink_blocks, local_blocks, window,
      softcap, select_per):
    attrs = _attrs(scale, causal, block_size, threshold, sink_blocks, local_blocks, window,
                   softcap, select_per)
    out = query.new_empty(*query.shape[:3], value.shape[3])
    shapes = telemetry_shapes(query, key, attrs)
    return (out, *(query.new_empty(s, dtype=torch.int32) for s in shapes))


def _direct_call_ok(tensors) -> bool:
    """Whether an eager call may run the op's implementation (`_forward`) without the
    torch.library dispatcher: plain tensors, no torch.compile tracing, no dispatch mode (fake
    tensors, tracing tools) and no input that needs autograd (the op has no backward; through
    the dispatcher such a call keeps the op's error). The result is the same either way; on
    the H100 machine's host a call through the dispatcher took 99 µs and the direct call 62 µs
    (S 256, session 16; BENCHMARKS.md "Torch binding: host time per call")."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the dispatch-mode query
        return False  # (it broke the graph at every call, so no CUDA graph covered the model)
    mode = "unknown" if _get_current_dispatch_mode is None else _get_current_dispatch_mode()
    if mode is not None:
        return False
    present = [t for t in tensors if t is not None]
    if any(type(t) is not torch.Tensor for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def sparse_attention(query, key, value, attrs: AsaAttributes = AsaAttributes(),
                     key_padding_mask=None, attn_bias=None, head_thresholds=None,
                     gate_q_weight=None, gate_k_weight=None, *, key_block_stats=None,
                     key_block_stats_blocks=None):
    """Convenience wrapper of ``torch.ops.asa.sparse_attention`` taking an AsaAttributes.

    In eager mode on plain tensors it calls the op's implementation directly (same result,
    without the dispatcher's per-call cost; `_direct_call_ok`); under torch.compile, fake
    tensors, a dispatch mode or autograd it goes through the op.

    Args:
        query: [B, Hq, Sq, D]; key: [B, Hkv, Skv, D]; value: [B, Hkv, Skv, Dv] (CUDA tensors).
        attrs: the node's attributes.
        key_padding_mask: optional [B, Skv] bool/int32/int64, nonzero = keep.
        attn_bias: optional, broadcastable to [B, Hq, Sq, Skv].
        head_thresholds: optional float32 [Hq].
        gate_q_weight: optional float32 [Hq, D, Dg], the learned gate (SPEC.md input 6).
        gate_k_weight: optional float32 [Hkv, 3*D, Dg]; given iff gate_q_weight is.
        key_block_stats: optional caller-kept router statistics from `key_block_stats`
            (float32 [B, Hkv, C, F]); the result is the same, the router reads these rows
            instead of pooling the keys. Calls the core directly (not through the torch op).
        key_block_stats_blocks: valid leading rows (default min(C, NK)); the router pools
            the blocks after them (NK - 1 in a decode loop: see `key_block_stats`).

    Returns:
        (out, block_indices, block_counts, visible_counts).
    """
    tensors = (query, key, value, key_padding_mask, attn_bias, head_thresholds, gate_q_weight,
               gate_k_weight)
    if key_block_stats is not None or _direct_call_ok(tensors):
        return _forward(query, key, value, attrs, key_padding_mask, attn_bias, head_thresholds,
                        gate_q_weight, gate_k_weight, key_block_stats, key_block_stats_blocks)
    return op_call(query, key, value, attrs, key_padding_mask, attn_bias, head_thresholds,
                   gate_q_weight, gate_k_weight)


def op_call(query, key, value, attrs: AsaAttributes = AsaAttributes(), key_padding_mask=None,
            attn_bias=None, head_thresholds=None, gate_q_weight=None, gate_k_weight=None):
    """``torch.ops.asa.sparse_attention`` with the attributes taken from an AsaAttributes, always
    through the dispatcher (what `sparse_attention` does where a direct call is not allowed)."""
    return torch.ops.asa.sparse_attention(
        query, key, value, key_padding_mask, attn_bias, head_thresholds, gate_q_weight,
        gate_k_weight, float(attrs.scale),
        bool(attrs.causal), int(attrs.block_size), float(attrs.threshold),
        int(attrs.sink_blocks), int(attrs.local_blocks), int(attrs.window),
        float(attrs.softcap), int(attrs.select_per))


def route(query, key, attrs: AsaAttributes = AsaAttributes(), key_padding_mask=None,
          head_thresholds=None, gate_q_weight=None, gate_k_weight=None, *,
          key_block_stats=None, key_block_stats_blocks=None):
    """Router only (for timing and tests): the block lists without the attention.

    Args:
        query, key: as in `sparse_attention` (value is not read).
        attrs, key_padding_mask, head_thresholds, gate_q_weight, gate_k_weight,
            key_block_stats, key_block_stats_blocks: as in `sparse_attention`.

    Returns:
        (block_indices, block_counts, visible_counts).
    """
    shapes = telemetry_shapes(query, key, attrs)
    telemetry = [torch.empty(s, dtype=torch.int32, device=query.device) for s in shapes]
    out = query.new_empty(1, 1, 1, 1)  # not written by the router; 4-D for make_params' strides
    params, _keep = make_params(query, key, key, out, telemetry, attrs, key_padding_mask, None,
                                head_thresholds, gate_q_weight, gate_k_weight, key_block_stats,
                                key_block_stats_blocks)
    run_core("asa_cuda_route", params, query.device)
    return tuple(telemetry)


def dense_flops(batch: int, heads_q: int, seq_q: int, seq_kv: int, head_dim: int,
                causal: bool) -> float:
    """Dense attention FLOPs, the convention of the FlashAttention benchmarks:
    4 * B * Hq * Sq * Skv * D (two matmuls of 2 flops per multiply-add), halved when causal
    (for Sq == Skv).

    Returns:
        FLOP count as a float.
    """
    flops = 4.0 * batch * heads_q * seq_q * seq_kv * head_dim
    return flops / 2 if causal else flops


__all__ = ["AsaParams", "build_cuda_library", "find_cuda_library", "key_block_stats",
           "make_params", "op_call", "route",
           "run_core", "sparse_attention", "sparse_attention_op", "dense_flops",
           "telemetry_shapes", "workspace_size"]
