"""The learned gate (SPEC.md inputs 6-7, "Router (learned gate)") in the native implementations.

CPU (CI): the ctypes mirrors of AsaParams match the C header field for field (checked with the C
compiler), and the torch op's signature carries the two gate tensors (fake tensors, no GPU).
GPU (`gpu` marker, skipped without one): the CUDA core through the torch binding selects the
reference's blocks from the same inputs and its output stays within 2x SDPA's error in the same
precision, on the decode (few query blocks) and prefill logits paths; bad gates are refused.
The CPU core's and the ONNX Runtime op's gate tests are in test_cpu_core.py and test_ort_op.py.

GPU machine, after building libasa_cuda.so (e.g. `tools/gpu_session.sh test` builds it):
    ASA_CUDA_LIB=$PWD/plugins/build/cuda/core/cuda/libasa_cuda.so \
        python3 -m pytest -q tests/plugins/test_gate_native.py
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from asa_export.contract import AsaAttributes  # noqa: E402
from asa_export.contract import reference as ref  # noqa: E402
from asa_export.errors import AsaExportError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HEADER_DIR = REPO / "plugins" / "core" / "include"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------ CPU: the ABI mirrors


def header_layout(fields: list[str], tmp_path: Path) -> tuple[int, dict[str, int]]:
    """(sizeof(AsaParams), offsetof each field) as the C compiler lays out asa_core.h."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    lines = [f'  printf("{f} %zu\\n", offsetof(AsaParams, {f}));' for f in fields]
    src = tmp_path / "layout.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include \"asa/asa_core.h\"\n"
                   "int main(void) {\n  printf(\"sizeof %zu\\n\", sizeof(AsaParams));\n"
                   + "\n".join(lines) + "\n  return 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run([cc, f"-I{HEADER_DIR}", str(src), "-o", str(exe)], check=True,
                   capture_output=True)
    out = dict(line.split() for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True).stdout.splitlines())
    size = int(out.pop("sizeof"))
    return size, {name: int(off) for name, off in out.items()}


def test_ctypes_mirror_matches_the_header(tmp_path):
    """Every field of the ctypes mirror (asa_export.runtime.abi, used by the torch binding and
    the CPU core's tests) sits where the C compiler puts it, and the mirror is as large as the
    struct (a field missing at the end, like the gate's, would shrink it)."""
    from asa_export.runtime.abi import AsaParams as struct
    names = [name for name, _ in struct._fields_]
    assert names[-6:-3] == ["gate_q_weight", "gate_k_weight", "gate_dim"]
    # The caller-kept router statistics (SPEC.md "Acceleration (kernel ABI only)") come last.
    assert names[-3:] == ["key_block_stats", "key_block_stats_blocks",
                          "key_block_stats_capacity"]
    size, offsets = header_layout(names, tmp_path)
    assert ctypes.sizeof(struct) == size
    assert {name: getattr(struct, name).offset for name in names} == offsets


def test_torch_op_signature_takes_the_gate():
    """torch.ops.asa.sparse_attention(q, k, v, mask, bias, thresholds, gate_q, gate_k, ...):
    the fake implementation gives the contract's shapes (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from asa_export.runtime import torch_op

    attrs = AsaAttributes(threshold=0.5, select_per=1)
    with FakeTensorMode():
        q, k = torch.empty(2, 6, 130, 32), torch.empty(2, 2, 200, 32)
        wq, wk = torch.empty(6, 32, 16), torch.empty(2, 96, 16)
        out, idx, cnt, vis = torch_op.sparse_attention(q, k, k, attrs, gate_q_weight=wq,
                                                       gate_k_weight=wk)
    assert tuple(out.shape) == (2, 6, 130, 32)
    assert tuple(idx.shape) == (2, 2, 3, 4) and tuple(cnt.shape) == (2, 2, 3)
    assert tuple(vis.shape) == (2, 3)


@pytest.mark.parametrize("wq_shape,wk_shape,needle", [
    ((4, 16, 8), None, "come together"),
    ((4, 15, 8), (2, 48, 8), "gate_q_weight must have shape [Hq, D, Dg] = [4, 16, Dg]"),
    ((4, 16, 8), (2, 48, 9), "gate_k_weight must have shape [Hkv, 3*D, Dg] = [2, 48, 8]"),
])
def test_torch_binding_checks_gate_shapes(wq_shape, wk_shape, needle):
    """The binding refuses bad gate weights with the contract's shapes before any launch."""
    from asa_export.runtime import torch_op

    q, k = torch.zeros(1, 4, 64, 16), torch.zeros(1, 2, 64, 16)
    tele = [torch.zeros(s, dtype=torch.int32) for s in torch_op.telemetry_shapes(q, k,
                                                                                AsaAttributes())]
    wq = torch.zeros(wq_shape)
    wk = None if wk_shape is None else torch.zeros(wk_shape)
    with pytest.raises(AsaExportError, match=needle.replace("[", r"\[").replace("*", r"\*")):
        torch_op.make_params(q, k, k, q, tele, AsaAttributes(), gate_q_weight=wq,
                             gate_k_weight=wk)


