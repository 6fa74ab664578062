"""tools/bench_kernels.py helpers that run without a GPU: kernel names from the profiler, the
table's header."""

from __future__ import annotations

import argparse
import pathlib
import sys

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))

import bench_kernels as bench  # noqa: E402


@pytest.mark.parametrize("name,short", [
    # Kernels in an anonymous namespace: the old split on "(" left an empty name for all of
    # them, so --decode-kernels summed every kernel under one key.
    ("void asa::cuda::(anonymous namespace)::select_kernel<float>(AsaParams, "
     "asa::cuda::Workspace, int)", "select_kernel"),
    ("void asa::cuda::(anonymous namespace)::attn_mma_kernel<__nv_bfloat16, 128, 1, true, "
     "true>(AsaParams, asa::cuda::Workspace)", "attn_mma_kernel"),
    ("void asa::cuda::merge_kernel<__half>(AsaParams, asa::cuda::Workspace)", "merge_kernel"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
     "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"),
])
def test_short_kernel_name(name, short):
    assert bench.short_kernel_name(name) == short


def test_table_header_names_the_shapes_that_ran(capsys):
    """The header states the heads and the decode batch of this run (it used to say B=1, Hq=32,
    Hkv=8 whatever --decode-batch and --heads-* were)."""
    args = argparse.Namespace(heads_q=16, heads_kv=4, decode_batch=4)
    bench.print_table([], "test GPU", args)
    header = capsys.readouterr().out
    assert "Hq=16 Hkv=4" in header
    assert "decode B=4" in header
