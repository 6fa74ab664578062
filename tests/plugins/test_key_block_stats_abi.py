"""The caller-kept key block statistics fields of AsaParams (SPEC.md "Acceleration (kernel ABI
only)") as the shared `validate_params` checks them, through the CPU core (CI, no GPU).

Only the CUDA router reads the statistics; the CPU core validates the fields and otherwise
ignores them (the semantics do not change), so valid statistics give the same lists as none.
The GPU behaviour is tested in test_decode_cache.py. Build first: `python tools/build_plugins.py`
(or set ASA_CPU_LIB to libasa_cpu.so).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from asa_export.contract import AsaAttributes  # noqa: E402
from asa_export.runtime import torch_op  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LIB_PATH = Path(os.environ.get("ASA_CPU_LIB", REPO / "plugins/build/core/cpu/libasa_cpu.so"))
if not LIB_PATH.exists():
    pytest.skip(f"CPU kernel core not built ({LIB_PATH} missing): run tools/build_plugins.py",
                allow_module_level=True)

ASA_ERR_INVALID_ARGUMENT = 1
ATTRS = AsaAttributes(causal=True, block_size=64, threshold=0.5, select_per=1)
NK = 4  # Skv = 200, block 64


@pytest.fixture(scope="module")
def lib():
    cdll = ctypes.CDLL(str(LIB_PATH))
    cdll.asa_cpu_route.argtypes = [ctypes.POINTER(torch_op.AsaParams), ctypes.c_int]
    cdll.asa_cpu_route.restype = ctypes.c_int
    cdll.asa_last_error.restype = ctypes.c_char_p
    return cdll


def route(lib, **fields):
    """asa_cpu_route on fixed random inputs with `fields` set on the params.

    Returns:
        (status, error text, (block_indices, block_counts, visible_counts)).
    """
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 16, generator=g)
    k = torch.randn(1, 2, 200, 16, generator=g)
    out = torch.empty(1, 4, 3, 16)
    tele = [torch.full(s, -7, dtype=torch.int32) for s in torch_op.telemetry_shapes(q, k, ATTRS)]
    params, keep = torch_op.make_params(q, k, k, out, tele, ATTRS)
    for name, value in fields.items():
        setattr(params, name, value)
    status = lib.asa_cpu_route(ctypes.byref(params), 1)
    return status, lib.asa_last_error().decode(), tele


def test_valid_stats_are_accepted_and_change_nothing_on_cpu(lib):
    stats = torch.zeros(1, 2, 6, 16)
    base = route(lib)
    with_stats = route(lib, key_block_stats=stats.data_ptr(), key_block_stats_blocks=NK,
                       key_block_stats_capacity=6)
    assert base[0] == 0 and with_stats[0] == 0, with_stats[1]
    assert all(torch.equal(a, b) for a, b in zip(base[2], with_stats[2]))
    assert base[2][1].min() >= 1  # the lists were written


@pytest.mark.parametrize("fields, message", [
    ({"key_block_stats_blocks": 2}, "key_block_stats_blocks is 2 but key_block_stats is NULL"),
    ({"key_block_stats_blocks": NK + 1, "stats": True},
     f"key_block_stats_blocks must be in [0, NK = ceil(Skv / block_size) = {NK}], got {NK + 1}"),
    ({"key_block_stats_blocks": -1, "stats": True}, "key_block_stats_blocks must be in [0, NK"),
    ({"key_block_stats_blocks": 3, "key_block_stats_capacity": 2, "stats": True},
     "key_block_stats_capacity (2) is smaller than key_block_stats_blocks (3)"),
    ({"key_block_stats_capacity": -1, "stats": True},
     "key_block_stats_capacity must be >= 0 (0 = NK), got -1"),
], ids=["count_without_pointer", "past_nk", "negative", "capacity_too_small",
        "negative_capacity"])
def test_bad_stats_fields_are_refused(lib, fields, message):
    stats = torch.zeros(1, 2, NK, 16)
    fields = dict(fields)
    if fields.pop("stats", False):
        fields["key_block_stats"] = stats.data_ptr()
    status, error, _ = route(lib, **fields)
    assert status == ASA_ERR_INVALID_ARGUMENT
    assert message in error