# ------------------------------------------------------------------------------ GPU: parity


@pytest.fixture(scope="module")
def op():
    from asa_export.runtime import torch_op
    try:
        torch_op.find_cuda_library()
    except AsaExportError:  # build on first use when nothing is built yet
        torch_op.build_cuda_library(archs="90a" if torch.cuda.get_device_capability()[0] == 9
                                    else "80", jobs=8)
    return torch_op


@pytest.fixture(scope="module")
def kernels_test():
    """Selection and error-bound helpers of the CUDA kernel tests (one definition of the bar)."""
    from tests.plugins import test_cuda_kernels
    return test_cuda_kernels


def gate_weights(heads_q, heads_kv, dim, dg, seed, gain=1.0):
    """Random float32 gate weights on the GPU. With the kernel tests' inputs (a block-constant
    component in q and k) gain 1 spreads the logits over a few units: densities 0.33-0.73 and
    mean top-block probabilities 0.04-0.85 over GATE_CASES (numpy check of the reference), so
    neither a uniform nor a one-hot router makes the selection trivially equal."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    wq = torch.randn(heads_q, dim, dg, generator=g, device="cuda") * (gain / dim ** 0.5)
    wk = torch.randn(heads_kv, 3 * dim, dg, generator=g, device="cuda") * (
        gain / (3 * dim * dg) ** 0.5)
    return wq, wk


def A(**kw):
    return AsaAttributes(**kw)


# name: (Case fields B, Hq, Hkv, Sq, Skv, D, dtype, attrs, padding), Dg. NQ < 8 takes the
# router's per-warp logits kernel (decode), NQ >= 8 the tiled GEMM.
GATE_CASES = {
    "s97_d64_fp32_causal_gqa": ((2, 8, 2, 97, 97, 64, "fp32",
                                 A(causal=True, threshold=0.6, sink_blocks=0, local_blocks=0)),
                                32),
    "s1025_d128_bf16_group_b128_padding": (
        (2, 12, 4, 1025, 1025, 128, "bf16", A(threshold=0.5, block_size=128, select_per=1),
         True), 32),
    "s600_kv700_d64_fp16_full_window_dg7": (
        (1, 4, 1, 600, 700, 64, "fp16", A(window=300, threshold=0.7)), 7),
    "s4099_d64_bf16_causal": ((1, 8, 2, 4099, 4099, 64, "bf16",
                               A(causal=True, threshold=0.5, local_blocks=2)), 32),
    "decode3_kv4099_d128_fp16_group_padding": (
        (2, 8, 2, 3, 4099, 128, "fp16", A(causal=True, threshold=0.5, select_per=1), True), 16),
    "decode1_kv1025_d64_fp32_tau1": ((1, 4, 2, 1, 1025, 64, "fp32", A(causal=True)), 32),
}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", list(GATE_CASES))
def test_gate_matches_reference(op, kernels_test, name):
    fields, dg = GATE_CASES[name]
    case = kernels_test.Case(*fields)
    seed = sum(map(ord, name))
    q, k, v, mask, _ = kernels_test.make_inputs(case, seed)
    wq, wk = gate_weights(case.heads_q, case.heads_kv, case.dim, dg, seed)
    attrs = case.attrs
    out = torch.full((*q.shape[:3], v.shape[3]), float("nan"), dtype=q.dtype, device="cuda")
    tele = [torch.full(s, -7, dtype=torch.int32, device="cuda")
            for s in op.telemetry_shapes(q, k, attrs)]
    params, _keep = op.make_params(q, k, v, out, tele, attrs, mask, None, None, wq, wk)
    op.run_core("asa_cuda_forward", params, q.device)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "output not fully written (NaN poison left)"
    indices, counts, vis_counts = (t.cpu().numpy() for t in tele)

    # Router: the reference with the gate on the same (rounded) inputs, float32 on the CPU.
    mask_np = None if mask is None else mask.cpu().numpy()
    qn, kn = q.float().cpu().numpy(), k.float().cpu().numpy()
    probs, visible = ref.router_probs(qn, kn, attrs, mask_np, gate_q_weight=wq.cpu().numpy(),
                                      gate_k_weight=wk.cpu().numpy())
    ref_keep = ref.select_blocks(probs, visible, attrs, case.seq_q, case.seq_kv)
    np.testing.assert_array_equal(vis_counts, ref.telemetry(ref_keep, visible)[2])
    ours = kernels_test.keep_from_indices(indices)
    np.testing.assert_array_equal(counts, ours.sum(-1))
    kernels_test.check_selection(ours, ref_keep, probs, visible, attrs, case.seq_q, case.seq_kv)
    if attrs.threshold < 1:
        assert ref.density(counts, vis_counts, counts.shape[1]) < 1.0, "case should be sparse"

    # Router only (asa_cuda_route) gives the same lists as the forward pass.
    again = op.route(q, k, attrs, mask, gate_q_weight=wq, gate_k_weight=wk)
    np.testing.assert_array_equal(again[0].cpu().numpy(), indices)

    # Attention on our kept blocks against float64; bound by SDPA's error in the same precision.
    elem_vis = ref.visibility(case.batch, case.seq_q, case.seq_kv, attrs, mask_np)
    emask = torch.from_numpy(kernels_test.element_mask(ours, elem_vis, case.heads_q,
                                                       attrs.block_size)).cuda()
    gold = kernels_test.attention64(q, k, v, emask, attrs)
    has_key = emask.any(-1)
    assert (out[~has_key] == 0).all(), "rows without a visible key must be zeros"
    base = kernels_test.sdpa_same_precision(q, k, v, emask, attrs)
    base_err = (base.double() - gold).abs()[has_key].max().item()
    ours_err = (out.double() - gold).abs()[has_key].max().item()
    assert ours_err <= 2 * base_err + 1e-6, f"max error {ours_err:.3g} vs SDPA {base_err:.3g}"


@pytest.mark.gpu
@needs_gpu
def test_gate_changes_the_gpu_selection(op):
    """The gate is really used on the GPU: the same inputs route differently without it."""
    attrs = A(causal=True, threshold=0.5, sink_blocks=0, local_blocks=0)
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, 4, 1025, 64, generator=g, device="cuda")
    k = torch.randn(1, 2, 1025, 64, generator=g, device="cuda")
    plain = op.route(q, k, attrs)[0]
    gated = op.route(q, k, attrs, None, None, *gate_weights(4, 2, 64, 32, 5))[0]
    assert (plain != gated).any()


@pytest.mark.gpu
@needs_gpu
def test_core_refuses_a_gate_without_its_width(op):
    """gate_dim 0 with both weights set: cudaErrorInvalidValue and the reason, nothing run."""
    attrs = A(threshold=0.5)
    q = torch.randn(1, 4, 64, 16, device="cuda")
    k = torch.randn(1, 2, 64, 16, device="cuda")
    out = torch.zeros(1, 4, 64, 16, device="cuda")
    tele = [torch.zeros(s, dtype=torch.int32, device="cuda")
            for s in op.telemetry_shapes(q, k, attrs)]
    wq, wk = gate_weights(4, 2, 16, 8, 1)
    params, _keep = op.make_params(q, k, k, out, tele, attrs, None, None, None, wq, wk)
    params.gate_dim = 0
    with pytest.raises(AsaExportError, match="gate_dim"):
        op.run_core("asa_cuda_forward", params, q.device)
