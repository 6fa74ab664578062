"""The learned gate (SPEC "Router (learned gate)"): per-layer distillation from full attention.

    captured (q, k) of one site, per window (RoPE applied, as the ASA node sees them)
        --reference.block_features-->  q_mean [B, Hq, NQ, D], k_feat [B, Hkv, NK, 3D]
        --block_targets-->             T [B, Hq, NQ, NK]: block-pooled full attention of the
                                       frozen model ("max": 2-D max pooling, row-normalized;
                                       "mass": stats.block_mass, the attention mass per block)
    gate logits (q_mean . Wq[h]) . (k_feat . Wk[h / G]), softmax over visible blocks = P
    minimize KL(T || P) over (window, head, query block) with Adam, full batch

The gate is exactly the contract's: the returned weights are the node's inputs 6-7, and
`reference.router_probs(q, k, attrs, gate_q_weight=..., gate_k_weight=...)` gives the trained
router's probabilities. Base weights are untouched. Training only sees pooled features (a few
KB per window) and the targets; the full attention is formed once per window, in row chunks,
so memory stays at B * Hq * row_chunk * Skv floats. torch is imported lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import pathlib
from typing import Callable, Sequence

import numpy as np

from asa_export.contract import AsaAttributes, num_blocks
from asa_export.contract import reference
from asa_export.errors import AsaExportError

TARGETS = ("max", "mass")
_CHECKPOINT_VERSION = 1
_CHECKPOINT_EVERY = 25


@dataclasses.dataclass
class Gate:
    """Learned gate weights of one site, in the contract's layout (inputs 6 and 7).

    Args:
        q_weight: float32 [Hq, D, Dg], `gate_q_weight`.
        k_weight: float32 [Hkv, 3*D, Dg], `gate_k_weight`.
    """

    q_weight: np.ndarray  # [Hq, D, Dg]
    k_weight: np.ndarray  # [Hkv, 3*D, Dg]


def gate_parameters(heads_q: int, heads_kv: int, head_dim: int, dim: int = 32) -> int:
    """Number of gate parameters of one layer: Hq*D*Dg + Hkv*3*D*Dg."""
    return heads_q * head_dim * dim + heads_kv * 3 * head_dim * dim


def train_gate(samples: Sequence[tuple[np.ndarray, np.ndarray]], attrs: AsaAttributes, *,
               dim: int = 32, steps: int = 300, lr: float = 1e-2, seed: int = 0,
               device: str = "cpu", checkpoint: pathlib.Path | None = None,
               progress: Callable[[int, int, float], None] | None = None,
               target: str = "mass", merge_forced: bool = True) -> Gate:
    """Train one site's gate by distillation from its full attention.

    Args:
        samples: [(q [B, Hq, S, D], k [B, Hkv, S, D]), ...] float arrays of one site, one per
            calibration window (RoPE applied, as the ASA node sees them; no padding).
        attrs: the site's attributes (scale, causal, window, softcap, block_size are read).
        dim: gate width Dg.
        steps: full-batch Adam steps.
        lr: Adam learning rate.
        seed: seeds the small random part of the initialization.
        device: torch device ("cpu", "cuda").
        checkpoint: optional file; written every 25 steps and at the end, and resumed from
            when it exists (it must come from the same samples and settings).
        progress: optional callback(step, steps, loss) after every step.
        target: "mass" (attention mass per block) or "max" (block-max-pooled attention,
            row-normalized): see `block_targets`.
        merge_forced: compare T and P with the forced blocks (sink, local band: always kept)
            merged into one outcome. The selection depends only on their total P (the walk's
            starting sum) and on P of every other block, so this KL measures exactly what the
            selection sees; without merging, the sink's large attention mass dominates the loss.

    Returns:
        Gate whose weights are the node's `gate_q_weight` / `gate_k_weight` inputs.

    Raises:
        AsaExportError: empty or inconsistent samples, bad settings, a foreign checkpoint.
    """
    import torch

    heads_q, heads_kv, head_dim = _check_samples(samples, dim, steps, lr, target)
    key = _config_key(samples, attrs, dim, lr, seed, (target, merge_forced))
    data = [_prepare(q, k, attrs, target, device, merge_forced) for q, k in samples]
    state = _load_checkpoint(checkpoint, key, device)
    if state is None:
        wq, wk = _initial_weights(data, attrs, heads_q, heads_kv, head_dim, dim, seed)
        state = {"step": 0, "wq": wq.to(device), "wk": wk.to(device), "opt": None}
    wq = state["wq"].clone().requires_grad_(True)
    wk = state["wk"].clone().requires_grad_(True)
    opt = torch.optim.Adam([wq, wk], lr=lr)
    if state["opt"] is not None:
        opt.load_state_dict(state["opt"])
    with _step_threads(device):
        _optimize(data, wq, wk, opt, state["step"], steps, key, checkpoint, progress)
    return Gate(wq.detach().cpu().numpy().astype(np.float32),
                wk.detach().cpu().numpy().astype(np.float32))


def _optimize(data, wq, wk, opt, start: int, steps: int, key: str, checkpoint,
              progress) -> None:
    """Full-batch steps start..steps, checkpointing every _CHECKPOINT_EVERY and at the end."""
    for step in range(start, steps):
        opt.zero_grad()
        loss = distillation_loss(data, wq, wk)
        loss.backward()
        opt.step()
        if checkpoint is not None and ((step + 1) % _CHECKPOINT_EVERY == 0 or step + 1 == steps):
            _save_checkpoint(checkpoint, {"key": key, "step": step + 1,
                                          "wq": wq.detach().clone(), "wk": wk.detach().clone(),
                                          "opt": opt.state_dict()})
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))


def distillation_loss(data: list[dict], wq, wk):
    """Mean KL(T || P) over the (window, head, query block) rows that see a block.

    Args:
        data: prepared windows (`_prepare`): features, visibility, targets.
        wq: torch [Hq, D, Dg].
        wk: torch [Hkv, 3*D, Dg].

    Returns:
        torch scalar.
    """
    import torch

    total, rows = 0.0, 0
    for item in data:
        log_p = gate_log_probs_torch(item["q_mean"], item["k_feat"], wq, wk, item["visible"])
        t = item["target"]
        forced = item["forced"]
        if forced is not None:  # one outcome for all forced blocks: log of their summed P
            t = t.masked_fill(forced, 0.0)
            t_f = item["forced_target"]
            log_pf = torch.logsumexp(log_p.masked_fill(~forced, float("-inf")), dim=-1)
            total = total + torch.where(t_f > 0, t_f * (torch.log(torch.where(
                t_f > 0, t_f, torch.ones_like(t_f))) - log_pf), torch.zeros_like(t_f)).sum()
        # 0 * log(0) terms (and -inf log P of invisible blocks, where T = 0) are left out.
        kl = torch.where(t > 0, t * (item["log_target"] - log_p), torch.zeros_like(t))
        total = total + kl.sum()
        rows += int(item["rows"])
    return total / max(rows, 1)


def gate_log_probs_torch(q_mean, k_feat, wq, wk, visible):
    """Log router probabilities of the gate, torch twin of `reference.router_probs`.

    Args:
        q_mean: torch float32 [B, Hq, NQ, D].
        k_feat: torch float32 [B, Hkv, NK, 3*D].
        wq: [Hq, D, Dg].
        wk: [Hkv, 3*D, Dg].
        visible: torch bool [B, 1, NQ, NK].

    Returns:
        torch [B, Hq, NQ, NK]: log P on visible blocks, -inf elsewhere (select_per = 0 rows;
        the contract averages P over a KV group afterwards for select_per = 1).
    """
    import torch

    q_emb = torch.matmul(q_mean, wq)                        # [B, Hq, NQ, Dg]
    k_emb = torch.matmul(k_feat, wk)                        # [B, Hkv, NK, Dg]
    group = q_mean.shape[1] // k_feat.shape[1]
    k_emb = k_emb.repeat_interleave(group, dim=1)
    logits = torch.matmul(q_emb, k_emb.transpose(-1, -2))
    logits = logits.masked_fill(~visible, float("-inf"))
    # Rows with nothing visible would be all -inf (NaN); their target is 0 and they are skipped.
    safe = torch.where(visible.any(-1, keepdim=True), logits, torch.zeros_like(logits))
    return torch.log_softmax(safe, dim=-1)


def gate_probs(q: np.ndarray, k: np.ndarray, attrs: AsaAttributes, gate: Gate) -> np.ndarray:
    """The contract's router probabilities with this gate (reference, float32 [B, Hsel, NQ, NK])."""
    return reference.router_probs(q, k, attrs, gate_q_weight=gate.q_weight,
                                  gate_k_weight=gate.k_weight)[0]


