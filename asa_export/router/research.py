"""Torch research path: run a transformers model with contract-v1 block-sparse attention.

    model (transformers, attn_implementation=<registered name>)
        each attention call: q, k (RoPE'd) --router (reference.router_probs | true block mass)-->
        P --reference.select_blocks (tau, sink, local, head_thresholds)--> kept blocks
        --> masked SDPA over kept & causally visible keys; kept / visible counts recorded

The selection is the numpy reference itself, so what is measured here is the contract's
semantics; only the attention product runs in torch (SDPA with a boolean mask) for speed.
Causal self-attention without padding only (Sq == Skv, one sequence): the perplexity setting.
torch is imported lazily (house rule 4).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from asa_export.contract import AsaAttributes, num_blocks
from asa_export.contract import reference
from asa_export.errors import AsaExportError
from asa_export.router.stats import DEFAULT_TAUS, ThresholdCurve, threshold_curve

ROUTERS = ("dense", "naive", "oracle", "lse", "gate")


@dataclasses.dataclass
class RouterSetting:
    """One router configuration applied to every attention layer.

    Args:
        router: "dense" (every visible block), "naive" (contract v1 pooled Q.K estimate) or
            "oracle" (true block mass from the full attention: the ceiling of any router),
            "lse" (research, outside contract v1: `pooled_probs(..., "lse")`, the mean query's
            exact attention mass per key block), "gate" (contract learned gate, inputs 6-7:
            `gates[layer]` from `asa_export.router.gate.train_gate`).
        threshold: global tau.
        sink_blocks: contract attribute.
        local_blocks: contract attribute.
        head_thresholds: optional {layer index: float32 [Hq]} (contract input head_thresholds).
        block_size: 64 or 128.
        gates: {layer index: router.gate.Gate} for router "gate".
    """

    router: str = "naive"
    threshold: float = 0.95
    sink_blocks: int = 1
    local_blocks: int = 1
    head_thresholds: dict | None = None
    block_size: int = 64
    gates: dict | None = None

    def attrs(self, scale: float) -> AsaAttributes:
        tau = 1.0 if self.router == "dense" else self.threshold
        return AsaAttributes(scale=scale, causal=True, block_size=self.block_size, threshold=tau,
                             sink_blocks=self.sink_blocks, local_blocks=self.local_blocks)


@dataclasses.dataclass
class Recorder:
    """Counts of kept and visible blocks (density = kept / visible), and optional curves.

    Args:
        kept: kept blocks summed over layers, heads, query blocks.
        visible: visible blocks summed the same way (times the heads).
        curves: {(router, sink, local): {layer: ThresholdCurve}} when capturing.
    """

    kept: int = 0
    visible: int = 0
    curves: dict = dataclasses.field(default_factory=dict)

    def density(self) -> float:
        return self.kept / self.visible if self.visible else float("nan")


def block_mass_torch(q, k, scale: float, block_size: int, row_chunk: int = 512):
    """True block mass for causal self-attention (torch twin of `stats.block_mass`).

    Args:
        q: torch [B, Hq, S, D].
        k: torch [B, Hkv, S, D].
        scale: score scale.
        block_size: b.
        row_chunk: rows per step (a multiple of b).

    Returns:
        numpy float32 [B, Hq, NQ, NK].
    """
    import torch

    batch, heads, seq, _ = q.shape
    b = block_size
    nb = num_blocks(seq, b)
    kk = k.float().repeat_interleave(heads // k.shape[1], dim=1)
    out = torch.zeros(batch, heads, nb, nb, dtype=torch.float64)
    pos = torch.arange(seq)
    for start in range(0, seq, row_chunk):
        stop = min(seq, start + row_chunk)
        s = scale * torch.matmul(q[:, :, start:stop].float(), kk.transpose(-1, -2))
        s = s.masked_fill(pos[None, :] > pos[start:stop, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.nn.functional.pad(p, (0, nb * b - seq))
        per_row = p.reshape(batch, heads, stop - start, nb, b).sum(-1)
        rows = torch.nn.functional.pad(per_row, (0, 0, 0, (-(stop - start)) % b))
        out[:, :, start // b:start // b + rows.shape[2] // b] = rows.reshape(
            batch, heads, -1, b, nb).sum(3).double()
    count = torch.clamp(seq - torch.arange(nb) * b, max=b).double()
    return (out / count[None, None, :, None]).float().numpy()


def pooled_probs(q, k, scale: float, b: int, pooling: str) -> np.ndarray:
    """Router block probabilities [1, Hq, NQ, NK] under alternative poolings (research, NOT contract v1).

    Causal self-attention, batch 1. Args: q [1, Hq, S, D], k [1, Hkv, S, D] torch; scale; b; pooling.

    mean: contract v1 (softmax of scale * mean(q) . mean(k)).
    lse:  mass of the mean query's exact attention per key block (logsumexp of scale * mean(q) . k_j
          over the block's keys, softmax over blocks).
    max:  softmax over blocks of max_j scale * mean(q) . k_j.
    last: exact attention mass of the query block's last row per key block.
    """
    import torch

    attrs = AsaAttributes(scale=scale, causal=True, block_size=b)
    if pooling == "mean":
        return reference.router_probs(q.numpy(), k.numpy(), attrs)[0]
    heads, seq = q.shape[1], q.shape[2]
    nb = -(-seq // b)
    kk = k.float().repeat_interleave(heads // k.shape[1], dim=1)[0]
    last = torch.clamp((torch.arange(nb) + 1) * b - 1, max=seq - 1)
    if pooling == "last":
        rep = q[0, :, last].float()
    else:
        pad = torch.nn.functional.pad(q[0].float(), (0, 0, 0, nb * b - seq))
        count = torch.clamp(seq - torch.arange(nb) * b, max=b).float()
        rep = pad.reshape(heads, nb, b, -1).sum(2) / count[None, :, None]
    s = scale * rep @ kk.transpose(-1, -2)  # [H, NQ, S]
    s = s.masked_fill(torch.arange(seq)[None, None, :] > last[None, :, None], float("-inf"))
    s = torch.nn.functional.pad(s, (0, nb * b - seq), value=float("-inf")).reshape(heads, nb, nb, b)
    if pooling == "max":
        logits = s.amax(-1)
        probs = torch.softmax(logits, -1)
    else:
        probs = torch.softmax(s.reshape(heads, nb, nb * b), -1).reshape(heads, nb, nb, b).sum(-1)
    return torch.nan_to_num(probs).numpy()[None].astype(np.float32)


def _keep_mask(keep: np.ndarray, seq: int, b: int):
    """bool torch [B, H, S, S]: kept blocks expanded to elements, and causal."""
    import torch

    t = torch.from_numpy(keep)
    t = t.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)[:, :, :seq, :seq]
    pos = torch.arange(seq)
    return t & (pos[None, :] <= pos[:, None])


def make_attention(setting: RouterSetting, recorder: Recorder, capture: bool = False,
                   capture_taus=DEFAULT_TAUS, capture_variants=((1, 1),)):
    """A transformers attention function applying `setting` (register with AttentionInterface).

    Args:
        setting: the router configuration.
        recorder: receives kept / visible counts (and curves when capturing).
        capture: also measure naive and oracle threshold curves at every layer (for
            calibration); the attention itself follows `setting`.
        capture_taus: tau grid of the curves.
        capture_variants: (sink_blocks, local_blocks) pairs to measure curves for.

    Returns:
        fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)
        -> (output [B, S, Hq, Dv], None).
    """

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        import torch

        batch, heads, seq, dim = query.shape
        if key.shape[2] != seq:
            raise AsaExportError("the research path supports causal self-attention only (Sq == Skv)")
        scale = float(scaling) if scaling else dim ** -0.5
        attrs = setting.attrs(scale)
        layer = getattr(module, "layer_idx", 0)
        q_np, k_np = query.detach().float().numpy(), key.detach().float().numpy()
        mass = None
        if setting.router == "oracle" or capture:
            mass = block_mass_torch(query, key, scale, attrs.block_size)
        if setting.router in ("oracle", "lse"):
            probs = mass if setting.router == "oracle" else pooled_probs(query, key, scale, attrs.block_size, "lse")
            visible = reference.block_visibility(reference.visibility(batch, seq, seq, attrs), attrs.block_size)
        elif setting.router == "gate":
            g = _layer_gate(setting, layer)
            probs, visible = reference.router_probs(q_np, k_np, attrs, gate_q_weight=g.q_weight,
                                                    gate_k_weight=g.k_weight)
        else:
            probs, visible = reference.router_probs(q_np, k_np, attrs)
        tau_h = None if setting.head_thresholds is None else setting.head_thresholds.get(layer)
        keep = reference.select_blocks(probs, visible, attrs, seq, seq, tau_h)
        recorder.kept += int(keep.sum())
        recorder.visible += int(visible.sum()) * heads
        if capture:
            _capture(recorder, layer, q_np, k_np, mass, visible, attrs, capture_taus, capture_variants)
        mask = _keep_mask(keep, seq, attrs.block_size)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _layer_gate(setting: RouterSetting, layer: int):
    if not setting.gates or layer not in setting.gates:
        raise AsaExportError(f"router 'gate' needs a trained gate for layer {layer}: "
                             "train them with asa_export.router.gate.train_gate")
    return setting.gates[layer]


def gate_setting(gates_file, curves_file, recall: float, sink_blocks: int = 1,
                 local_blocks: int = 2) -> RouterSetting:
    """Router "gate" with per-head thresholds fitted on the gate's own calibration curves.

    Args:
        gates_file: `router.gate.save_gates` output ({layer: Gate}).
        curves_file: `curves_to_arrays` output holding router "gate" curves for
            (sink_blocks, local_blocks), measured on the calibration windows.
        recall: attention-mass recall each head's tau must reach (`stats.fit_head_thresholds`).
        sink_blocks: contract attribute (must match the curves).
        local_blocks: contract attribute (must match the curves).

    Returns:
        RouterSetting(router="gate", gates=..., head_thresholds={layer: [Hq]}).
    """
    from asa_export.router import gate, stats

    curves = arrays_to_curves(np.load(curves_file)).get(("gate", sink_blocks, local_blocks))
    if curves is None:
        raise AsaExportError(f"{curves_file} has no gate curves for sink {sink_blocks}, "
                             f"local {local_blocks}")
    taus = {i: stats.fit_head_thresholds(c, recall) for i, c in enumerate(curves)}
    return RouterSetting(router="gate", threshold=1.0, sink_blocks=sink_blocks,
                         local_blocks=local_blocks, head_thresholds=taus,
                         gates=gate.load_gates(gates_file))


def make_qk_capture(store: dict):
    """A transformers attention function that records each layer's (q, k) and attends densely.

    Args:
        store: receives {layer index: (q float32 [B, Hq, S, D], k float32 [B, Hkv, S, D])},
            RoPE applied, as an ASA node at that site sees them (the gate's training samples).

    Returns:
        fn(module, query, key, value, attention_mask, scaling=None, ...) -> (output, None).
    """

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        import torch

        store[getattr(module, "layer_idx", 0)] = (query.detach().float().numpy().copy(),
                                                  key.detach().float().numpy().copy())
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _capture(recorder, layer, q_np, k_np, mass, visible, attrs, taus, variants) -> None:
    import torch

    seq = q_np.shape[2]
    probs, _ = reference.router_probs(q_np, k_np, attrs)
    lse = pooled_probs(torch.from_numpy(q_np), torch.from_numpy(k_np), attrs.resolved_scale(q_np.shape[-1]),
                       attrs.block_size, "lse")
    for sink, local in variants:
        a = dataclasses.replace(attrs, sink_blocks=sink, local_blocks=local)
        for name, p in (("naive", probs), ("oracle", mass), ("lse", lse)):
            curve = threshold_curve(p, mass, visible, a, seq, seq, taus)
            store = recorder.curves.setdefault((name, sink, local), {})
            store[layer] = store[layer] + curve if layer in store else curve


def register(name: str, fn) -> None:
    """Register `fn` under `name` in transformers' AttentionInterface (and the mask registry).

    Args:
        name: the attn_implementation name to use.
        fn: from `make_attention`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, fn)
    # The mask is rebuilt inside the function; the sdpa mask builder keeps transformers happy.
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def window_nll(model, input_ids) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one window.

    Args:
        model: a causal LM.
        input_ids: torch int64 [1, S].

    Returns:
        (sum of NLL over S - 1 predicted tokens, S - 1).
    """
    import torch

    with torch.inference_mode():
        hidden = model.model(input_ids=input_ids).last_hidden_state[0, :-1]
        target = input_ids[0, 1:]
        total = 0.0
        # Chunked lm_head keeps the [S, vocab] logits out of memory at long contexts.
        for start in range(0, hidden.shape[0], 1024):
            logits = model.lm_head(hidden[start:start + 1024]).float()
            total += float(torch.nn.functional.cross_entropy(logits, target[start:start + 1024], reduction="sum"))
    return total, int(target.numel())


def curves_to_arrays(curves: dict) -> dict:
    """Flatten captured curves for np.savez: keys 'router-sink-local-field', arrays [L, ...]."""
    arrays = {}
    for (router, sink, local), per_layer in curves.items():
        layers = sorted(per_layer)
        for field in ("kept", "visible", "mass_kept", "mass_total"):
            arrays[f"{router}-{sink}-{local}-{field}"] = np.stack([getattr(per_layer[i], field) for i in layers])
        arrays["taus"] = per_layer[layers[0]].taus
    return arrays


def arrays_to_curves(arrays) -> dict:
    """Inverse of `curves_to_arrays`: {(router, sink, local): [ThresholdCurve per layer]}."""
    out = {}
    for key in arrays:
        if key.endswith("-kept") and not key.endswith("mass_kept"):
            router, sink, local, _ = key.split("-")
            prefix = f"{router}-{sink}-{local}"
            out[(router, int(sink), int(local))] = [
                ThresholdCurve(arrays["taus"], arrays[f"{prefix}-kept"][i], arrays[f"{prefix}-visible"][i],
                               arrays[f"{prefix}-mass_kept"][i], arrays[f"{prefix}-mass_total"][i])
                for i in range(arrays[f"{prefix}-kept"].shape[0])]
    return out
