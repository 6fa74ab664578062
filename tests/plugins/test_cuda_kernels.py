"""GPU tests of the CUDA kernel core through the torch binding (asa_export/runtime/torch_op.py).

Held against the numpy reference (asa_export/contract/reference.py): block selection must match
it (up to near-ties in float32 rounding, bounded below), and the attention output's error
against a float64 computation on the same kept blocks must stay within 2x the error of torch
SDPA run in the same precision on the same mask. Outputs are poisoned before each run.
Skipped without a CUDA GPU; the library comes from $ASA_CUDA_LIB or is built with CMake.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from asa_export.contract import AsaAttributes, num_blocks
from asa_export.contract import reference as ref

POISON = float("nan")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def op():
    from asa_export.runtime import torch_op
    try:
        torch_op.find_cuda_library()
    except Exception:  # noqa: BLE001 - build on first use when nothing is built yet
        torch_op.build_cuda_library(archs="90a" if torch.cuda.get_device_capability()[0] == 9
                                    else "80", jobs=8)
    return torch_op


@dataclasses.dataclass
class Case:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    dim: int
    dtype: str
    attrs: AsaAttributes
    padding: bool = False
    bias: bool = False
    bias_per_head: bool = False
    gappy_mask: bool = False  # kept keys in runs of 45 with gaps of 90 (not a suffix)


def make_inputs(case: Case, seed: int):
    """Fresh random q/k/v with a block-constant component so the router has real structure."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = DTYPES[case.dtype]

    def rand(h, s):
        x = torch.randn(case.batch, h, s, case.dim, generator=g, device="cuda")
        nb = num_blocks(s, case.attrs.block_size)
        blk = torch.randn(case.batch, h, nb, case.dim, generator=g, device="cuda")
        x += 0.7 * blk.repeat_interleave(case.attrs.block_size, dim=2)[:, :, :s]
        return x.to(dt)

    q, k = rand(case.heads_q, case.seq_q), rand(case.heads_kv, case.seq_kv)
    v = torch.randn(case.batch, case.heads_kv, case.seq_kv, case.dim, generator=g,
                    device="cuda").to(dt)
    mask = bias = None
    if case.padding:
        lengths = torch.randint(1, case.seq_kv + 1, (case.batch,), generator=g, device="cuda")
        lengths[0] = case.seq_kv  # one full row, the others shorter
        mask = torch.arange(case.seq_kv, device="cuda")[None] < lengths[:, None]
    if case.gappy_mask:
        # A block's visibility then depends on which of its keys are kept, not on geometry
        # alone (a window edge or the causal edge can fall in a gap).
        offset = torch.randint(0, 135, (case.batch, 1), generator=g, device="cuda")
        j = torch.arange(case.seq_kv, device="cuda")[None] + offset
        mask = j % 135 >= 90
    if case.bias:
        heads = case.heads_q if case.bias_per_head else 1
        bias = torch.randn(case.batch, heads, case.seq_q, case.seq_kv, generator=g,
                           device="cuda").to(dt)
    return q, k, v, mask, bias


def run_poisoned(op, q, k, v, attrs, mask=None, bias=None, thresholds=None):
    """Run asa_cuda_forward on NaN-poisoned outputs (telemetry poisoned with -7)."""
    out = torch.full((*q.shape[:3], v.shape[3]), POISON, dtype=q.dtype, device="cuda")
    tele = [torch.full(s, -7, dtype=torch.int32, device="cuda")
            for s in op.telemetry_shapes(q, k, attrs)]
    params, _keep = op.make_params(q, k, v, out, tele, attrs, mask, bias, thresholds)
    op.run_core("asa_cuda_forward", params, q.device)
    torch.cuda.synchronize()
    return out, tele


def keep_from_indices(indices: np.ndarray) -> np.ndarray:
    nk = indices.shape[-1]
    keep = np.zeros(indices.shape, dtype=bool)
    rows = np.nonzero(indices >= 0)
    keep[(*rows[:-1], indices[rows])] = True
    assert keep.sum() == (indices >= 0).sum()
    del nk
    return keep