def block_targets(q: np.ndarray, k: np.ndarray, attrs: AsaAttributes, target: str = "mass",
                  row_chunk: int = 512, device: str = "cpu", normalize: bool = True) -> np.ndarray:
    """Distillation target: the frozen model's full attention, pooled to blocks.

    Args:
        q: query [B, Hq, Sq, D].
        k: key [B, Hkv, Skv, D].
        attrs: scale, causal, window, softcap, block_size are read.
        target: "max": max of A[r, j] over the rows of query block i and the keys of key
            block k, normalized over k; "mass": mean over rows of the summed A[r, j] per key
            block (`stats.block_mass`).
        row_chunk: query rows per step (memory B * Hq * row_chunk * Skv floats).
        device: torch device.
        normalize: rows sum to 1; False keeps the raw pooled values ("mass" is then exactly
            `stats.block_mass`, computed in torch).

    Returns:
        float32 [B, Hq, NQ, NK]; with normalize, each row sums to 1 (0 where the query block
        sees nothing).
    """
    import torch

    if target not in TARGETS:
        raise AsaExportError(f"target must be one of {TARGETS}, got {target!r}")
    batch, heads_q, seq_q, dim = q.shape
    seq_kv, b = k.shape[2], attrs.block_size
    nq, nk = num_blocks(seq_q, b), num_blocks(seq_kv, b)
    vis = torch.from_numpy(reference.visibility(batch, seq_q, seq_kv, attrs)).to(device)
    kk = torch.from_numpy(np.asarray(k, np.float32)).to(device)
    kk = kk.repeat_interleave(heads_q // k.shape[1], dim=1)
    qq = torch.from_numpy(np.asarray(q, np.float32)).to(device)
    pooled = torch.zeros(batch, heads_q, nq, nk, dtype=torch.float64, device=device)
    step = max(b, row_chunk - row_chunk % b)
    for start in range(0, seq_q, step):
        stop = min(seq_q, start + step)
        probs = _attention_rows(qq[:, :, start:stop], kk, vis[:, None, start:stop], attrs, dim)
        probs = torch.nn.functional.pad(probs, (0, nk * b - seq_kv, 0, (-(stop - start)) % b))
        tiles = probs.reshape(batch, heads_q, -1, b, nk, b)
        if target == "max":
            part = tiles.amax(dim=(3, 5))
        else:
            part = tiles.sum(dim=(3, 5))
        pooled[:, :, start // b:start // b + part.shape[2]] = part.double()
    if target == "mass":
        pooled /= torch.clamp(seq_q - torch.arange(nq, device=device) * b, max=b)[:, None]
    if not normalize:
        return pooled.float().cpu().numpy()
    total = pooled.sum(-1, keepdim=True)
    return (pooled / torch.where(total > 0, total, 1.0)).float().cpu().numpy()


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _step_threads(device: str):
    """One CPU thread for the optimizer steps: their matmuls are tiny ([Hq, NQ, D] per
    window), and several threads on a loaded machine were 10x slower than one here."""
    import torch

    if not device.startswith("cpu"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _attention_rows(q, k, vis, attrs: AsaAttributes, dim: int):
    """Dense attention probabilities of some rows: q [B, H, R, D], vis [B, 1, R, Skv]."""
    import torch

    s = attrs.resolved_scale(dim) * torch.matmul(q, k.transpose(-1, -2))
    if attrs.softcap > 0:
        s = attrs.softcap * torch.tanh(s / attrs.softcap)
    s = s.masked_fill(~vis, float("-inf"))
    top = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _prepare(q: np.ndarray, k: np.ndarray, attrs: AsaAttributes, target: str,
             device: str, merge_forced: bool) -> dict:
    """One window as torch tensors: pooled features, block visibility, target, log target and
    (merge_forced) the visible forced blocks and their summed target."""
    import torch

    q_mean, k_feat = reference.block_features(q, k, attrs)
    batch, _, seq_q, _ = q.shape
    vis = reference.block_visibility(
        reference.visibility(batch, seq_q, k.shape[2], attrs), attrs.block_size)
    t = torch.from_numpy(block_targets(q, k, attrs, target, device=device)).to(device)
    t = t * torch.from_numpy(vis[:, None]).to(device)
    forced = forced_target = None
    if merge_forced:
        forced = torch.from_numpy(
            reference.forced_blocks(attrs, seq_q, k.shape[2])[None, None] & vis[:, None]).to(device)
        forced_target = (t * forced).sum(-1)
    return {"forced": forced, "forced_target": forced_target,
            "q_mean": torch.from_numpy(q_mean).to(device),
            "k_feat": torch.from_numpy(k_feat).to(device),
            "visible": torch.from_numpy(vis[:, None]).to(device),
            "target": t,
            "log_target": torch.log(torch.where(t > 0, t, torch.ones_like(t))),
            "rows": int((t.sum(-1) > 0).sum())}


def _initial_weights(data, attrs: AsaAttributes, heads_q: int, heads_kv: int, head_dim: int,
                     dim: int, seed: int):
    """Start from a rank-Dg version of the training-free router, plus a little noise.

    Per KV group, U = the Dg leading eigenvectors of the (trace-normalized) second moments of
    its pooled queries and keys: logits scale * (U^T q_mean) . (U^T k_mean) are the
    contract-v1 logits restricted to the directions that carry the data, so training starts
    near the training-free router instead of at random. The max/min parts start at noise level.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    root = math.sqrt(attrs.resolved_scale(head_dim))
    group = heads_q // heads_kv
    wq = torch.zeros(heads_q, head_dim, dim)
    wk = torch.zeros(heads_kv, 3 * head_dim, dim)
    for g in range(heads_kv):
        qs = torch.cat([d["q_mean"][:, g * group:(g + 1) * group].reshape(-1, head_dim).cpu()
                        for d in data])
        ks = torch.cat([d["k_feat"][:, g, :, :head_dim].reshape(-1, head_dim).cpu()
                        for d in data])
        moment = (qs.T @ qs) / max(float((qs ** 2).sum()), 1e-30) \
            + (ks.T @ ks) / max(float((ks ** 2).sum()), 1e-30)
        _, vectors = torch.linalg.eigh(moment.double())
        basis = vectors.flip(-1)[:, :min(dim, head_dim)].float()
        wq[g * group:(g + 1) * group, :, :basis.shape[1]] = root * basis
        wk[g, :head_dim, :basis.shape[1]] = root * basis
    noise = 1e-2 * root
    wq += noise * torch.randn(wq.shape, generator=gen)
    wk += noise * torch.randn(wk.shape, generator=gen)
    return wq, wk


def _check_samples(samples, dim: int, steps: int, lr: float, target: str):
    """Validate arguments; returns (Hq, Hkv, D)."""
    if not samples:
        raise AsaExportError("train_gate needs at least one (q, k) sample of the site")
    if dim < 1 or steps < 0 or not (lr > 0 and math.isfinite(lr)):
        raise AsaExportError(f"need dim >= 1, steps >= 0 and lr > 0; got dim={dim}, "
                             f"steps={steps}, lr={lr}")
    if target not in TARGETS:
        raise AsaExportError(f"target must be one of {TARGETS}, got {target!r}")
    shapes = set()
    for i, sample in enumerate(samples):
        if len(sample) != 2:
            raise AsaExportError(f"sample {i} must be a (q, k) pair")
        q, k = (np.asarray(x) for x in sample)
        if q.ndim != 4 or k.ndim != 4:
            raise AsaExportError(f"sample {i}: q and k must be 4-D [B, H, S, D], got "
                                 f"{list(q.shape)} and {list(k.shape)}")
        if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
            raise AsaExportError(f"sample {i}: q {list(q.shape)} and k {list(k.shape)} "
                                 "disagree on batch or head dim")
        if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
            raise AsaExportError(f"sample {i}: query heads {q.shape[1]} are not a multiple "
                                 f"of key heads {k.shape[1]}")
        if not (np.all(np.isfinite(q)) and np.all(np.isfinite(k))):
            raise AsaExportError(f"sample {i}: q or k has non-finite values")
        shapes.add((q.shape[1], k.shape[1], q.shape[3]))
    if len(shapes) != 1:
        raise AsaExportError(f"samples of one site must share [Hq, Hkv, D], got {sorted(shapes)}")
    return shapes.pop()


def _config_key(samples, attrs: AsaAttributes, dim: int, lr: float, seed: int,
                target: str) -> str:
    """Fingerprint of what a checkpoint depends on (the step count may grow on resume)."""
    h = hashlib.sha1(repr((attrs, dim, lr, seed, target, _CHECKPOINT_VERSION)).encode())
    for q, k in samples:
        for x in (q, k):
            x = np.ascontiguousarray(x, dtype=np.float32)
            h.update(repr(x.shape).encode())
            h.update(hashlib.sha1(x.tobytes()).digest())
    return h.hexdigest()


def _load_checkpoint(path, key: str, device: str):
    import torch

    if path is None or not pathlib.Path(path).is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("key") != key:
        raise AsaExportError(f"checkpoint {path} was written for other samples or settings: "
                             "delete it or pass another checkpoint path")
    return state


def _save_checkpoint(path, state: dict) -> None:
    """torch.save through io.atomic_path: an interrupted save never leaves a torn file."""
    import torch

    from asa_export import io

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_gates(path: pathlib.Path, gates: dict) -> None:
    """Write {layer index: Gate} to one .npz (keys q<layer>, k<layer>), atomically.

    Args:
        path: the file (written at exactly this name, which should end in .npz).
        gates: {layer index: Gate}.
    """
    arrays = {}
    for layer, g in gates.items():
        arrays[f"q{int(layer)}"], arrays[f"k{int(layer)}"] = g.q_weight, g.k_weight
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from asa_export import io  # onnx / onnx_ir: imported when a file is written

    with io.atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_gates(path: pathlib.Path) -> dict:
    """Read `save_gates`' file back: {layer index: Gate}.

    Raises:
        AsaExportError: missing file or a layer with only one of its two weights.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise AsaExportError(f"gate file {path} not found: train the gates first")
    with np.load(path) as z:
        layers = sorted({int(key[1:]) for key in z.files})
        missing = [i for i in layers if f"q{i}" not in z.files or f"k{i}" not in z.files]
        if missing:
            raise AsaExportError(f"gate file {path}: layers {missing} lack q or k weights")
        return {i: Gate(z[f"q{i}"].astype(np.float32), z[f"k{i}"].astype(np.float32))
                for i in layers}
