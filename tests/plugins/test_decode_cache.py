"""Caller-kept key block statistics of the CUDA router (SPEC.md "Acceleration (kernel ABI only)").

A decode loop keeps the router's pooled key statistics (block means; with the learned gate
concat(mean, max, min)) across steps and passes them as `key_block_stats`, refreshing only the
block the new keys land in (`asa_cuda_key_block_stats`). The semantics must not change: with
stats from the helper, block selection and output are identical (bit for bit) to the no-stats
path; stats refreshed step by step equal stats computed from scratch and the reference's block
pooling; bad sizes are refused with a message naming the field.

GPU only (`gpu` marker, skipped without a CUDA GPU); the library comes from $ASA_CUDA_LIB.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from asa_export.contract import AsaAttributes, num_blocks  # noqa: E402
from asa_export.errors import AsaExportError  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def op():
    from asa_export.runtime import torch_op
    torch_op.find_cuda_library()
    return torch_op


@dataclasses.dataclass
class Case:
    seq_q: int
    seq_kv: int
    heads_q: int = 8
    heads_kv: int = 2
    dim: int = 64
    block_size: int = 64
    dtype: str = "bf16"
    select_per: int = 1
    padding: bool = False
    gate: bool = False


def make_inputs(case: Case, seed: int):
    """Keys with a block-constant component (a router with real structure), a padding mask with
    holes in the middle and short rows, and gate weights when asked."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = DTYPES[case.dtype]
    nk = num_blocks(case.seq_kv, case.block_size)
    q = torch.randn(2, case.heads_q, case.seq_q, case.dim, generator=g, device="cuda")
    k = torch.randn(2, case.heads_kv, case.seq_kv, case.dim, generator=g, device="cuda")
    blk = torch.randn(2, case.heads_kv, nk, case.dim, generator=g, device="cuda")
    k += blk.repeat_interleave(case.block_size, dim=2)[:, :, :case.seq_kv]
    v = torch.randn(2, case.heads_kv, case.seq_kv, case.dim, generator=g, device="cuda")
    mask = gate = None
    if case.padding:
        mask = torch.rand(2, case.seq_kv, generator=g, device="cuda") > 0.2
        mask[1, case.seq_kv // 3:] = False  # a short row: trailing blocks with no kept key
    if case.gate:
        dg = 16
        gate = (0.3 * torch.randn(case.heads_q, case.dim, dg, generator=g, device="cuda"),
                0.3 * torch.randn(case.heads_kv, 3 * case.dim, dg, generator=g, device="cuda"))
    return q.to(dt), k.to(dt), v.to(dt), mask, gate


def attrs_for(case: Case, threshold: float = 0.6) -> AsaAttributes:
    return AsaAttributes(causal=True, block_size=case.block_size, threshold=threshold,
                         sink_blocks=1, local_blocks=1, select_per=case.select_per)


CASES = {
    "sq1_gqa4": Case(1, 1000),
    "sq16_gqa4_pad": Case(16, 1000, padding=True),
    "sq1_gate": Case(1, 1000, gate=True),
    "sq16_gate_pad_fp16": Case(16, 777, dtype="fp16", padding=True, gate=True),
    "sq7_b128_d128_fp32": Case(7, 4099, heads_q=6, heads_kv=2, dim=128, block_size=128,
                               dtype="fp32"),
    "sq3_mha_per_head": Case(3, 1500, heads_q=4, heads_kv=4, select_per=0, padding=True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("valid", ["all", "all_but_last", "none"])
@pytest.mark.parametrize("fused", ["0", "1"])
def test_stats_give_identical_selection_and_output(op, name, valid, fused, monkeypatch):
    """Router and attention with helper stats (all blocks, all but the last, none) equal the
    no-stats path bit for bit: same kept lists, counts, visible counts and output; also for the
    opt-in one-launch decode router (ASA_CUDA_FUSED_ROUTE=1), which pools up to two fresh key
    blocks itself."""
    monkeypatch.setenv("ASA_CUDA_FUSED_ROUTE", fused)
    case = CASES[name]
    q, k, v, mask, gate = make_inputs(case, seed=sum(map(ord, name + valid)))
    attrs = attrs_for(case)
    wq, wk = gate if gate else (None, None)
    stats = op.key_block_stats(k, attrs, key_padding_mask=mask, gate=gate is not None)
    nk = stats.shape[2]
    blocks = {"all": nk, "all_but_last": nk - 1, "none": 0}[valid]
    if valid != "all":  # rows past `blocks` must not be read: poison them
        stats[:, :, blocks:] = float("nan")
    base = op.sparse_attention(q, k, v, attrs, key_padding_mask=mask, gate_q_weight=wq,
                               gate_k_weight=wk)
    fast = op.sparse_attention(q, k, v, attrs, key_padding_mask=mask, gate_q_weight=wq,
                               gate_k_weight=wk, key_block_stats=stats,
                               key_block_stats_blocks=blocks)
    counts = base[2]
    assert 0 < counts.sum() < counts.numel() * nk, "router kept all or nothing: weak test"
    for a, b, what in zip(base, fast, ("out", "block_indices", "block_counts", "visible")):
        assert torch.equal(a, b), what
    routed = op.route(q, k, attrs, key_padding_mask=mask, gate_q_weight=wq, gate_k_weight=wk,
                      key_block_stats=stats, key_block_stats_blocks=blocks)
    for a, b in zip(base[1:], routed):
        assert torch.equal(a, b)


def reference_stats(k, mask, block: int, gate: bool):
    """Block mean (and max, min with the gate) of the kept keys in float32; zeros when none."""
    b, h, s, d = k.shape
    nk = num_blocks(s, block)
    x = k.float()
    keep = torch.ones(b, s, dtype=torch.bool, device=k.device) if mask is None else mask.bool()
    pad = nk * block - s
    x = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, nk, block, d)
    m = torch.nn.functional.pad(keep, (0, pad)).view(b, 1, nk, block, 1)
    cnt = m.sum(3)
    mean = torch.where(cnt > 0, (x * m).sum(3) / cnt.clamp(min=1), 0.0)
    if not gate:
        return mean
    mx = torch.where(cnt > 0, x.masked_fill(~m, -float("inf")).amax(3), 0.0)
    mn = torch.where(cnt > 0, x.masked_fill(~m, float("inf")).amin(3), 0.0)
    return torch.cat([mean, mx, mn], dim=-1)


@pytest.mark.parametrize("gate", [False, True], ids=["means", "gate"])
@pytest.mark.parametrize("padding", [False, True], ids=["nomask", "mask"])
def test_incremental_refresh_equals_scratch(op, gate, padding):
    """A decode loop: stats for a prompt, then keys appended (1, 1, 62, 1, 70 tokens, crossing
    block boundaries), refreshing from the block of the first new key into one buffer of fixed
    capacity; after every step the rows equal stats from scratch and the reference pooling, and
    routing with them equals routing without."""
    case = Case(1, 700, padding=padding, gate=gate)
    q, k_all, _, _, gate_w = make_inputs(dataclasses.replace(case, seq_kv=906), seed=7)
    attrs = attrs_for(case)
    wq, wk = gate_w if gate_w else (None, None)
    mask_all = None
    if padding:  # fixed holes in the prompt; appended keys are kept
        mask_all = torch.ones(2, 906, dtype=torch.bool, device="cuda")
        mask_all[0, 100:180] = False
        mask_all[1, 3:64] = False
    width = (3 if gate else 1) * case.dim
    buf = torch.full((2, case.heads_kv, 20, width), float("nan"), device="cuda")
    length = 700
    op.key_block_stats(k_all[:, :, :length], attrs, _prefix(mask_all, length), gate, out=buf)
    for step in (1, 1, 62, 1, 70):
        first = length // attrs.block_size
        length += step
        k, mask = k_all[:, :, :length], _prefix(mask_all, length)
        op.key_block_stats(k, attrs, mask, gate, out=buf, first_block=first)
        nk = num_blocks(length, attrs.block_size)
        scratch = op.key_block_stats(k, attrs, mask, gate)
        assert torch.equal(buf[:, :, :nk], scratch)
        torch.testing.assert_close(scratch, reference_stats(k, mask, attrs.block_size, gate),
                                   rtol=1e-5, atol=1e-5)
        base = op.route(q, k, attrs, key_padding_mask=mask, gate_q_weight=wq, gate_k_weight=wk)
        fast = op.route(q, k, attrs, key_padding_mask=mask, gate_q_weight=wq, gate_k_weight=wk,
                        key_block_stats=buf, key_block_stats_blocks=nk)
        for a, b in zip(base, fast):
            assert torch.equal(a, b)


def _prefix(mask, length):
    return None if mask is None else mask[:, :length].contiguous()


def test_invalid_sizes_are_refused(op):
    """Stats rows past NK, a buffer too small, a wrong row width, a first block past NK and a
    count without a pointer are refused with the field named."""
    case = Case(1, 1000)
    q, k, v, _, _ = make_inputs(case, seed=3)
    attrs = attrs_for(case)
    stats = op.key_block_stats(k, attrs)
    nk = stats.shape[2]
    with pytest.raises(AsaExportError, match="key_block_stats_blocks"):
        op.route(q, k, attrs, key_block_stats=stats, key_block_stats_blocks=nk + 1)
    with pytest.raises(AsaExportError, match="key_block_stats_blocks"):
        op.route(q, k, attrs, key_block_stats=stats, key_block_stats_blocks=-1)
    with pytest.raises(AsaExportError, match="capacity"):
        op.route(q, k, attrs, key_block_stats=stats[:, :, :3].contiguous(),
                 key_block_stats_blocks=4)
    with pytest.raises(AsaExportError, match=r"\[B, Hkv, C, F\]"):
        op.route(q, k, attrs, key_block_stats=torch.zeros(2, 2, nk, 3 * case.dim,
                                                          device="cuda"))
    with pytest.raises(AsaExportError, match="capacity"):
        op.key_block_stats(k, attrs, out=torch.zeros(2, 2, nk - 1, case.dim, device="cuda"))
    with pytest.raises(AsaExportError, match="first_block"):
        op.key_block_stats(k, attrs, first_block=nk + 1)
    out = torch.empty(1, 8, 1, case.dim, dtype=q.dtype, device="cuda")
    tele = [torch.empty(s, dtype=torch.int32, device="cuda")
            for s in op.telemetry_shapes(q, k, attrs)]
    params, _keep = op.make_params(q, k, v, out, tele, attrs)
    params.key_block_stats_blocks = 2  # count without a pointer
    with pytest.raises(AsaExportError, match="key_block_stats is NULL"):
        op.run_core("asa_cuda_route", params, q.device)
