"""Learned-gate distillation (asa_export.router.gate): learning, targets, determinism,
checkpoints, errors. CPU, seconds."""

from __future__ import annotations

import numpy as np
import pytest

from asa_export.contract import AsaAttributes
from asa_export.contract import reference as ref
from asa_export.errors import AsaExportError
from asa_export.router import gate, stats

torch = pytest.importorskip("torch")

ATTRS = AsaAttributes(causal=True, sink_blocks=0, local_blocks=0)


def synthetic(seed: int, windows: int = 3, seq: int = 768, dim: int = 16):
    """Attention driven by rare spike keys on dims 0-3; per-block key offsets on dims 4-15
    (matched by a shared query offset) dominate the block means, so mean pooling ranks blocks
    by the offsets while the true attention goes to the blocks holding a spike."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(windows):
        q = 0.3 * rng.standard_normal((1, 2, seq, dim))
        q[..., :4] += 2.0
        q[..., 4:] += 1.0
        k = 0.3 * rng.standard_normal((1, 1, seq, dim))
        blocks = seq // 64
        k[0, 0, :, 4:] += np.repeat(rng.standard_normal((blocks, dim - 4)), 64, axis=0)
        for block in np.flatnonzero(rng.random(blocks) < 0.4):
            k[0, 0, block * 64 + rng.integers(64), :4] += 4.0
        samples.append((q.astype(np.float32), k.astype(np.float32)))
    return samples


def mean_kl(samples, probs_fn, target="max") -> float:
    total = rows = 0.0
    for q, k in samples:
        t = gate.block_targets(q, k, ATTRS, target)
        p = probs_fn(q, k)
        used = t > 0
        total += np.where(used, t * (np.log(np.where(used, t, 1)) - np.log(np.maximum(p, 1e-30))),
                          0).sum()
        rows += (t.sum(-1) > 0).sum()
    return total / rows


@pytest.mark.parametrize("target", gate.TARGETS)
def test_gate_learns_what_mean_pooling_misses(target):
    train, held_out = synthetic(0), synthetic(1)
    naive = mean_kl(held_out, lambda q, k: ref.router_probs(q, k, ATTRS)[0], target)
    start = gate.train_gate(train, ATTRS, dim=8, steps=0, target=target)
    trained = gate.train_gate(train, ATTRS, dim=8, steps=120, target=target)
    before = mean_kl(held_out, lambda q, k: gate.gate_probs(q, k, ATTRS, start), target)
    after = mean_kl(held_out, lambda q, k: gate.gate_probs(q, k, ATTRS, trained), target)
    assert naive > 0.5 and before > 0.5, "the problem must defeat mean pooling"
    assert after < 0.35 * min(naive, before)


def test_trained_weights_are_the_contract_inputs():
    """reference.router_probs with the weights = the trainer's own (torch) probabilities."""
    (q, k), = synthetic(2, windows=1, seq=320)
    attrs = AsaAttributes(causal=True)
    g = gate.train_gate([(q, k)], attrs, dim=8, steps=10)
    assert g.q_weight.shape == (2, 16, 8) and g.k_weight.shape == (1, 48, 8)
    assert g.q_weight.dtype == np.float32 and g.k_weight.dtype == np.float32
    probs, visible = ref.router_probs(q, k, attrs, gate_q_weight=g.q_weight,
                                      gate_k_weight=g.k_weight)
    q_mean, k_feat = ref.block_features(q, k, attrs)
    log_p = gate.gate_log_probs_torch(*(torch.from_numpy(x) for x in (
        q_mean, k_feat, g.q_weight, g.k_weight, visible[:, None])))
    np.testing.assert_allclose(np.exp(log_p.numpy()), probs, atol=1e-6)