def element_mask(keep, visible_elem, heads_q, b):
    """bool [B, Hq, Sq, Skv]: visible keys in kept blocks (keep [B, Hsel, NQ, NK])."""
    per_head = np.repeat(keep, heads_q // keep.shape[1], axis=1)
    seq_q, seq_kv = visible_elem.shape[1:]
    per_elem = per_head[:, :, np.arange(seq_q) // b][:, :, :, np.arange(seq_kv) // b]
    return per_elem & visible_elem[:, None]


def attention64(q, k, v, mask, attrs, bias=None):
    """Float64 masked attention on the GPU; rows with no key give zeros."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = attrs.resolved_scale(q.shape[-1]) * qd @ kd.transpose(-1, -2)
    if attrs.softcap > 0:
        s = attrs.softcap * torch.tanh(s / attrs.softcap)
    if bias is not None:
        s = s + bias.double()
    s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return w @ vd


def sdpa_same_precision(q, k, v, mask, attrs, bias=None):
    """torch SDPA in the inputs' precision on the same element mask (baseline error)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    add = torch.zeros(mask.shape, dtype=q.dtype, device="cuda")
    add = add.masked_fill(~mask, float("-inf"))
    if bias is not None:
        add = add + bias
    if attrs.softcap > 0:  # SDPA has no softcap: compute the scores in the same precision
        s = (attrs.resolved_scale(q.shape[-1]) * (q @ kk.transpose(-1, -2)).float())
        s = attrs.softcap * torch.tanh(s / attrs.softcap)
        s = (s + add.float()).to(q.dtype).float()
        return (torch.softmax(s, -1).to(q.dtype) @ vv)
    return torch.nn.functional.scaled_dot_product_attention(
        q, kk, vv, attn_mask=add, scale=attrs.resolved_scale(q.shape[-1]))


def walk_margins(probs, keep_ref, visible, attrs, seq_q, seq_kv, tau):
    """Per block: |running sum before/after it - tau| in the reference walk order (float32)."""
    forced = ref.forced_blocks(attrs, seq_q, seq_kv)[None, None] & visible[:, None]
    vis = np.broadcast_to(visible[:, None], probs.shape)
    index = np.broadcast_to(np.arange(probs.shape[-1]), probs.shape)
    group = np.where(forced, 0, np.where(vis, 1, 2))
    order = np.lexsort((index, np.where(group == 1, -probs, 0), group), axis=-1)
    p_sorted = np.take_along_axis(np.where(vis, probs, 0).astype(np.float32), order, axis=-1)
    after = np.cumsum(p_sorted, axis=-1, dtype=np.float32)
    before = after - p_sorted
    margin_sorted = np.minimum(np.abs(before - tau), np.abs(after - tau))
    margin = np.empty_like(margin_sorted)
    np.put_along_axis(margin, order, margin_sorted, axis=-1)
    return margin


def check_selection(ours, ref_keep, probs, visible, attrs, seq_q, seq_kv):
    """Selections must agree; a differing row is tolerated only at a float32 near-tie."""
    diff = ours != ref_keep
    rows = np.argwhere(diff.any(-1))
    if len(rows) == 0:
        return 0
    margin = walk_margins(probs, ref_keep, visible, attrs, seq_q, seq_kv, np.float32(
        attrs.threshold))
    for row in map(tuple, rows):
        blocks = np.nonzero(diff[row])[0]
        p = probs[row]
        for kb in blocks:
            near_sum = margin[row][kb] < 2e-5
            near_tie = any(abs(p[kb] - p[m]) <= 1e-6 * max(p[kb], p[m]) + 1e-12
                           for m in blocks if m != kb)
            assert near_sum or near_tie, (
                f"block {kb} of row {row} differs from the reference: P={p[kb]}, "
                f"walk margin {margin[row][kb]}")
    assert len(rows) <= max(1, 0.01 * np.prod(diff.shape[:-1])), f"{len(rows)} rows differ"
    return len(rows)


def check_case(op, case: Case, seed: int = 0):
    q, k, v, mask, bias = make_inputs(case, seed)
    attrs = case.attrs
    out, (indices, counts, vis_counts) = run_poisoned(op, q, k, v, attrs, mask, bias)
    assert not torch.isnan(out).any(), "output not fully written (NaN poison left)"

    # Router against the reference (float32 on the CPU, from the same rounded inputs).
    mask_np = None if mask is None else mask.cpu().numpy()
    qn, kn = q.float().cpu().numpy(), k.float().cpu().numpy()
    probs, visible = ref.router_probs(qn, kn, attrs, mask_np)
    ref_keep = ref.select_blocks(probs, visible, attrs, case.seq_q, case.seq_kv)
    _ref_idx, _ref_counts, ref_vis = ref.telemetry(ref_keep, visible)
    np.testing.assert_array_equal(vis_counts.cpu().numpy(), ref_vis)
    ours = keep_from_indices(indices.cpu().numpy())
    np.testing.assert_array_equal(counts.cpu().numpy(), ours.sum(-1))
    idx = indices.cpu().numpy()
    valid = idx >= 0
    assert (valid[..., :-1] >= valid[..., 1:]).all(), "padding -1 must follow the indices"
    assert (np.diff(np.where(valid, idx, 1 << 30), axis=-1)[valid[..., 1:]] > 0).all()
    check_selection(ours, ref_keep, probs, visible, attrs, case.seq_q, case.seq_kv)

    # Attention against float64 on our kept blocks; bound by SDPA's error in the same precision.
    elem_vis = ref.visibility(case.batch, case.seq_q, case.seq_kv, attrs, mask_np)
    emask = torch.from_numpy(element_mask(ours, elem_vis, case.heads_q,
                                          attrs.block_size)).cuda()
    gold = attention64(q, k, v, emask, attrs, bias)
    has_key = emask.any(-1)
    err = (out.double() - gold).abs()
    assert (out[~has_key] == 0).all(), "rows without a visible key must be zeros"
    base = sdpa_same_precision(q, k, v, emask, attrs, bias)
    base_err = (base.double() - gold).abs()[has_key].max().item() if has_key.any() else 0.0
    ours_err = err[has_key].max().item() if has_key.any() else 0.0
    assert ours_err <= 2 * base_err + 1e-6, f"max error {ours_err:.3g} vs SDPA {base_err:.3g}"
    return ours_err, base_err


def A(**kw):
    return AsaAttributes(**kw)


CASES = {
    "s97_d64_g1_bf16_causal": Case(2, 8, 8, 97, 97, 64, "bf16",
                                   A(causal=True, threshold=0.6)),
    "s1025_d128_g3_fp16_full_b128_group": Case(1, 12, 4, 1025, 1025, 128, "fp16",
                                               A(threshold=0.5, block_size=128, select_per=1)),
    "s1025_d64_g4_bf16_window": Case(1, 8, 2, 1025, 1025, 64, "bf16",
                                     A(causal=True, window=300, threshold=0.7)),
    "s4099_d128_g8_bf16_causal_group": Case(1, 8, 1, 4099, 4099, 128, "bf16",
                                            A(causal=True, threshold=0.5, block_size=128,
                                              select_per=1)),
    "s4099_d64_g3_fp32_causal": Case(1, 3, 1, 4099, 4099, 64, "fp32",
                                     A(causal=True, threshold=0.5)),
    "s1025_d128_g4_fp32_full_window": Case(1, 4, 1, 1025, 1025, 128, "fp32",
                                           A(window=200, threshold=0.8, local_blocks=2)),
    "sq97_skv1025_d128_bf16_causal": Case(2, 4, 4, 97, 1025, 128, "bf16",
                                          A(causal=True, threshold=0.5, sink_blocks=2)),
    "s1025_d64_fp16_softcap_bias_padding": Case(2, 4, 2, 1025, 1025, 64, "fp16",
                                                A(causal=True, threshold=0.6, softcap=5.0),
                                                padding=True, bias=True),
    "s1025_d128_bf16_padding_full": Case(3, 4, 1, 1025, 1025, 128, "bf16",
                                         A(threshold=0.4, block_size=128), padding=True),
    "decode1_kv4099_d128_bf16_group": Case(2, 8, 2, 1, 4099, 128, "bf16",
                                           A(causal=True, threshold=0.5, select_per=1)),
    "decode16_kv4099_d64_fp16_padding": Case(2, 8, 8, 16, 4099, 64, "fp16",
                                             A(causal=True, threshold=0.3), padding=True),
    "decode4_kv1025_d128_bf16_dense": Case(1, 8, 1, 4, 1025, 128, "bf16",
                                           A(causal=True, threshold=1.0, block_size=128)),
    "decode16_packed_kv1025_d64_fp16_softcap_bias_padding": Case(
        2, 8, 2, 16, 1025, 64, "fp16", A(causal=True, threshold=0.5, select_per=1, softcap=20.0),
        padding=True, bias=True, bias_per_head=True),
    "decode2_packed_kv4099_d128_bf16_window": Case(
        1, 32, 8, 2, 4099, 128, "bf16", A(causal=True, threshold=0.6, select_per=1, window=2000)),
    "s97_d96_bf16_simple_path": Case(1, 4, 2, 97, 97, 96, "bf16", A(causal=True, threshold=0.7)),
    # >= 512 key blocks in few lists: the CTA selection sorting 1024 keys in registers.
    "decode1_kv40000_d64_bf16_cta_select": Case(1, 8, 2, 1, 40000, 64, "bf16",
                                               A(causal=True, threshold=0.5)),
    "decode1_packed_kv70000_d128_bf16_cta_select": Case(
        1, 16, 4, 1, 70000, 128, "bf16", A(causal=True, threshold=0.3, block_size=128,
                                           select_per=1)),
    # A long decode list (1025 key blocks), wide forced sink and local ranges, a non-causal
    # decode (local band on both sides of the last block) in fp32.
    "decode1_packed_kv131077_d128_bf16_1025_blocks": Case(
        1, 8, 2, 1, 131077, 128, "bf16", A(causal=True, threshold=0.2, block_size=128,
                                           select_per=1)),
    "decode1_kv40000_d64_bf16_wide_forced": Case(
        1, 4, 2, 1, 40000, 64, "bf16", A(causal=True, threshold=0.5, sink_blocks=100,
                                         local_blocks=70)),
    "decode3_kv5000_d64_fp32_full_group": Case(
        2, 4, 2, 3, 5000, 64, "fp32", A(threshold=0.6, local_blocks=2, select_per=1)),
}

@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(op, name):
    check_case(op, CASES[name], seed=hash(name) % 1000)


@pytest.mark.parametrize("name", ["decode1_packed_kv131077_d128_bf16_1025_blocks",
                                  "s1025_d128_g3_fp16_full_b128_group"])
def test_chained_launches_change_nothing(op, name, monkeypatch):
    """Programmatic dependent launch (ASA_CUDA_PDL, compute capability 9+: each kernel of the
    chain may start before the previous one ends and waits for it before touching memory) gives
    the same lists and the same output, bit for bit, as ordinary launches, call after call."""
    case = CASES[name]
    q, k, v, mask, bias = make_inputs(case, 6)
    results = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("ASA_CUDA_PDL", pdl)
        results[pdl] = [run_poisoned(op, q, k, v, case.attrs, mask, bias) for _ in range(3)]
    first_out, first_lists = results["0"][0]
    for out, lists in results["0"][1:] + results["1"]:
        assert torch.equal(out, first_out)
        for a, b in zip(lists, first_lists):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tau_one_is_dense_attention(op, dtype):
    """tau = 1 keeps every visible block: the output is plain causal attention."""
    case = Case(1, 8, 2, 1025, 1025, 128, dtype, A(causal=True, threshold=1.0))
    q, k, v, _, _ = make_inputs(case, 7)
    out, (_, counts, vis_counts) = run_poisoned(op, q, k, v, case.attrs)
    assert (counts == vis_counts[:, None]).all()
    gold = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(4, 1), v.double().repeat_interleave(4, 1),
        is_causal=True)
    base = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    ours_err = (out.double() - gold).abs().max().item()
    base_err = (base.double() - gold).abs().max().item()
    assert ours_err <= 2 * base_err + 1e-6, (ours_err, base_err)


def test_rows_without_visible_keys_are_zero(op):
    """A batch whose keys are all padded, and causal rows before the first key, give zeros."""
    attrs = A(causal=True, threshold=0.5)
    case = Case(2, 4, 2, 200, 130, 64, "bf16", attrs)  # Sq > Skv: rows 0..69 see no key
    q, k, v, _, _ = make_inputs(case, 3)
    mask = torch.ones(2, 130, dtype=torch.bool, device="cuda")
    mask[1] = False
    out, _ = run_poisoned(op, q, k, v, attrs, mask)
    assert (out[1] == 0).all()
    assert (out[0, :, :70] == 0).all()
    assert (out[0, :, 70:].abs().sum(-1) > 0).all()


def assert_selection_exact(op, q, k, v, attrs, check_reference=None):
    """The router's lists and counts equal the reference's exactly (inputs whose router
    arithmetic is exact up to exp). check_reference(ref_counts) first asserts the case's
    premise on the reference."""
    _, (indices, counts, _) = run_poisoned(op, q, k, v, attrs)
    probs, visible = ref.router_probs(q.float().cpu().numpy(), k.float().cpu().numpy(), attrs)
    ref_idx, ref_counts, _ = ref.telemetry(
        ref.select_blocks(probs, visible, attrs, q.shape[2], k.shape[2]), visible)
    if check_reference is not None:
        check_reference(ref_counts)
    np.testing.assert_array_equal(indices.cpu().numpy(), ref_idx)
    np.testing.assert_array_equal(counts.cpu().numpy(), ref_counts)


def test_selection_exact_on_exact_scores(op):
    """With block-constant integer inputs every float32 router step is exact up to exp, so the
    kept sets must equal the reference's exactly."""
    attrs = A(causal=False, threshold=0.55, block_size=64, sink_blocks=1, local_blocks=1)
    g = torch.Generator().manual_seed(11)
    b, nq, nk, d = 2, 5, 17, 64
    qb = torch.randint(-3, 4, (b, 4, nq, d), generator=g).float() / 8
    kb = torch.randint(-3, 4, (b, 2, nk, d), generator=g).float() / 8
    q = qb.repeat_interleave(64, 2).cuda().to(torch.bfloat16)
    k = kb.repeat_interleave(64, 2).cuda().to(torch.bfloat16)
    for select_per in (0, 1):
        assert_selection_exact(op, q, k, k, dataclasses.replace(attrs, select_per=select_per))


def test_selection_exact_ties_many_blocks(op):
    """More than 512 key blocks in decode (the one-CTA-per-list selection, which sorts values
    only) with every router probability exactly equal (K = 0: every logit 0, P = 1 / visible):
    the walk stops inside the run of ties and must keep the lowest block indices, as the
    reference does."""
    nk, d = 600, 64
    q = torch.randn(1, 4, 1, d, generator=torch.Generator().manual_seed(3)).cuda().to(torch.bfloat16)
    k = torch.zeros(1, 2, nk * 64, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, nk * 64, d, generator=torch.Generator().manual_seed(4)).cuda().to(torch.bfloat16)
    for select_per, tau in ((0, 0.5), (1, 0.3), (0, 0.9)):
        a = A(causal=True, threshold=tau, block_size=64, sink_blocks=1, local_blocks=1,
              select_per=select_per)

        def stopped_inside_ties(ref_counts):
            assert 2 < ref_counts.min() and ref_counts.max() < nk

        assert_selection_exact(op, q, k, v, a, stopped_inside_ties)


@pytest.mark.parametrize("fused", ["0", "1"])
def test_selection_exact_three_levels_over_1024_blocks(op, fused, monkeypatch):
    """Decode with 1100 key blocks (select_kernel's register sort of 2048 keys, 8 per thread;
    with fused = 1 route_decode_kernel's ranks over 32-bit values): three exact probability
    levels (30 blocks high, 60 middle, the rest low, scattered), tau stopping inside the middle
    run of ties. The kept sets must equal the reference's exactly, lowest indices first among
    the ties."""
    if fused == "1" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused router needs compute capability 9.0+ (thread-block clusters)")
    monkeypatch.setenv("ASA_CUDA_FUSED_ROUTE", fused)
    nk, d = 1100, 64
    g = torch.Generator().manual_seed(21)
    q = (torch.randint(1, 4, (1, 4, 1, d), generator=g).float() / 8).cuda().to(torch.bfloat16)
    level = torch.zeros(nk)
    order = torch.randperm(nk - 2, generator=g) + 1  # block 0 (sink) and the last (local) stay low
    level[order[:30]], level[order[30:90]] = 2.0, 1.0
    k = level.repeat_interleave(64)[None, None, :, None].expand(1, 2, nk * 64, d).contiguous()
    k = k.cuda().to(torch.bfloat16)  # logits scale * level * sum(q): about 2 per level
    v = torch.randn(1, 2, nk * 64, d, generator=g).cuda().to(torch.bfloat16)
    for select_per, tau in ((0, 0.6), (1, 0.6), (1, 0.62)):
        a = A(causal=True, threshold=tau, block_size=64, sink_blocks=1, local_blocks=1,
              select_per=select_per)

        def stopped_inside_middle_ties(ref_counts):
            middle = ref_counts - 2 - 30  # kept middle-level blocks (2 forced, 30 high)
            assert (1 < middle).all() and (middle < 59).all(), middle

        assert_selection_exact(op, q, k, v, a, stopped_inside_middle_ties)


def test_head_thresholds(op):
    """Per-head tau replaces the attribute; a group uses the max of its heads."""
    case = Case(1, 4, 2, 513, 513, 64, "bf16", A(causal=True, threshold=0.9))
    q, k, v, _, _ = make_inputs(case, 5)
    tau = torch.tensor([0.2, 1.0, 0.4, 0.3], device="cuda")
    for select_per in (0, 1):
        a = dataclasses.replace(case.attrs, select_per=select_per)
        _, (indices, counts, vis) = run_poisoned(op, q, k, v, a, thresholds=tau)
        probs, visible = ref.router_probs(q.float().cpu().numpy(), k.float().cpu().numpy(), a)
        keep = ref.select_blocks(probs, visible, a, 513, 513, tau.cpu().numpy())
        ours = keep_from_indices(indices.cpu().numpy())
        assert (ours != keep).any(-1).sum() <= 1, (
            f"select_per={select_per}: counts {counts.cpu().numpy().tolist()} vs reference "
            f"{keep.sum(-1).tolist()}, visible {vis.cpu().numpy().tolist()}")
        if select_per == 0:
            assert (counts[0, 1] == vis[0]).all()  # tau = 1 on head 1: dense


def test_custom_op_and_fake(op):
    """torch.ops.asa.sparse_attention runs and gives the eager wrapper's direct call bit for bit
    (the wrapper skips the dispatcher on plain tensors), and its fake impl gives the same
    shapes."""
    case = Case(1, 4, 2, 97, 97, 64, "bf16", A(causal=True, threshold=0.5))
    q, k, v, _, _ = make_inputs(case, 9)
    real = op.op_call(q, k, v, case.attrs)
    direct = op.sparse_attention(q, k, v, case.attrs)
    assert all(torch.equal(x, y) for x, y in zip(real, direct))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = op.sparse_attention(fq, fk, fv, case.attrs)
    assert [tuple(t.shape) for t in real] == [tuple(t.shape) for t in fake]
    assert [t.dtype for t in real] == [t.dtype for t in fake]


def test_torch_compile_reduce_overhead_replays_the_op(op):
    """torch.compile(mode="reduce-overhead", fullgraph=True) over a function around the op (an
    element-wise op before and after it, exact in floating point so that Inductor's fused
    kernels give eager's bits): no graph break, Inductor's CUDA graphs not skipped for the op,
    and each call on new inputs gives the eager result bit for bit (the first calls compile and
    record, the later ones replay)."""
    from torch._dynamo.utils import counters
    case = Case(1, 4, 2, 97, 97, 64, "bf16", A(causal=True, threshold=0.5))

    def fn(q, k, v):
        out, _, counts, _ = op.sparse_attention(q * 2, k, v, case.attrs)
        return out.float() * 0.5, counts

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for seed in range(5):
        q, k, v, _, _ = make_inputs(case, 20 + seed)
        got = [t.clone() for t in compiled(q, k, v)]
        expected = fn(q, k, v)
        assert all(torch.equal(x, y) for x, y in zip(got, expected)), seed
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])


