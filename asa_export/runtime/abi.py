"""The kernel core's C ABI as seen from Python: a ctypes mirror of `AsaParams`.

plugins/core/include/asa/asa_core.h is the source; field order and types must match it exactly
(tests/plugins/test_gate_native.py compiles a C program to compare the offsets). The torch
binding (runtime/torch_op.py) and the CPU core's tests both use this one mirror. No torch here.
"""

from __future__ import annotations

import ctypes

_i32, _i64, _f32, _vp = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class AsaParams(ctypes.Structure):
    """Mirror of ``AsaParams`` in plugins/core/include/asa/asa_core.h (field order matters)."""

    _fields_ = [
        ("batch", _i32), ("heads_q", _i32), ("heads_kv", _i32), ("seq_q", _i32),
        ("seq_kv", _i32), ("head_dim", _i32), ("head_dim_v", _i32), ("dtype", _i32),
        ("q", _vp), ("q_stride_b", _i64), ("q_stride_h", _i64), ("q_stride_s", _i64),
        ("k", _vp), ("k_stride_b", _i64), ("k_stride_h", _i64), ("k_stride_s", _i64),
        ("v", _vp), ("v_stride_b", _i64), ("v_stride_h", _i64), ("v_stride_s", _i64),
        ("out", _vp), ("o_stride_b", _i64), ("o_stride_h", _i64), ("o_stride_s", _i64),
        ("key_padding_mask", _vp), ("mask_dtype", _i32), ("mask_stride_b", _i64),
        ("bias", _vp), ("bias_stride_b", _i64), ("bias_stride_h", _i64),
        ("bias_stride_q", _i64), ("bias_stride_k", _i64),
        ("head_thresholds", _vp),
        ("scale", _f32), ("causal", _i32), ("block_size", _i32), ("threshold", _f32),
        ("sink_blocks", _i32), ("local_blocks", _i32), ("window", _i32), ("softcap", _f32),
        ("select_per", _i32),
        ("block_indices", _vp), ("block_counts", _vp), ("visible_counts", _vp),
        # Learned gate (SPEC.md inputs 6-7).
        ("gate_q_weight", _vp), ("gate_k_weight", _vp), ("gate_dim", _i32),
        # Caller-kept router statistics (SPEC.md "Acceleration (kernel ABI only)").
        ("key_block_stats", _vp), ("key_block_stats_blocks", _i32),
        ("key_block_stats_capacity", _i32),
    ]