def test_block_targets():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 150, 8)).astype(np.float32)
    k = rng.standard_normal((1, 1, 150, 8)).astype(np.float32)
    attrs = AsaAttributes(causal=True)
    mass = stats.block_mass(q, k, attrs)
    np.testing.assert_allclose(gate.block_targets(q, k, attrs, "mass", row_chunk=64),
                               mass / mass.sum(-1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(gate.block_targets(q, k, attrs, "mass", normalize=False), mass,
                               atol=1e-6)
    # Max target, brute force: max probability over each (query block, key block) tile.
    s = np.einsum("hqd,kd->hqk", q[0], k[0, 0]) / np.sqrt(8)
    s = np.where(np.tril(np.ones((150, 150), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    tiles = np.zeros((2, 192, 192))
    tiles[:, :150, :150] = a
    top = tiles.reshape(2, 3, 64, 3, 64).max(axis=(2, 4))
    np.testing.assert_allclose(gate.block_targets(q, k, attrs, "max", row_chunk=64)[0],
                               top / top.sum(-1, keepdims=True), atol=1e-6)


def test_determinism_given_a_seed():
    samples = synthetic(4, windows=1, seq=384)
    a, b = (gate.train_gate(samples, ATTRS, dim=8, steps=15, seed=1) for _ in range(2))
    c = gate.train_gate(samples, ATTRS, dim=8, steps=15, seed=2)
    np.testing.assert_array_equal(a.q_weight, b.q_weight)
    np.testing.assert_array_equal(a.k_weight, b.k_weight)
    assert not np.array_equal(a.q_weight, c.q_weight)


def test_checkpoint_resume_gives_the_uninterrupted_result(tmp_path):
    samples = synthetic(5, windows=1, seq=384)
    full = gate.train_gate(samples, ATTRS, dim=8, steps=60)
    path = tmp_path / "layer0.pt"

    def stop_at_40(step, steps, loss):
        assert np.isfinite(loss) and steps == 60
        if step == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gate.train_gate(samples, ATTRS, dim=8, steps=60, checkpoint=path, progress=stop_at_40)
    seen = []
    resumed = gate.train_gate(samples, ATTRS, dim=8, steps=60, checkpoint=path,
                              progress=lambda s, n, l: seen.append(s))
    assert seen[0] == 26 and seen[-1] == 60  # resumed after the step-25 checkpoint
    np.testing.assert_array_equal(resumed.q_weight, full.q_weight)
    np.testing.assert_array_equal(resumed.k_weight, full.k_weight)
    seen.clear()
    again = gate.train_gate(samples, ATTRS, dim=8, steps=60, checkpoint=path,
                            progress=lambda s, n, l: seen.append(s))
    assert seen == [] and np.array_equal(again.k_weight, full.k_weight)  # finished: no steps
    with pytest.raises(AsaExportError, match="other samples or settings"):
        gate.train_gate(synthetic(6, windows=1, seq=384), ATTRS, dim=8, steps=60,
                        checkpoint=path)


def test_bad_inputs():
    (q, k), = synthetic(7, windows=1, seq=128)
    with pytest.raises(AsaExportError, match="at least one"):
        gate.train_gate([], ATTRS)
    with pytest.raises(AsaExportError, match="4-D"):
        gate.train_gate([(q[0], k[0])], ATTRS)
    with pytest.raises(AsaExportError, match="multiple"):
        gate.train_gate([(q[:, :1], np.concatenate([k, k], axis=1))], ATTRS)
    with pytest.raises(AsaExportError, match="share"):
        gate.train_gate([(q, k), (q[..., :8], k[..., :8])], ATTRS)
    with pytest.raises(AsaExportError, match="disagree"):
        gate.train_gate([(q, k[..., :8])], ATTRS)
    bad = q.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(AsaExportError, match="non-finite"):
        gate.train_gate([(bad, k)], ATTRS)
    with pytest.raises(AsaExportError, match="target"):
        gate.train_gate([(q, k)], ATTRS, target="kl")
    with pytest.raises(AsaExportError, match="dim"):
        gate.train_gate([(q, k)], ATTRS, dim=0)


def test_gate_parameter_count():
    # SmolLM2-135M: Hq 9, Hkv 3, D 64 -> 9*64*32 + 3*192*32.
    assert gate.gate_parameters(9, 3, 64, 32) == 36864


@pytest.mark.parametrize("merge_forced", [True, False])
def test_loss_is_the_kl_of_what_the_selection_sees(merge_forced):
    """merge_forced: KL over {all forced blocks as one outcome} + the other blocks (numpy)."""
    (q, k), = synthetic(8, windows=1, seq=448)
    attrs = AsaAttributes(causal=True, sink_blocks=1, local_blocks=2)
    rng = np.random.default_rng(8)
    wq = (0.3 * rng.standard_normal((2, 16, 4))).astype(np.float32)
    wk = (0.3 * rng.standard_normal((1, 48, 4))).astype(np.float32)
    data = [gate._prepare(q, k, attrs, "mass", "cpu", merge_forced)]
    loss = float(gate.distillation_loss(data, torch.from_numpy(wq), torch.from_numpy(wk)))
    p, vis = ref.router_probs(q, k, attrs, gate_q_weight=wq, gate_k_weight=wk)
    t = gate.block_targets(q, k, attrs, "mass") * vis[:, None]
    forced = np.broadcast_to(ref.forced_blocks(attrs, 448, 448)[None, None] & vis[:, None], t.shape)
    if merge_forced:
        t_f, p_f = (np.where(forced, x, 0).sum(-1, keepdims=True) for x in (t, p))
        t = np.concatenate([np.where(forced, 0, t), t_f], axis=-1)
        p = np.concatenate([np.where(forced, 1, p), p_f], axis=-1)
    used = t > 0
    kl = np.where(used, t * np.log(np.where(used, t, 1) / np.where(used, p, 1)), 0).sum()
    rows = (gate.block_targets(q, k, attrs, "mass").sum(-1) > 0).sum()
    assert loss == pytest.approx(kl / rows, rel=1e-4)


def test_save_and_load_gates(tmp_path):
    rng = np.random.default_rng(9)
    gates = {i: gate.Gate(rng.standard_normal((4, 8, 2)).astype(np.float32),
                          rng.standard_normal((2, 24, 2)).astype(np.float32)) for i in (0, 3)}
    gate.save_gates(tmp_path / "g.npz", gates)
    back = gate.load_gates(tmp_path / "g.npz")
    assert sorted(back) == [0, 3]
    np.testing.assert_array_equal(back[3].k_weight, gates[3].k_weight)
    with pytest.raises(AsaExportError, match="not found"):
        gate.load_gates(tmp_path / "missing.npz")
    np.savez(tmp_path / "half.npz", q0=gates[0].q_weight)
    with pytest.raises(AsaExportError, match="lack"):
        gate.load_gates(tmp_path / "half.npz")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_agrees_with_cpu():
    """Same samples and seed on the GPU: the same gate up to float32 reordering."""
    samples = synthetic(10, windows=2, seq=512)
    cpu = gate.train_gate(samples, ATTRS, dim=8, steps=40)
    cuda = gate.train_gate(samples, ATTRS, dim=8, steps=40, device="cuda")
    held_out = synthetic(11, windows=1, seq=512)
    kl = [mean_kl(held_out, lambda q, k, g=g: gate.gate_probs(q, k, ATTRS, g), "mass")
          for g in (cpu, cuda)]
    assert kl[1] == pytest.approx(kl[0], rel=0.05, abs=1e-3)
    np.testing.assert_allclose(cuda.q_weight, cpu.q_weight, atol=5e-3)


class _Module:
    layer_idx = 0


def test_research_gate_router_is_the_contract_gate(tmp_path):
    """research.py's "gate" router = reference.asa_attention with the gate inputs; capture
    records (q, k); gate_setting reads gates and curves files."""
    from asa_export.router import research

    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, h, 64 * 4 + 9, 16, generator=g) for h in (4, 2, 2))
    rng = np.random.default_rng(12)
    trained = {0: gate.Gate((rng.standard_normal((4, 16, 8)) / 4).astype(np.float32),
                            (rng.standard_normal((2, 48, 8)) / 7).astype(np.float32))}
    setting = research.RouterSetting(router="gate", threshold=0.6, gates=trained)
    rec = research.Recorder()
    out, _ = research.make_attention(setting, rec)(_Module(), q, k, v, None, scaling=0.25)
    attrs = AsaAttributes(causal=True, threshold=0.6, scale=0.25)
    expect, _, counts, visible = ref.asa_attention(
        q.numpy(), k.numpy(), v.numpy(), attrs, gate_q_weight=trained[0].q_weight,
        gate_k_weight=trained[0].k_weight)
    np.testing.assert_allclose(out.transpose(1, 2).numpy(), expect, atol=2e-5)
    assert rec.density() == pytest.approx(ref.density(counts, visible, 4)) and rec.density() < 1
    with pytest.raises(AsaExportError, match="trained gate for layer 0"):
        research.make_attention(research.RouterSetting(router="gate"), rec)(
            _Module(), q, k, v, None, scaling=0.25)
    store = {}
    research.make_qk_capture(store)(_Module(), q, k, v, None, scaling=0.25)
    np.testing.assert_array_equal(store[0][1], k.numpy())
    # gate_setting: per-head thresholds from the gate's curves.
    probs, vis = ref.router_probs(q.numpy(), k.numpy(), attrs,
                                  gate_q_weight=trained[0].q_weight,
                                  gate_k_weight=trained[0].k_weight)
    mass = stats.block_mass(q.numpy(), k.numpy(), attrs)
    curve = stats.threshold_curve(probs, mass, vis, attrs, q.shape[2], q.shape[2])
    np.savez(tmp_path / "c.npz", **research.curves_to_arrays({("gate", 1, 1): {0: curve}}))
    gate.save_gates(tmp_path / "g.npz", trained)
    fitted = research.gate_setting(tmp_path / "g.npz", tmp_path / "c.npz", 0.9, 1, 1)
    np.testing.assert_array_equal(fitted.head_thresholds[0], stats.fit_head_thresholds(curve, 0.9))
    with pytest.raises(AsaExportError, match="no gate curves"):
        research.gate_setting(tmp_path / "g.npz", tmp_path / "c.npz", 0.9, 1, 2)