def test_cached_params_give_make_params_result(op, monkeypatch):
    """The eager call's cached AsaParams template (`_plain_params`) against params built field
    by field (`run_poisoned`), bit for bit: a new signature, the same signature again with other
    tensors (the pointers must be this call's), and keys that are a view into a longer cache."""
    monkeypatch.setenv("ASA_TORCH_NATIVE", "0")  # the ctypes path, even where the other is built
    op._PLAIN_PARAMS.clear()
    case = Case(1, 6, 2, 97, 97, 64, "bf16", A(causal=True, threshold=0.6))
    for seed in (3, 4):
        q, k, v, _, _ = make_inputs(case, seed)
        ours = op.sparse_attention(q, k, v, case.attrs)
        expected = run_poisoned(op, q, k, v, case.attrs)
        assert torch.equal(ours[0], expected[0])
        assert all(torch.equal(x, y) for x, y in zip(ours[1:], expected[1]))
    long_k = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    long_v = torch.randn_like(long_k)
    q = torch.randn(1, 6, 1, 64, device="cuda", dtype=torch.bfloat16)
    for length in (257, 257, 290):
        k, v = long_k[:, :, :length], long_v[:, :, :length]
        ours = op.sparse_attention(q, k, v, case.attrs)
        expected = run_poisoned(op, q, k, v, case.attrs)
        assert torch.equal(ours[0], expected[0]), length
    assert len(op._PLAIN_PARAMS) == 3


