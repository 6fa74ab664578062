"""Retrieval heads: the query heads that read a far-away fact, kept dense through `head_thresholds`.

    dense attention on calibration passkey prompts --needle_mass--> score [L, Hq]
        (attention mass that the answer-predicting rows put on the needle's tokens)
    --top_heads(n)--> {layer: [heads]} --dense_heads(thresholds, heads)--> head_thresholds with
        those heads at tau 1 (contract input 5: no contract change)

Why: the training-free router scores a key block by its mean key; a 20-30 token needle inside
a 64-token block of ordinary text has an ordinary mean key, so a head with tau < 1 can drop the
block that a retrieval head needs (measured on SmolLM2 passkey prompts, BENCHMARKS.md "Router
accuracy"). Perplexity hardly sees it: few tokens depend on such heads' far reads.
Scores come from passkey prompts built from calibration text (passkey_prompts): the product
path is `asa-export calibrate --retrieval-heads N` (q / k captured through ONNX Runtime,
asa_export.router.calibrate); tools/eval_router.py `retrieval` is the torch research path.
numpy only.
"""

from __future__ import annotations

import numpy as np

from asa_export.errors import AsaExportError

PASSKEY_PREFIX = ("There is an important piece of information hidden inside a lot of irrelevant "
                  "text. Find it and memorize it. I will quiz you about it.\n\n")
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_KEYS = 2


def passkey_prompt(encode, filler_ids, context: int, depth: float, key: str) -> dict:
    """One passkey prompt + answer of exactly `context` tokens, the needle at `depth` of the filler.

    Layout: prefix, filler[:cut], needle ("The pass key is KEY ..."), filler[cut:room],
    question, " KEY" (the answer), with cut = round(depth * room).

    Args:
        encode: text -> token ids (a sequence of ints; no special tokens expected).
        filler_ids: filler token ids (ordinary text), at least `room` of them.
        context: total tokens of the prompt with its answer.
        depth: where the needle sits in the filler, 0 (start) .. 1 (end).
        key: the pass key text (digits).

    Returns:
        dict(ids int64 [context], n_answer, needle_start, needle_len, rows (the query positions
        that predict the answer tokens), needle (the needle's key positions)).

    Raises:
        AsaExportError: the context or the filler is too short for the prompt.
    """
    head, needle, question, answer = (list(encode(PASSKEY_PREFIX)),
                                      list(encode(PASSKEY_NEEDLE.format(key=key))),
                                      list(encode(PASSKEY_QUESTION)), list(encode(" " + key)))
    room = context - len(head) - len(needle) - len(question) - len(answer)
    if room <= 0 or len(filler_ids) < room:
        raise AsaExportError(f"passkey: no room for filler at context {context} (prompt text "
                             f"{context - room} tokens, filler {len(filler_ids)} of {room} "
                             "needed): give more text or a larger context")
    cut = round(depth * room)
    ids = head + list(filler_ids[:cut]) + needle + list(filler_ids[cut:room]) + question + answer
    start = len(head) + cut
    return {"ids": np.asarray(ids, dtype=np.int64), "n_answer": len(answer),
            "needle_start": start, "needle_len": len(needle),
            "rows": np.arange(context - len(answer) - 1, context - 1),
            "needle": np.arange(start, start + len(needle))}


def passkey_keys(count: int, seed: int) -> list[str]:
    """`count` seeded 5-digit pass keys (seed + 1000: other draws of `seed` stay independent)."""
    rng = np.random.default_rng(seed + 1000)
    return [str(k) for k in rng.integers(10000, 100000, size=count)]


def passkey_prompts(encode, filler_ids, context: int, depths=DEFAULT_DEPTHS,
                    keys: int = DEFAULT_KEYS, seed: int = 0) -> list[dict]:
    """The scoring prompts: every depth x every seeded key; key j's filler starts at token
    j * context of `filler_ids` (each key reads a different stretch of text).

    Args:
        encode: text -> token ids.
        filler_ids: the calibration token stream.
        context: tokens per prompt (with its answer).
        depths: needle depths in the filler.
        keys: pass keys per depth.
        seed: seeds the keys.

    Returns:
        [passkey_prompt dict + "depth", "key"], depth-major.

    Raises:
        AsaExportError: the token stream is too short for `keys` stretches of filler.
    """
    filler_ids = np.asarray(filler_ids)
    out = []
    for depth in depths:
        for j, key in enumerate(passkey_keys(keys, seed)):
            prompt = passkey_prompt(encode, filler_ids[j * context:], context, depth, key)
            out.append({**prompt, "depth": float(depth), "key": key})
    return out


def needle_mass(q: np.ndarray, k: np.ndarray, scale: float, rows, needle) -> np.ndarray:
    """Causal dense attention mass on the needle's keys, averaged over `rows`, per query head.

    Args:
        q: float [Hq, S, D] queries (RoPE applied) of one sequence.
        k: float [Hkv, S, D] keys; Hq is a multiple of Hkv (grouped-query attention).
        scale: score scale.
        rows: query positions to average over (e.g. the rows that predict the answer).
        needle: key positions of the needle (all before every row in `rows`).

    Returns:
        float64 [Hq]: mean over rows of sum over needle keys of softmax(scale * q . k).
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    if heads % kv_heads:
        raise AsaExportError(f"query heads {heads} are not a multiple of key heads {kv_heads}")
    rows, needle = np.asarray(rows), np.asarray(needle)
    if needle.size == 0 or rows.size == 0 or needle.max() > rows.min():
        raise AsaExportError("needle_mass needs a non-empty needle before every scored row")
    kk = np.repeat(k.astype(np.float64), heads // kv_heads, axis=0)
    s = scale * np.einsum("hrd,hkd->hrk", q[:, rows].astype(np.float64), kk)
    s = np.where(np.arange(k.shape[1])[None, None, :] > rows[None, :, None], -np.inf, s)  # causal
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p[:, :, needle].sum(-1).mean(-1)


def top_heads(scores: np.ndarray, count: int) -> dict:
    """The `count` (layer, head) pairs with the highest scores.

    Args:
        scores: [L, Hq] (e.g. mean needle_mass over calibration prompts).
        count: how many heads.

    Returns:
        {layer: sorted list of heads}, layers without a chosen head omitted.
    """
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=None, kind="stable")[:count]
    chosen = {}
    for flat in order:
        layer, head = divmod(int(flat), scores.shape[1])
        chosen.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def dense_heads(thresholds: dict | None, heads: dict, layers: int, num_heads: int,
                tau: float = 1.0) -> dict:
    """Per-head thresholds with the given heads at `tau` (1.0: exactly dense for those heads).

    Args:
        thresholds: {layer: [Hq] tau} or None; a float means that tau for every head.
        heads: {layer: [head indices]} (e.g. from top_heads).
        layers: number of layers.
        num_heads: Hq.
        tau: the threshold the chosen heads get.

    Returns:
        {layer: float32 [Hq]} for every layer (the contract's head_thresholds input).
    """
    out = {}
    for layer in range(layers):
        base = thresholds if not isinstance(thresholds, dict) else thresholds.get(layer, 1.0)
        row = np.broadcast_to(np.asarray(base, dtype=np.float32), (num_heads,)).copy()
        row[heads.get(layer, [])] = tau
        out[layer] = row
    return out