def test_compiled_host_path_gives_the_same_bits(op, monkeypatch):
    """ASA_TORCH_NATIVE=1 (plugins/torch/asa_torch_op.cpp, built here against this torch) against
    params built field by field, bit for bit: prefill, and a decode row on a KV-cache view; the
    core's rejection keeps its message."""
    from asa_export.errors import AsaExportError
    from asa_export.runtime import torch_native
    assert torch_native.module() is not None, torch_native.build_error
    monkeypatch.setenv("ASA_TORCH_NATIVE", "1")
    case = Case(1, 6, 2, 97, 97, 64, "bf16", A(causal=True, threshold=0.6))
    q, k, v, _, _ = make_inputs(case, 5)
    long_k = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    for q, k, v in ((q, k, v), (q[:, :, -1:], long_k[:, :, :257], long_k[:, :, 1:258])):
        ours = op.sparse_attention(q, k, v, case.attrs)
        expected = run_poisoned(op, q, k, v, case.attrs)
        assert torch.equal(ours[0], expected[0])
        assert all(torch.equal(x, y) for x, y in zip(ours[1:], expected[1]))
    bad = torch.randn(1, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(AsaExportError, match="multiple"):
        op.sparse_attention(bad, bad[:, :2], bad[:, :2], A())


def test_invalid_params_raise(op):
    from asa_export.errors import AsaExportError
    q = torch.randn(1, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(AsaExportError, match="multiple"):
        op.sparse_attention(q, k, k, A())


# Shapes the Hopper wgmma kernel covers (attention_wgmma.cu: fp16/bf16, D 64/128, block_size
# 128, prefill, no padding mask / bias / softcap), each run through both prefill kernels:
# "wgmma" is the default dispatch (the mma.sync kernel on non-Hopper GPUs), "mma" forces the
# mma.sync kernel with ASA_CUDA_WGMMA=0.
WGMMA_CASES = {
    "s1025_d128_g4_bf16_causal": Case(1, 8, 2, 1025, 1025, 128, "bf16",
                                      A(causal=True, threshold=0.5, block_size=128)),
    "s1100_d64_g1_fp16_full": Case(2, 4, 4, 1100, 1100, 64, "fp16",
                                   A(threshold=0.6, block_size=128)),
    "sq300_skv1025_d128_g4_fp16_causal_window": Case(
        2, 4, 1, 300, 1025, 128, "fp16", A(causal=True, window=400, threshold=0.7,
                                           block_size=128)),
    "s1025_d64_g3_bf16_full_window_group": Case(1, 6, 2, 1025, 1025, 64, "bf16",
                                                A(window=300, threshold=0.6, block_size=128,
                                                  select_per=1)),
    "s2049_d128_g8_bf16_dense_causal": Case(1, 8, 1, 2049, 2049, 128, "bf16",
                                            A(causal=True, threshold=1.0, block_size=128)),
}


@pytest.mark.parametrize("path", ["wgmma", "mma"])
@pytest.mark.parametrize("name", list(WGMMA_CASES))
def test_prefill_paths_match_reference(op, name, path, monkeypatch):
    if path == "mma":
        monkeypatch.setenv("ASA_CUDA_WGMMA", "0")
    check_case(op, WGMMA_CASES[name], seed=hash(name) % 1000)


def attention_kernels_run(op, case: Case) -> set[str]:
    """Names of the attention kernels that one forward of `case` launched (torch profiler)."""
    q, k, v, _, _ = make_inputs(case, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_poisoned(op, q, k, v, case.attrs)
    return {e.name for e in prof.events() if "attn_" in e.name}


def test_hopper_dispatch_takes_wgmma_kernel(op, monkeypatch):
    """On H100/H200 the covered prefill shapes run the wgmma kernel, and ASA_CUDA_WGMMA=0
    switches them to the mma.sync kernel (so the comparison above tests both)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    case = WGMMA_CASES["s1025_d128_g4_bf16_causal"]
    names = attention_kernels_run(op, case)
    assert any("attn_wgmma_kernel" in n for n in names), names
    monkeypatch.setenv("ASA_CUDA_WGMMA", "0")
    names = attention_kernels_run(op, case)
    assert any("attn_mma_kernel" in n for n in names), names
    assert not any("attn_wgmma_kernel" in n for n in names), names


# Packed decode groups of at most 16 query rows (G·Sq ≤ 16) split each key tile over the warps by
# default (covered by test_matches_reference); ASA_CUDA_SPLIT_KEYS=0 keeps the 64-row tile.
SPLIT_KEY_CASES = ["decode1_kv4099_d128_bf16_group", "decode2_packed_kv4099_d128_bf16_window"]


@pytest.mark.parametrize("name", SPLIT_KEY_CASES)
def test_packed_decode_without_key_split_matches_reference(op, name, monkeypatch):
    monkeypatch.setenv("ASA_CUDA_SPLIT_KEYS", "0")
    check_case(op, CASES[name], seed=hash(name) % 1000)


def test_packed_decode_dispatch_splits_keys(op, monkeypatch):
    """G·Sq ≤ 16 takes the key-split kernel (template flag split_keys = true); 16 rows per head
    group do not, and ASA_CUDA_SPLIT_KEYS=0 turns it off."""
    split = "true, true"  # packed, split_keys
    names = attention_kernels_run(op, CASES["decode1_kv4099_d128_bf16_group"])
    assert any("attn_mma_kernel" in n and split in n for n in names), names
    names = attention_kernels_run(op, CASES["decode16_packed_kv1025_d64_fp16_softcap_bias_padding"])
    assert names and not any(split in n for n in names), names
    monkeypatch.setenv("ASA_CUDA_SPLIT_KEYS", "0")
    names = attention_kernels_run(op, CASES["decode1_kv4099_d128_bf16_group"])
    assert names and not any(split in n for n in names), names


# Decode (one query block, no gate) can route in one cluster launch on compute capability 9+
# (route_decode_kernel, opt-in with ASA_CUDA_FUSED_ROUTE=1; the separate pool / logits / select
# kernels are the default). Both are held against the reference; on these fixed inputs they also
# agree bit for bit (the logits are the same arithmetic; only the order of the softmax sums
# differs, which moves a selection only at a float32 near-tie of the walk).
FUSED_ROUTE_CASES = ["decode1_packed_kv131077_d128_bf16_1025_blocks",
                     "decode1_kv40000_d64_bf16_wide_forced",
                     "decode16_kv4099_d64_fp16_padding",
                     "decode3_kv5000_d64_fp32_full_group"]


@pytest.mark.parametrize("name", FUSED_ROUTE_CASES)
def test_fused_decode_router_matches_reference_and_separate(op, name, monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused router needs compute capability 9.0+ (thread-block clusters)")
    case = CASES[name]
    q, k, v, mask, bias = make_inputs(case, 8)
    out, lists = run_poisoned(op, q, k, v, case.attrs, mask, bias)
    monkeypatch.setenv("ASA_CUDA_FUSED_ROUTE", "1")
    check_case(op, case, seed=hash(name) % 1000)
    fused_out, fused_lists = run_poisoned(op, q, k, v, case.attrs, mask, bias)
    for a, b in zip(lists, fused_lists):
        assert torch.equal(a, b)
    assert torch.equal(out, fused_out)


def test_decode_router_dispatch(op, monkeypatch):
    """Decode runs the separate router kernels by default; with ASA_CUDA_FUSED_ROUTE=1 on
    compute capability 9+ it runs route_decode_kernel and no select kernel, and a query block of
    64 rows (prefill) still takes the separate kernels."""
    def has(names, part):
        return any(part in n for n in names)

    decode = CASES["decode1_kv40000_d64_bf16_wide_forced"]
    names = router_kernels_run(op, decode)
    assert has(names, "select") and not has(names, "route_decode_kernel"), names
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused router needs compute capability 9.0+ (thread-block clusters)")
    monkeypatch.setenv("ASA_CUDA_FUSED_ROUTE", "1")
    names = router_kernels_run(op, decode)
    assert has(names, "route_decode_kernel") and not has(names, "select"), names
    names = router_kernels_run(op, CASES["sq97_skv1025_d128_bf16_causal"])
    assert has(names, "select") and not has(names, "route_decode_kernel"), names


# The whole decode step in one cluster launch (opt-in ASA_CUDA_FUSED_DECODE=1, compute
# capability 9+; plugins/core/cuda/fused_decode.cuh): route_decode_kernel routes, then attends the
# kept blocks (K/V bulk-copied into shared memory, the likeliest ones speculatively while it
# routes) and merges the CTAs' partials through distributed shared memory. Its router is the
# fused router's code, so the lists must equal that path's bit for bit; the output is held
# against the reference like every path. Cases: the benchmark's shape at a smaller batch (1025
# blocks, 5-key last block, G = 4); select_per 0 with 170 forced blocks (more than the slots);
# three blocks (fewer blocks than a cluster of 16, batch 2); G = 8 non-causal in fp16 (the
# speculating warp also reduces a head; local band on both sides); tau = 1 with the dense fast
# path off (every block kept: the slots are refilled many times).
FUSED_STEP_CASES = {
    "decode1_packed_kv131077_d128_bf16_1025_blocks": CASES[
        "decode1_packed_kv131077_d128_bf16_1025_blocks"],
    "decode1_kv40000_d64_bf16_wide_forced": CASES["decode1_kv40000_d64_bf16_wide_forced"],
    "decode1_packed_kv300_d128_bf16_three_blocks": Case(
        2, 8, 2, 1, 300, 128, "bf16", A(causal=True, threshold=0.5, block_size=128,
                                        select_per=1, local_blocks=1)),
    "decode1_packed_kv70000_d128_fp16_g8_full": Case(
        1, 16, 2, 1, 70000, 128, "fp16", A(threshold=0.6, block_size=128, select_per=1,
                                           local_blocks=2)),
    "decode1_packed_kv9000_d128_fp16_dense": Case(
        1, 16, 4, 1, 9000, 128, "fp16", A(causal=True, threshold=1.0, block_size=128,
                                          select_per=1)),
}


@pytest.mark.parametrize("name", list(FUSED_STEP_CASES))
def test_fused_decode_step_matches_reference_and_router(op, name, monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused decode step needs compute capability 9.0+ (thread-block clusters)")
    case = FUSED_STEP_CASES[name]
    if case.attrs.threshold >= 1:
        monkeypatch.setenv("ASA_CUDA_DENSE_FASTPATH", "0")  # else no router runs at all
    q, k, v, mask, bias = make_inputs(case, 8)
    monkeypatch.setenv("ASA_CUDA_FUSED_ROUTE", "1")
    routed_out, routed_lists = run_poisoned(op, q, k, v, case.attrs, mask, bias)
    monkeypatch.setenv("ASA_CUDA_FUSED_DECODE", "1")
    names = router_kernels_run(op, case)
    assert any("route_decode_kernel" in n for n in names), names
    assert not any("attn_" in n or "merge" in n for n in names), names
    check_case(op, case, seed=8)
    out, lists = run_poisoned(op, q, k, v, case.attrs, mask, bias)
    for a, b in zip(routed_lists, lists):
        assert torch.equal(a, b)
    # Other float32 summation orders than the split-KV kernels, one rounding at the end.
    torch.testing.assert_close(out.float(), routed_out.float(), atol=2e-2, rtol=2e-2)
    for _ in range(2):  # a fixed merge order: the same bits call after call
        again, _ = run_poisoned(op, q, k, v, case.attrs, mask, bias)
        assert torch.equal(out, again)


def test_fused_decode_step_dispatch(op, monkeypatch):
    """Only decode steps in the fused step's scope take it: a softcap, a padding mask or two query
    rows go through the router and the attention kernels as before."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused decode step needs compute capability 9.0+ (thread-block clusters)")
    monkeypatch.setenv("ASA_CUDA_FUSED_DECODE", "1")
    for name in ("decode16_packed_kv1025_d64_fp16_softcap_bias_padding",
                 "decode2_packed_kv4099_d128_bf16_window", "decode3_kv5000_d64_fp32_full_group"):
        names = router_kernels_run(op, CASES[name])
        assert any("attn_" in n for n in names), (name, names)
    names = router_kernels_run(op, DECODE_B128_CASES[
        "decode1_packed_kv5000_d64_fp16_b128_padding_bias_softcap"])
    assert any("attn_" in n for n in names), names


# Packed split-key decode with block_size 128 (two 64-key tiles per block): 1025 blocks; 6 lists
# of 40 blocks with padding, per-head bias and softcap (the per-element path); two query rows per
# head under a window; 3 key blocks (partial last block); dense lists at tau 1.
DECODE_B128_CASES = {
    "decode1_packed_kv131077_d128_bf16_1025_blocks": CASES[
        "decode1_packed_kv131077_d128_bf16_1025_blocks"],
    "decode1_packed_kv5000_d64_fp16_b128_padding_bias_softcap": Case(
        3, 8, 2, 1, 5000, 64, "fp16", A(causal=True, threshold=0.5, block_size=128,
                                        select_per=1, softcap=30.0),
        padding=True, bias=True, bias_per_head=True),
    "decode2_packed_kv4099_d128_bf16_b128_window": Case(
        1, 32, 8, 2, 4099, 128, "bf16", A(causal=True, threshold=0.6, select_per=1,
                                          window=2000, block_size=128)),
    "decode1_packed_kv300_d128_bf16_three_blocks": Case(
        2, 8, 2, 1, 300, 128, "bf16", A(causal=True, threshold=0.5, block_size=128,
                                        select_per=1, local_blocks=1)),
    "decode1_packed_kv9000_d128_fp16_dense": Case(
        1, 16, 4, 1, 9000, 128, "fp16", A(causal=True, threshold=1.0, block_size=128,
                                          select_per=1)),
}


@pytest.mark.parametrize("name", list(DECODE_B128_CASES))
def test_decode_b128_matches_reference(op, name):
    case = DECODE_B128_CASES[name]
    check_case(op, case, seed=hash(name) % 1000)
    # Repeated calls on the same inputs give the same output (split-KV merge in a fixed order).
    q, k, v, mask, bias = make_inputs(case, 3)
    first, _ = run_poisoned(op, q, k, v, case.attrs, mask, bias)
    for _ in range(3):
        again, _ = run_poisoned(op, q, k, v, case.attrs, mask, bias)
        assert torch.equal(first, again)


@pytest.mark.parametrize("path", ["wgmma", "mma"])
def test_caller_lists_with_invisible_blocks(op, path, monkeypatch):
    """asa_cuda_attention on caller-made (ascending) lists that also hold blocks no row of the
    query block sees (causal future blocks, blocks behind the window): they contribute nothing,
    so the output equals the router's lists' output exactly (the wgmma kernel masks such tiles
    fully, also before any visible tile; the mma kernel skips them)."""
    if path == "mma":
        monkeypatch.setenv("ASA_CUDA_WGMMA", "0")
    window = 300
    case = Case(1, 4, 2, 1025, 1025, 128, "bf16",
                A(causal=True, window=window, threshold=0.5, block_size=128))
    q, k, v, _, _ = make_inputs(case, 4)
    ref_out, (indices, counts, vis) = run_poisoned(op, q, k, v, case.attrs)
    idx, cnt = indices.cpu().numpy().copy(), counts.cpu().numpy().copy()
    nk = idx.shape[-1]

    def invisible(qb, kb):
        return kb > qb or kb * 128 + 127 <= qb * 128 - window

    added = 0
    for row in np.ndindex(*cnt.shape):
        qb, kept = row[-1], set(idx[row][:cnt[row]].tolist())
        extra = [kb for kb in range(nk) if invisible(qb, kb) and kb not in kept]
        if extra:
            new = sorted(kept | {extra[0], extra[-1]})
            idx[row][:len(new)] = new
            cnt[row] = len(new)
            added += len(new) - len(kept)
    assert added > 0
    tele = (torch.from_numpy(idx).cuda(), torch.from_numpy(cnt).cuda(), vis)
    out = torch.full_like(ref_out, POISON)
    params, _keep = op.make_params(q, k, v, out, tele, case.attrs)
    op.run_core("asa_cuda_attention", params, q.device)
    torch.cuda.synchronize()
    assert torch.equal(out, ref_out)


# tau >= 1 from the attribute (no head_thresholds): router.cu's dense_lists_kernel writes every
# visible block without routing; ASA_CUDA_DENSE_FASTPATH=0 forces the full router.
DENSE_CASES = {
    "s1025_d64_b64_bf16_causal_padding": Case(2, 4, 2, 1025, 1025, 64, "bf16",
                                              A(causal=True, threshold=1.0), padding=True),
    "s1025_d128_b128_fp16_full_padding_group": Case(
        3, 4, 1, 1025, 1025, 128, "fp16", A(threshold=1.0, block_size=128, select_per=1),
        padding=True),
    "s1025_d64_b64_bf16_causal_window_group_gappy": Case(
        2, 8, 2, 1025, 1025, 64, "bf16", A(causal=True, window=300, threshold=1.0, select_per=1),
        gappy_mask=True),
    "s1025_d128_b128_bf16_full_window_gappy_tau1.5": Case(
        2, 4, 2, 1025, 1025, 128, "bf16", A(window=200, threshold=1.5, block_size=128),
        gappy_mask=True),
    "sq300_skv1025_d128_b128_fp16_causal_window": Case(
        2, 4, 1, 300, 1025, 128, "fp16", A(causal=True, window=400, threshold=1.0,
                                           block_size=128)),
    "sq200_skv130_d64_bf16_causal_padding": Case(2, 4, 2, 200, 130, 64, "bf16",
                                                 A(causal=True, threshold=1.0), padding=True),
    "decode16_kv4099_d64_fp16_window_gappy": Case(
        2, 8, 8, 16, 4099, 64, "fp16", A(causal=True, window=1000, threshold=1.0),
        gappy_mask=True),
    "s4099_d128_b128_bf16_causal_group_sink_local": Case(
        1, 8, 1, 4099, 4099, 128, "bf16", A(causal=True, threshold=1.0, block_size=128,
                                            select_per=1, sink_blocks=2, local_blocks=2)),
}


def dense_telemetry_ref(case: Case, mask):
    """Reference telemetry at tau >= 1: every visible block, for every selection head."""
    attrs = case.attrs
    nq, nk = (num_blocks(s, attrs.block_size) for s in (case.seq_q, case.seq_kv))
    mask_np = None if mask is None else mask.cpu().numpy()
    hsel = case.heads_kv if attrs.select_per else case.heads_q
    # Scores do not matter at tau >= 1: zero probabilities, the reference's visibility.
    visible = ref.block_visibility(
        ref.visibility(case.batch, case.seq_q, case.seq_kv, attrs, mask_np), attrs.block_size)
    probs = np.zeros((case.batch, hsel, nq, nk), np.float32)
    keep = ref.select_blocks(probs, visible, attrs, case.seq_q, case.seq_kv)
    return ref.telemetry(keep, visible)


@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_fastpath_matches_reference_and_router(op, name, monkeypatch):
    """The dense lists equal the reference's exactly, and the full router's (forced with
    ASA_CUDA_DENSE_FASTPATH=0) bit for bit, telemetry and output."""
    case = DENSE_CASES[name]
    q, k, v, mask, bias = make_inputs(case, hash(name) % 1000)
    fast_out, fast_tele = run_poisoned(op, q, k, v, case.attrs, mask, bias)
    for got, want in zip(fast_tele, dense_telemetry_ref(case, mask)):
        np.testing.assert_array_equal(got.cpu().numpy(), want)
    assert (fast_tele[0] >= 0).any(), "the case must keep some block"
    monkeypatch.setenv("ASA_CUDA_DENSE_FASTPATH", "0")
    full_out, full_tele = run_poisoned(op, q, k, v, case.attrs, mask, bias)
    for got, want in zip(fast_tele, full_tele):
        assert torch.equal(got, want)
    assert torch.equal(fast_out.isnan(), full_out.isnan())
    assert torch.equal(fast_out.nan_to_num(), full_out.nan_to_num())
    check_case(op, case, seed=hash(name) % 1000)  # the attention on those lists, vs float64


def router_kernels_run(op, case: Case, thresholds=None) -> set[str]:
    """Names of the kernels one forward of `case` launched (torch profiler)."""
    q, k, v, mask, _ = make_inputs(case, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_poisoned(op, q, k, v, case.attrs, mask, thresholds=thresholds)
    return {e.name for e in prof.events()}


def test_dense_fastpath_is_taken(op, monkeypatch):
    """tau >= 1 runs dense_lists_kernel and no router step; head_thresholds (even all 1) and
    ASA_CUDA_DENSE_FASTPATH=0 take the full router."""
    case = DENSE_CASES["s1025_d64_b64_bf16_causal_padding"]

    def has(names, part):
        return any(part in n for n in names)

    names = router_kernels_run(op, case)
    assert has(names, "dense_lists_kernel"), names
    assert not any(has(names, part) for part in ("pool_q", "pool_k", "logits", "select")), names
    ones = torch.ones(case.heads_q, device="cuda")
    names = router_kernels_run(op, case, thresholds=ones)
    assert has(names, "select") and not has(names, "dense_lists_kernel"), names
    below = dataclasses.replace(case, attrs=dataclasses.replace(case.attrs, threshold=0.99))
    names = router_kernels_run(op, below)
    assert has(names, "select") and not has(names, "dense_lists_kernel"), names
    monkeypatch.setenv("ASA_CUDA_DENSE_FASTPATH", "0")
    names = router_kernels_run(op, case)
    assert has(names, "select") and has(names, "pool_q"), names
    assert not has(names, "dense_lists_kernel"), names
