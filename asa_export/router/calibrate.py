"""Calibrate the ASA router of a model on real text (`asa-export calibrate`).

    model.onnx --rewrite (unless it already has ASA nodes)--> ASA model
      --capture copy: tau = 1 (dense), each ASA node's query/key(/mask) as extra outputs-->
      ONNX Runtime, one window of tokens at a time (memory: one window's q/k, spilled to disk)
      --phase 1: stats.block_mass (true block mass) vs reference.router_probs, threshold
        curves per site--> per-head tau reaching a target recall (or an overall density)
      --phase 2 (gate=True): router.gate.train_gate per site on the first half of the windows,
        curves on the gate's probabilities over the other half (gate_split)
        --> gate weights + per-head tau
      --retrieval heads (retrieval_heads = N > 0): passkey prompts built from the calibration
        text at the calibration context, run through the same capture copy; dense needle mass
        per (site, query head), mean over prompts --top N--> those heads at tau 1 (dense)
      --> model.asa.onnx (head_thresholds [Hq], gate_q_weight, gate_k_weight initializers on
          ASA inputs 5-7), report.json, plots

Work folder (`resume_dir`, else a temporary folder removed at the end); a rerun with the same
folder and settings skips what is there:

    run.json             what the captures depend on (model file, tokens, context, windows)
    capture.onnx         the capture copy of the model
    capture/w{i}.npz     q{j}, k{j}(, m{j}) of every site j for window i (float32)
    curves-{key}/w{i}.npz          phase-1 statistics of every site for window i (true block
                                   mass, curves, forced-block mass); key = hash of the tau grid
                                   and the sites' attributes, so other sink/local settings reuse
                                   the captures
    retrieval-{key}.npy  needle-mass scores [sites, Hq] (key = prompts' settings + tokenizer)
    curves-{key}/gate-{key}/s{j}.npz  trained gate of site j and its curves (+ s{j}.ckpt,
                                   train_gate's checkpoint); key = hash of the gate settings

Windows: the token stream of the texts (joined by blank lines) is cut into non-overlapping
windows of `context` tokens; `windows` of them are chosen by a seeded permutation, so the run is
deterministic given the seed and a run with more windows extends one with fewer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from asa_export import contract, io
from asa_export.contract import AsaAttributes, reference
from asa_export.errors import AsaExportError
from asa_export.passes.pipeline import RewriteOptions
from asa_export.router import retrieval, stats

logger = logging.getLogger("asa_export")

DEFAULT_TARGET_RECALL = 0.97
LOW_DENSITY = 0.2
# Recall targets searched when a target density is asked for (fine steps near 1).
_RECALL_GRID = np.round(np.concatenate([np.arange(0.5, 0.9, 0.01), np.arange(0.9, 1.0, 0.0025),
                                        [1.0]]), 6)
_RUN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CalibrateOptions:
    """Settings of one calibration run (every `asa-export calibrate` option maps to one).

    At most one of `target_recall`, `target_density`, `threshold` is set; none means
    `target_recall=DEFAULT_TARGET_RECALL`.

    Args:
        target_recall: per-head tau = the smallest grid tau whose attention-mass recall reaches
            this on the calibration windows (per head, per site).
        target_density: per-head tau at the highest common recall target whose overall density
            (all sites and heads) stays <= this.
        threshold: one tau for every head (written as head_thresholds too), statistics reported.
        gate: phase 2, train a learned gate per site and fit thresholds on its probabilities.
        context: tokens per window.
        windows: number of calibration windows.
        seed: seeds the window choice and the gate.
        rewrite: attributes used when the input is an original export (block size, sink and
            local blocks, select_per); an already rewritten model keeps its own.
        taus: the tau grid of the statistics.
        low_density: a head is marked "low density" when some tau reaches the target recall
            at a density <= this.
        gate_dim: gate width Dg.
        gate_steps: Adam steps per site.
        gate_lr: Adam learning rate.
        device: torch device for the gate ("auto": cuda when torch sees one, else cpu).
        library: ONNX Runtime ASA library for the capture (None = find it, else the function).
        retrieval_heads: after fitting, set the N query heads (over all sites) that put the most
            dense attention mass on a pass key's needle to tau 1 (exactly dense). The router's
            block mean hides a short needle, and these heads read it (BENCHMARKS.md "Router
            accuracy": 20 for SmolLM2-135M at 4K). Works with `gate` too: tau 1 keeps every
            visible block whatever the router's probabilities are. The fit's target (recall,
            density) holds for the fitted thresholds; the retrieval heads' density comes on
            top (the report's "retrieval"."fitted" holds the totals without them). 0 = off.
        retrieval_context: tokens per scoring prompt (None: `context`). Heads scored on longer
            prompts than the threshold windows were the measured choice for SmolLM2-135M
            (thresholds at 2K, heads scored at 4K; BENCHMARKS.md).
        retrieval_depths: needle depths of the scoring prompts (fractions of the filler).
        retrieval_keys: pass keys per depth; key j's filler starts at token j * context of the
            calibration text, so the text needs about retrieval_keys * retrieval_context tokens.
        layer_recall: (site index, recall) pairs that replace `target_recall` at those sites
            (ASA nodes in graph order: the model's layers). Recall mode only. Measured on
            SmolLM2-135M at 4K: layers 10-24 carry the perplexity loss and the others tolerate
            recall 0.90 (BENCHMARKS.md "Router accuracy").
    """

    target_recall: float | None = None
    target_density: float | None = None
    threshold: float | None = None
    gate: bool = False
    context: int = 2048
    windows: int = 4
    seed: int = 0
    rewrite: RewriteOptions = RewriteOptions()
    taus: tuple[float, ...] = stats.DEFAULT_TAUS
    low_density: float = LOW_DENSITY
    gate_dim: int = 32
    gate_steps: int = 300
    gate_lr: float = 1e-2
    device: str = "auto"
    library: object = None
    retrieval_heads: int = 0
    retrieval_context: int | None = None
    retrieval_depths: tuple[float, ...] = retrieval.DEFAULT_DEPTHS
    retrieval_keys: int = retrieval.DEFAULT_KEYS
    layer_recall: tuple[tuple[int, float], ...] = ()

    def mode(self) -> tuple[str, float]:
        """("recall" | "density" | "threshold", value)."""
        chosen = [(n, v) for n, v in (("recall", self.target_recall),
                                      ("density", self.target_density),
                                      ("threshold", self.threshold)) if v is not None]
        if len(chosen) > 1:
            raise AsaExportError("give at most one of target recall, target density, threshold")
        return chosen[0] if chosen else ("recall", DEFAULT_TARGET_RECALL)

    def prompt_context(self) -> int:
        """Tokens per retrieval-head scoring prompt."""
        return self.retrieval_context or self.context

    def grid(self) -> np.ndarray:
        """The tau grid, including the fixed threshold when one is given."""
        taus = set(float(t) for t in self.taus)
        if self.threshold is not None:
            taus.add(float(min(self.threshold, 1.0)))
        return np.array(sorted(taus), dtype=np.float64)


@dataclasses.dataclass
class SiteInfo:
    """One ASA site of the model being calibrated."""

    index: int
    name: str
    attrs: AsaAttributes
    inputs: tuple[str, str, str | None]  # query, key, key_padding_mask value names
    has_bias: bool


# ---------------------------------------------------------------------------- public API


def calibrate(model_path: str | os.PathLike, texts: Sequence[str | os.PathLike],
              tokenizer: str | os.PathLike, output_path: str | os.PathLike,
              options: CalibrateOptions = CalibrateOptions(), *,
              report_path: str | os.PathLike | None = None,
              plots_dir: str | os.PathLike | None = None,
              resume_dir: str | os.PathLike | None = None) -> dict:
    """Calibrate the router of an ONNX model on text and write the calibrated ASA model.

    Args:
        model_path: an original export (rewritten first with `options.rewrite`) or a model
            that already has ASA nodes.
        texts: UTF-8 text files, concatenated in order.
        tokenizer: a tokenizer folder (transformers files or tokenizer.json), a tokenizer.json
            file, or a GGUF model file (its vocabulary).
        output_path: the calibrated model (atomic write; external data for large models).
        options: the calibration settings.
        report_path: optional JSON report.
        plots_dir: optional folder for PNG plots (needs matplotlib).
        resume_dir: work folder kept between runs (captures, statistics, gate checkpoints).

    Returns:
        The report as a dict (what `report_path` receives).

    Raises:
        AsaExportError: bad input (empty or too short text, tokenizer/model vocabulary
            mismatch, model without attention sites, gate unavailable, bad options or paths).
    """
    from asa_export import io

    start = time.perf_counter()
    walls: dict = {}
    mode = _check_options(options)
    _check_paths(model_path, output_path, report_path, plots_dir)
    for path in _non_empty(texts):  # before minutes of loading: fail fast on bad text files
        _read_text(path)
    if options.gate:
        _gate_module()
    model, sites, rewritten = _timed(walls, "load", _load_sites, model_path, options.rewrite)
    _check_layer_recall(options, sites)
    with _work_dir(resume_dir) as work:
        ids = _timed(walls, "tokenize", _token_ids, texts, tokenizer, model, work)
        wins = choose_windows(len(ids), options.context, options.windows, options.seed)
        _check_run(work, _fingerprint(model_path, ids, wins, options))
        _check_retrieval_count(model, sites, options.retrieval_heads)
        result = _fit(model, sites, ids, wins, work, options, mode, walls)
        if options.retrieval_heads:
            scores = _timed(walls, "retrieval", score_retrieval_heads, model, sites, ids,
                            tokenizer, work, options)
            result["retrieval"] = apply_retrieval_heads(result, sites, scores,
                                                        options.retrieval_heads)
        _timed(walls, "write", _write_model, model, sites, result, output_path)
    walls["total"] = time.perf_counter() - start
    report = build_report(model_path, output_path, texts, tokenizer, options, mode, sites, wins,
                          result, rewritten, walls)
    if report_path is not None:
        io.write_text_atomic(report_path, json.dumps(report, indent=1) + "\n")
    if plots_dir is not None:
        write_plots(report, result, plots_dir)
    return report


def _fit(model, sites, ids, wins, work, options: CalibrateOptions, mode, walls: dict) -> dict:
    """Capture, phase 1 and (with options.gate) phase 2 in the work folder.

    Returns:
        {"router", "fit" (fit_thresholds of the written router), "curves", "forced",
         "training_free" (phase-1 fit when a gate is used), "gates", "base_curves"}.
    """
    walls["capture"] = capture_windows(model, sites, ids, wins, work, options)
    attrs = [s.attrs.as_onnx_attributes() for s in sites]
    curves_dir = work / f"curves-{_key(_floats(options.grid()), attrs)}"
    walls["phase1"] = phase1_statistics(sites, wins, work, curves_dir, options)
    base = [_sum_curves(curves_dir, len(wins), s.index, "router") for s in sites]
    fit = fit_thresholds(base, options, mode)
    result = {"router": "mean", "fit": fit, "curves": base, "training_free": None,
              "forced": [_sum_arrays(curves_dir, len(wins), f"forced{s.index}") for s in sites]}
    if options.gate:
        gates, gate_curves, walls["gate"] = phase2_gates(sites, wins, work, curves_dir, options)
        result.update({"router": "gate", "fit": fit_thresholds(gate_curves, options, mode),
                       "curves": gate_curves, "gates": gates, "training_free": fit,
                       "base_curves": base})
    return result


def choose_windows(num_tokens: int, context: int, count: int, seed: int) -> list[int]:
    """Start offsets of `count` non-overlapping windows of `context` tokens, seeded.

    The choice is a prefix of one seeded permutation of the window slots, so the first n
    windows are the same for any count >= n.

    Returns:
        Token offsets (multiples of `context`), at most `count` of them.

    Raises:
        AsaExportError: the text is shorter than one window.
    """
    slots = num_tokens // context
    if slots < 1:
        raise AsaExportError(f"the calibration text has {num_tokens} tokens, fewer than one "
                             f"window of {context}: give more text or a smaller --context")
    if slots < count:
        logger.warning("the text holds %d window(s) of %d tokens, not %d: using %d",
                       slots, context, count, slots)
    order = np.random.default_rng(seed).permutation(slots)[:count]
    return [int(s) * context for s in order]


def load_tokenizer(path: str | os.PathLike) -> Callable[[str], np.ndarray]:
    """A function text -> int64 token ids (no special tokens added) for a tokenizer path.

    Args:
        path: a folder with transformers tokenizer files (or only tokenizer.json), a
            tokenizer.json file, or a GGUF file (transformers reads its vocabulary).

    Raises:
        AsaExportError: the path is missing or holds no tokenizer.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise AsaExportError(f"tokenizer {path} does not exist: give a tokenizer folder, a "
                             "tokenizer.json or a GGUF file")
    try:
        if path.is_file() and path.suffix == ".json":
            return _tokenizers_encoder(path)
        if path.is_file() and path.suffix == ".gguf":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        elif path.is_dir() and not any((path / f).exists() for f in
                                       ("tokenizer_config.json", "config.json")):
            if not (path / "tokenizer.json").is_file():
                raise AsaExportError(f"{path} holds no tokenizer (no tokenizer.json, "
                                     "tokenizer_config.json or config.json)")
            return _tokenizers_encoder(path / "tokenizer.json")
        elif path.is_dir():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
        else:
            raise AsaExportError(f"tokenizer {path}: expected a folder, a tokenizer.json or a "
                                 ".gguf file")
    except AsaExportError:
        raise
    except Exception as err:  # transformers / tokenizers raise many types
        raise AsaExportError(f"cannot load the tokenizer {path}: {type(err).__name__}: {err}") from err
    return lambda text: np.asarray(tok(text, add_special_tokens=False).input_ids, dtype=np.int64)


def _tokenizers_encoder(path: pathlib.Path) -> Callable[[str], np.ndarray]:
    """A tokenizer.json read by the `tokenizers` library (no transformers files needed)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return lambda text: np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def model_vocab_size(model) -> int | None:
    """The model's vocabulary size: the last dim of a `logits` output, else the rows of the
    embedding table that `input_ids` indexes (Gather on an initializer); None if unknown."""
    for out in model.graph.outputs:
        if "logits" in (out.name or "") and out.shape is not None and len(out.shape) >= 1:
            last = out.shape[-1]
            if isinstance(last, int):
                return last
    for value in model.graph.inputs:
        if value.name != "input_ids":
            continue
        for node, slot in value.uses():
            table = node.inputs[0]
            if node.op_type == "Gather" and slot == 1 and table is not None and \
                    table.const_value is not None:
                return int(table.const_value.shape[0])
    return None


# ---------------------------------------------------------------------------- load and rewrite


def _load_sites(model_path, rewrite_options: RewriteOptions):
    """Load; rewrite an original export; return (model, sites, whether it was rewritten here)."""
    from asa_export import api, io
    from asa_export.passes import rewrite
    from asa_export.passes.pipeline import rewrite_model

    model = io.load_model(model_path)
    rewritten = False
    if not rewrite.asa_nodes(model):
        api.validate_options(rewrite_options)
        plain = dataclasses.replace(rewrite_options, head_thresholds=None, gates=None)
        report = rewrite_model(model, plain)
        if not report.sites:
            raise AsaExportError(api.no_site_message(model_path, report))
        rewritten = True
        logger.info("rewrote %d attention site(s)", len(report.sites))
    sites = []
    for index, node in enumerate(rewrite.asa_nodes(model)):
        inputs = list(node.inputs) + [None] * 5
        mask = inputs[3].name if inputs[3] is not None else None
        sites.append(SiteInfo(index, node.name or f"asa_{index}", rewrite.node_attributes(node),
                              (inputs[0].name, inputs[1].name, mask), inputs[4] is not None))
    return model, sites, rewritten


# ---------------------------------------------------------------------------- text


def _token_ids(texts, tokenizer, model, work: pathlib.Path) -> np.ndarray:
    """Tokenize the texts (joined by blank lines) and check the ids against the model.

    The ids are cached in the work folder (keyed by the text and the tokenizer files): a
    resumed run does not load the tokenizer again (a GGUF vocabulary takes 15-45 s here).
    """
    text = "\n\n".join(_read_text(path) for path in _non_empty(texts))
    cache = work / f"tokens-{_key(hashlib.sha1(text.encode()).hexdigest(), _file_id(tokenizer))}.npy"
    if cache.exists():
        ids = np.load(cache)
    else:
        ids = load_tokenizer(tokenizer)(text)
        np.save(cache, ids)
    if ids.size == 0:
        raise AsaExportError("the tokenizer produced no tokens from the calibration text")
    _check_vocabulary(ids, model)
    logger.info("calibration text: %d tokens", ids.size)
    return ids


def _non_empty(texts):
    if not texts:
        raise AsaExportError("no calibration text: give at least one --text FILE")
    return texts


def _read_text(path) -> str:
    path = pathlib.Path(path)
    if not path.is_file():
        raise AsaExportError(f"calibration text {path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AsaExportError(f"calibration text {path} is not UTF-8 text: {err}") from err
    if not text.strip():
        raise AsaExportError(f"calibration text {path} is empty")
    return text


def _file_id(path) -> list:
    """Identity of a tokenizer path: every file (below it) with its size and mtime."""
    path = pathlib.Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _check_vocabulary(ids: np.ndarray, model) -> None:
    vocab = model_vocab_size(model)
    if vocab is None:
        logger.warning("the model's vocabulary size is unknown (no static logits output or "
                       "embedding table): token ids are not checked")
    elif ids.max() >= vocab or ids.min() < 0:
        raise AsaExportError(
            f"the tokenizer produced token id {int(ids.max())}, but the model's vocabulary has "
            f"{vocab} entries: the tokenizer does not belong to this model (give the model's "
            "own tokenizer)")


# ---------------------------------------------------------------------------- capture


def capture_windows(model, sites: list[SiteInfo], ids: np.ndarray, wins: list[int], work,
                    options: CalibrateOptions) -> list[float]:
    """Run the dense capture copy in ONNX Runtime on each window not captured yet.

    Returns:
        Wall seconds per window (0.0 for windows found in the work folder).
    """
    folder = work / "capture"
    folder.mkdir(exist_ok=True)
    todo = [i for i in range(len(wins)) if not (folder / f"w{i}.npz").exists()]
    walls = [0.0] * len(wins)
    if not todo:
        return walls
    sess = _capture_session(model, sites, work, options.library)
    names = _capture_names(sites)
    for n, i in enumerate(todo):
        t0 = time.perf_counter()
        window = ids[wins[i]:wins[i] + options.context]
        outs = sess.run(names, _feeds(sess, window))
        arrays = {}
        for site in sites:
            arrays[f"q{site.index}"] = np.asarray(outs[names.index(site.inputs[0])], np.float32)
            arrays[f"k{site.index}"] = np.asarray(outs[names.index(site.inputs[1])], np.float32)
            if site.inputs[2] is not None:
                arrays[f"m{site.index}"] = np.asarray(outs[names.index(site.inputs[2])])
        with io.atomic_path(folder / f"w{i}.npz", suffix=".npz") as tmp:  # resume: no half file
            np.savez(tmp, **arrays)
        walls[i] = time.perf_counter() - t0
        size = sum(a.nbytes for a in arrays.values()) / 2**20
        logger.info("capture window %d/%d (offset %d): %.1f s, %.0f MB of q/k", n + 1, len(todo),
                    wins[i], walls[i], size)
    return walls


def _capture_names(sites: list[SiteInfo]) -> list[str]:
    names = []
    for site in sites:
        for name in site.inputs:
            if name is not None and name not in names:
                names.append(name)
    return names


def _capture_session(model, sites: list[SiteInfo], work, library):
    """Write the capture copy (tau 1, no router inputs, q/k outputs) and open it in ORT."""
    import onnx_ir as ir

    from asa_export import io
    from asa_export.passes import rewrite
    from asa_export.runtime import ort

    path = work / "capture.onnx"
    if not path.exists():
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        copy.meta[io.SOURCE_KEY] = model.meta.get(io.SOURCE_KEY)
        for node in rewrite.asa_nodes(copy):
            # Dense attention: later layers must see the frozen model's q/k, not a sparse one's.
            node.attributes["threshold"] = ir.Attr("threshold", ir.AttributeType.FLOAT, 1.0)
            if len(node.inputs) > 5:
                node.resize_inputs(5)
        rewrite.refresh_functions(copy)
        _add_outputs(copy, _capture_names(sites))
        io.save_model(copy, path)
        del copy
    return ort.session(path, library=library)


def _add_outputs(model, names: list[str]) -> None:
    import onnx_ir as ir

    values = {v.name: v for n in model.graph for v in n.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    present = {v.name for v in model.graph.outputs}
    for name in names:
        if name in present:
            continue
        value = values[name]
        if value.dtype is None:
            value.dtype = ir.DataType.FLOAT
        model.graph.outputs.append(value)


def _feeds(sess, window: np.ndarray) -> dict:
    """Feeds for one unpadded window: input_ids, attention_mask, position_ids, empty past."""
    feeds, seq = {}, len(window)
    for inp in sess.get_inputs():
        dtype = _ORT_TYPES.get(inp.type)
        if inp.name == "input_ids":
            feeds[inp.name] = window[None].astype(dtype)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, seq), dtype=dtype)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(seq, dtype=dtype)[None]
        elif inp.name.startswith("past"):
            shape = [d if isinstance(d, int) else (1 if i == 0 else 0)
                     for i, d in enumerate(inp.shape)]
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
        else:
            raise AsaExportError(f"calibrate cannot feed the model input {inp.name!r}: it feeds "
                                 "input_ids, attention_mask, position_ids and empty past_* inputs")
    return feeds


_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16, "tensor(bool)": np.bool_}


# ---------------------------------------------------------------------------- phase 1


def phase1_statistics(sites: list[SiteInfo], wins: list[int], work, folder,
                      options: CalibrateOptions) -> list[float]:
    """Per window: true block mass and the training-free router's curves for every site.

    Args:
        sites: the model's ASA sites.
        wins: window offsets (their captures are in work/capture).
        work: the work folder.
        folder: where the statistics go (one file per window).
        options: the run's options (tau grid).

    Returns:
        Wall seconds per window (0.0 for windows found in the work folder).
    """
    folder.mkdir(exist_ok=True)
    walls = [0.0] * len(wins)
    taus = options.grid()
    for i in range(len(wins)):
        path = folder / f"w{i}.npz"
        if path.exists():
            continue
        t0 = time.perf_counter()
        arrays = {}
        with np.load(work / "capture" / f"w{i}.npz") as cap:
            for site in sites:
                q, k, mask = cap[f"q{site.index}"], cap[f"k{site.index}"], cap.get(f"m{site.index}")
                mass = stats.block_mass(q, k, site.attrs, mask)
                probs, visible = reference.router_probs(q, k, site.attrs, mask)
                curve = _site_curve(probs, mass, visible, site.attrs, q.shape[2], k.shape[2], taus)
                arrays.update(_curve_arrays(f"router{site.index}", curve))
                arrays[f"mass{site.index}"] = mass
                arrays[f"forced{site.index}"] = _forced_mass(mass, visible, site.attrs,
                                                              q.shape[2], k.shape[2])
        with io.atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        walls[i] = time.perf_counter() - t0
        logger.info("statistics window %d/%d: %.1f s (%d sites)", i + 1, len(wins), walls[i],
                    len(sites))
    return walls


def _site_curve(probs, mass, visible, attrs: AsaAttributes, seq_q: int, seq_kv: int, taus):
    """threshold_curve per selection unit: query heads, or KV groups for select_per = 1
    (the group's mass is the mean over its heads, as its probabilities are)."""
    if attrs.select_per == contract.SELECT_PER_KV_GROUP:
        batch, heads, nq, nk = mass.shape
        groups = probs.shape[1]
        mass = mass.reshape(batch, groups, heads // groups, nq, nk).mean(axis=2)
        attrs = dataclasses.replace(attrs, select_per=contract.SELECT_PER_QUERY_HEAD)
    return stats.threshold_curve(probs, mass, visible, attrs, seq_q, seq_kv, taus)


def _forced_mass(mass, visible, attrs: AsaAttributes, seq_q: int, seq_kv: int) -> np.ndarray:
    """[Hq, 2]: attention mass in the always-kept blocks (sink + local band), total mass."""
    forced = reference.forced_blocks(attrs, seq_q, seq_kv)[None, None] & visible[:, None]
    vis = np.broadcast_to(visible[:, None], mass.shape)
    kept = np.where(forced, mass, 0).sum(axis=(0, 2, 3), dtype=np.float64)
    total = np.where(vis, mass, 0).sum(axis=(0, 2, 3), dtype=np.float64)
    return np.stack([kept, total], axis=1)


def _curve_arrays(prefix: str, curve: stats.ThresholdCurve) -> dict:
    return {f"{prefix}_{f.name}": getattr(curve, f.name) for f in dataclasses.fields(curve)}


def _curve_from(arrays, prefix: str) -> stats.ThresholdCurve:
    return stats.ThresholdCurve(*(np.asarray(arrays[f"{prefix}_{f.name}"])
                                  for f in dataclasses.fields(stats.ThresholdCurve)))


def _sum_curves(folder, count: int, index: int, kind: str) -> stats.ThresholdCurve:
    total = None
    for i in range(count):
        with np.load(folder / f"w{i}.npz") as arrays:
            curve = _curve_from(arrays, f"{kind}{index}")
        total = curve if total is None else total + curve
    return total


def _sum_arrays(folder, count: int, name: str) -> np.ndarray:
    total = 0
    for i in range(count):
        with np.load(folder / f"w{i}.npz") as arrays:
            total = total + arrays[name]
    return total


# ---------------------------------------------------------------------------- fitting


def fit_thresholds(curves: list[stats.ThresholdCurve], options: CalibrateOptions,
                   mode: tuple[str, float]) -> dict:
    """Per-site thresholds for the chosen target.

    Args:
        curves: one summed curve per site (per selection unit: query head or KV group).
        options: the run's options (grid, low-density bar).
        mode: ("recall" | "density" | "threshold", value).

    Returns:
        {"thresholds": [per site: float32 [Hsel]], "recall_target": float | None,
         "density": overall, "recall": overall}.

    Raises:
        AsaExportError: the target density is below what the forced blocks alone give.
    """
    kind, value = mode
    target = None
    if kind == "recall":
        target = value
        per_site = dict(options.layer_recall)
        taus = [stats.fit_head_thresholds(c, per_site.get(i, value)) for i, c in enumerate(curves)]
    elif kind == "threshold":
        taus = [np.full(c.kept.shape[0], min(value, 1.0), np.float32) for c in curves]
    else:
        target, taus = _fit_density(curves, value)
    density, recall = _overall(curves, taus)
    return {"thresholds": taus, "recall_target": target, "density": density, "recall": recall}


def _fit_density(curves, budget: float):
    """The highest recall target on _RECALL_GRID whose overall density stays <= budget."""
    best = None
    for target in _RECALL_GRID:
        taus = [stats.fit_head_thresholds(c, float(target)) for c in curves]
        if _overall(curves, taus)[0] <= budget + 1e-12:
            best = (float(target), taus)
        else:
            break  # density never decreases as the target rises
    if best is None:
        floor = _overall(curves, [stats.fit_head_thresholds(c, float(_RECALL_GRID[0]))
                                  for c in curves])[0]
        raise AsaExportError(
            f"target density {budget} is below what the router reaches at recall "
            f"{_RECALL_GRID[0]} (density {floor:.3f}; the sink and local blocks alone are kept "
            "always): raise --target-density or lower --local-blocks / --sink-blocks")
    return best


def head_points(curve: stats.ThresholdCurve, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-head (density, recall) [Hsel] when head h uses tau taus[h] from the curve's grid."""
    index = np.array([int(np.argmin(np.abs(curve.taus - t))) for t in taus])
    heads = np.arange(len(index))
    return curve.density()[heads, index], curve.recall()[heads, index]


def _overall(curves, taus) -> tuple[float, float]:
    kept = vis = mass = total = 0.0
    for curve, t in zip(curves, taus):
        index = np.array([int(np.argmin(np.abs(curve.taus - x))) for x in t])
        heads = np.arange(len(index))
        kept += curve.kept[heads, index].sum()
        mass += curve.mass_kept[heads, index].sum()
        vis += curve.visible.sum()
        total += curve.mass_total.sum()
    return float(kept / max(vis, 1)), float(mass / max(total, 1e-30))


def low_density_heads(curve: stats.ThresholdCurve, recall: float, density: float) -> list[int]:
    """Heads for which some grid tau reaches `recall` at a density <= `density`."""
    ok = (curve.recall() >= recall - 1e-12) & (curve.density() <= density + 1e-12)
    return [int(h) for h in np.flatnonzero(ok.any(axis=1))]


# ---------------------------------------------------------------------------- phase 2


def _gate_module():
    """asa_export.router.gate, or a clear error when it (or torch) is missing."""
    import importlib

    try:
        gate = importlib.import_module("asa_export.router.gate")
    except ImportError as err:
        if err.name in ("asa_export.router.gate", None):
            raise AsaExportError("--gate needs the learned gate (asa_export.router.gate), which "
                                 "this installation does not have; run without --gate for "
                                 "per-head thresholds only") from err
        raise AsaExportError(f"--gate needs {err.name} (pip install 'asa-export[models]'): "
                             f"{err}") from err
    if "gate_q_weight" not in contract.INPUTS:
        raise AsaExportError("--gate needs the contract's gate inputs (gate_q_weight, "
                             "gate_k_weight), which this version of asa_export lacks")
    return gate


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def phase2_gates(sites: list[SiteInfo], wins: list[int], work, curves_dir,
                 options: CalibrateOptions):
    """Train (or load) each site's gate, then its curves on the gate's probabilities.

    Args:
        sites: the model's ASA sites.
        wins: window offsets (captures in work/capture, true block mass in curves_dir).
        work: the work folder.
        curves_dir: the phase-1 statistics folder.
        options: gate settings.

    Returns:
        (gates {site: Gate}, curves [per site], wall seconds per site).
    """
    gate_mod = _gate_module()
    key = _key(options.gate_dim, options.gate_steps, options.gate_lr, options.seed, len(wins),
               "split-train-fit")
    folder = curves_dir / f"gate-{key}"
    folder.mkdir(exist_ok=True)
    device = _device(options.device)
    gates, curves, walls = {}, [], []
    for site in sites:
        t0 = time.perf_counter()
        path = folder / f"s{site.index}.npz"
        if not path.exists():
            g, curve = _train_site(gate_mod, site, wins, work, curves_dir, folder, options,
                                   device)
            with io.atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, q_weight=g.q_weight, k_weight=g.k_weight,
                         **_curve_arrays("gate", curve))
        with np.load(path) as arrays:
            gates[site.index] = gate_mod.Gate(arrays["q_weight"], arrays["k_weight"])
            curves.append(_curve_from(arrays, "gate"))
        walls.append(time.perf_counter() - t0)
        logger.info("gate %s (%d/%d): %.1f s", site.name, site.index + 1, len(sites), walls[-1])
    return gates, curves, walls


def gate_split(num_windows: int) -> tuple[list[int], list[int]]:
    """Which calibration windows train the gate and which fit its thresholds.

    Thresholds fitted on the gate's own training windows come out optimistic (measured on
    SmolLM2-135M: held-out recall fell short of the target in layers 3-10), so with two or more
    windows the first half trains the gate and the rest measure its curves. One window does
    both.

    Returns:
        (training window indices, threshold-fitting window indices).
    """
    if num_windows < 2:
        return [0], [0]
    cut = (num_windows + 1) // 2
    return list(range(cut)), list(range(cut, num_windows))


def _train_site(gate_mod, site: SiteInfo, wins, work, curves_dir, folder, options, device):
    samples, masks = [], []
    for i in range(len(wins)):
        with np.load(work / "capture" / f"w{i}.npz") as cap:
            samples.append((cap[f"q{site.index}"], cap[f"k{site.index}"]))
            masks.append(cap.get(f"m{site.index}"))
    train, fit = gate_split(len(wins))
    if any(m is not None and not np.all(m) for m in masks):
        raise AsaExportError(f"{site.name}: the captured key padding mask drops keys; the gate "
                             "trainer takes unpadded windows only")

    def progress(step, steps, loss):
        if step == steps or step % max(1, steps // 4) == 0:
            logger.info("gate %s: step %d/%d, loss %.4f", site.name, step, steps, loss)

    g = gate_mod.train_gate([samples[i] for i in train], site.attrs, dim=options.gate_dim,
                            steps=options.gate_steps, lr=options.gate_lr, seed=options.seed,
                            device=device, checkpoint=folder / f"s{site.index}.ckpt",
                            progress=progress)
    taus, total = options.grid(), None
    for i in fit:
        q, k = samples[i]
        probs, visible = reference.router_probs(q, k, site.attrs, masks[i],
                                                gate_q_weight=g.q_weight,
                                                gate_k_weight=g.k_weight)
        with np.load(curves_dir / f"w{i}.npz") as arrays:
            mass = arrays[f"mass{site.index}"]
        curve = _site_curve(probs, mass, visible, site.attrs, q.shape[2], k.shape[2], taus)
        total = curve if total is None else total + curve
    return g, total


# ---------------------------------------------------------------------------- retrieval heads


def _check_retrieval_count(model, sites: list[SiteInfo], count: int) -> None:
    """Refuse more retrieval heads than the model has query heads (before any capture)."""
    from asa_export.passes import rewrite

    if not count:
        return
    heads = [rewrite._node_heads(node)[0] for node in rewrite.asa_nodes(model)]
    if None not in heads and count > sum(heads):
        raise AsaExportError(f"--retrieval-heads {count} is more than the model's {sum(heads)} "
                             f"query heads ({len(sites)} attention sites): give at most "
                             f"{sum(heads)}")


def score_retrieval_heads(model, sites: list[SiteInfo], ids: np.ndarray, tokenizer, work,
                          options: CalibrateOptions) -> np.ndarray:
    """Mean dense needle mass per (site, query head) on passkey prompts from the calibration text.

    The prompts (retrieval.passkey_prompts: options.retrieval_keys keys x
    options.retrieval_depths, at options.prompt_context() tokens, filler from `ids`) run through the
    capture copy of phase 1 (dense, one prompt at a time); retrieval.needle_mass scores the rows
    that predict the answer. Cached in the work folder.

    Args:
        model: the ASA model (its capture copy is in `work`, or is written there).
        sites: its ASA sites.
        ids: the calibration token stream.
        tokenizer: the tokenizer path (encodes the prompt's fixed text).
        work: the work folder.
        options: context, seed and the retrieval_* settings.

    Returns:
        float64 [sites, max Hq]; -inf where a site has fewer query heads.

    Raises:
        AsaExportError: the text is too short for the prompts.
    """
    key = _key(options.prompt_context(), _floats(options.retrieval_depths), options.retrieval_keys,
               options.seed, _file_id(tokenizer))
    path = work / f"retrieval-{key}.npy"
    if path.exists():
        logger.info("retrieval heads: scores found in %s", path)
        return np.load(path)
    prompts = retrieval.passkey_prompts(load_tokenizer(tokenizer), ids, options.prompt_context(),
                                        options.retrieval_depths, options.retrieval_keys,
                                        options.seed)
    sess = _capture_session(model, sites, work, options.library)
    names = _capture_names(sites)
    total = 0.0
    for n, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        outs = sess.run(names, _feeds(sess, prompt["ids"]))
        total = total + _needle_scores(sites, names, outs, prompt)
        del outs  # one prompt's q/k at a time
        logger.info("retrieval prompt %d/%d (needle depth %.0f%%): %.1f s", n + 1, len(prompts),
                    100 * prompt["depth"], time.perf_counter() - t0)
    scores = total / len(prompts)
    with io.atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, scores)
    return scores


def _needle_scores(sites: list[SiteInfo], names: list[str], outs, prompt: dict) -> np.ndarray:
    """[sites, max Hq] needle mass of one prompt (-inf pads sites with fewer heads)."""
    rows = []
    for site in sites:
        q = np.asarray(outs[names.index(site.inputs[0])], np.float32)[0]
        k = np.asarray(outs[names.index(site.inputs[1])], np.float32)[0]
        scale = site.attrs.resolved_scale(q.shape[-1])
        rows.append(retrieval.needle_mass(q, k, scale, prompt["rows"], prompt["needle"]))
    out = np.full((len(sites), max(len(r) for r in rows)), -np.inf)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def apply_retrieval_heads(result: dict, sites: list[SiteInfo], scores: np.ndarray,
                          count: int) -> dict:
    """Set the `count` best-scoring query heads to tau 1 in result["fit"] (in place).

    With select_per = KV group the chosen head's group gets tau 1 (a group keeps the max of its
    heads' thresholds). The fit's overall density and recall are recomputed from the curves.

    Args:
        result: _fit's result (its "fit" thresholds per selection unit, "curves").
        sites: the ASA sites (site index = row of `scores`).
        scores: [sites, Hq] from score_retrieval_heads.
        count: how many heads.

    Returns:
        {"heads": [[site, head], ...], "head_scores", "scores" [sites][Hq],
         "fitted": {"density", "recall"} before the retrieval heads}.

    Raises:
        AsaExportError: more heads asked for than the model has.
    """
    available = int(np.isfinite(scores).sum())
    if count > available:
        raise AsaExportError(f"--retrieval-heads {count} is more than the model's {available} "
                             f"query heads: give at most {available}")
    chosen = retrieval.top_heads(scores, count)
    fit = result["fit"]
    before = {"density": fit["density"], "recall": fit["recall"]}
    new = []
    for site, taus in zip(sites, fit["thresholds"]):
        group = int(np.isfinite(scores[site.index]).sum()) // len(taus)
        units = sorted({h // group for h in chosen.get(site.index, [])})
        new.append(retrieval.dense_heads({0: taus}, {0: units}, 1, len(taus))[0])
    fit["thresholds"] = new
    fit["density"], fit["recall"] = _overall(result["curves"], new)
    heads = [[layer, h] for layer, hs in chosen.items() for h in hs]
    logger.info("retrieval heads at tau 1 (site, head): %s; density %.4f -> %.4f", heads,
                before["density"], fit["density"])
    return {"heads": heads, "head_scores": [round(float(scores[l, h]), 6) for l, h in heads],
            "scores": [[round(float(x), 6) if np.isfinite(x) else None for x in row]
                       for row in scores],
            "fitted": before}


# ---------------------------------------------------------------------------- output


def _write_model(model, sites: list[SiteInfo], result: dict, output_path) -> None:
    """Wire thresholds (and gates) into the ASA nodes and write the model atomically."""
    from asa_export import io
    from asa_export.passes import rewrite

    nodes = rewrite.asa_nodes(model)
    gates = result.get("gates") or {}
    for site, node, taus in zip(sites, nodes, result["fit"]["thresholds"]):
        rewrite.set_router_inputs(model, node, head_thresholds=_per_query_head(taus, site, node),
                                  gate=gates.get(site.index))
    rewrite.refresh_functions(model)
    io.save_model(model, output_path)
    logger.info("wrote %s", output_path)


def _per_query_head(taus: np.ndarray, site: SiteInfo, node) -> np.ndarray:
    """Group thresholds (select_per = 1) repeated over the group's query heads: the group
    uses the max over its heads, which is then the fitted value."""
    if site.attrs.select_per != contract.SELECT_PER_KV_GROUP:
        return taus
    from asa_export.passes import rewrite

    heads_q = rewrite._node_heads(node)[0]
    if heads_q is None:
        raise AsaExportError(f"{site.name}: the number of query heads is not static")
    return np.repeat(taus, heads_q // len(taus)).astype(np.float32)


def build_report(model_path, output_path, texts, tokenizer, options, mode, sites, wins, result,
                 rewritten, walls) -> dict:
    """The JSON report: settings, per-site thresholds/density/recall, totals, wall times."""
    fit, curves, forced = result["fit"], result["curves"], result["forced"]
    recall_bar = fit["recall_target"] or (options.target_recall or DEFAULT_TARGET_RECALL)
    site_rows = []
    for site, curve, taus, sink_local in zip(sites, curves, fit["thresholds"], forced):
        density, recall = head_points(curve, taus)
        d, r = _overall([curve], [taus])
        site_rows.append({
            "index": site.index, "name": site.name, "router": result["router"],
            "attributes": site.attrs.as_onnx_attributes(),
            "thresholds": _floats(taus), "density": d, "recall": r,
            "head_density": _floats(density), "head_recall": _floats(recall),
            "low_density_heads": low_density_heads(curve, recall_bar, options.low_density),
            # Mass the sink and local blocks hold alone, per query head (before any tau).
            "forced_mass": _floats(sink_local[:, 0] / np.maximum(sink_local[:, 1], 1e-30)),
            "notes": (["the additive bias is not part of the true block mass here"]
                      if site.has_bias else []),
        })
    totals = {"density": fit["density"], "recall": fit["recall"],
              "recall_target": fit["recall_target"],
              "low_density_heads": sum(len(s["low_density_heads"]) for s in site_rows)}
    if result["training_free"] is not None:
        tf = result["training_free"]
        totals["training_free"] = {"density": tf["density"], "recall": tf["recall"],
                                   "recall_target": tf["recall_target"]}
    return {
        "model": os.fspath(model_path), "output": os.path.abspath(output_path),
        "texts": [os.fspath(t) for t in texts], "tokenizer": os.fspath(tokenizer),
        "rewritten_here": rewritten,
        "settings": {"mode": mode[0], "value": mode[1], "context": options.context,
                     "windows": len(wins), "window_offsets": wins, "seed": options.seed,
                     "gate": options.gate, "gate_dim": options.gate_dim,
                     "gate_steps": options.gate_steps, "taus": _floats(options.grid()),
                     "low_density": options.low_density, "low_density_recall": recall_bar,
                     "retrieval_heads": options.retrieval_heads,
                     "layer_recall": {str(i): r for i, r in options.layer_recall}},
        "sites": site_rows, "totals": totals, "wall_s": _rounded(walls),
        **({"retrieval": {**result["retrieval"], "context": options.prompt_context(),
                          "depths": _floats(options.retrieval_depths),
                          "keys": retrieval.passkey_keys(options.retrieval_keys, options.seed)}}
           if result.get("retrieval") else {}),
    }


def _rounded(walls: dict) -> dict:
    return {k: (round(v, 2) if isinstance(v, float) else [round(x, 2) for x in v])
            for k, v in walls.items()}


def _floats(values) -> list[float]:
    return [round(float(v), 6) for v in np.asarray(values).ravel()]


def write_plots(report: dict, result: dict, plots_dir) -> list[str]:
    """density_recall.png (per-site curves and operating points) and head_density.png
    (site x head density heatmap).

    Returns:
        The written paths.

    Raises:
        AsaExportError: matplotlib is missing or the folder cannot be created.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise AsaExportError("--plots needs matplotlib: pip install 'asa-export[calibrate]'") from err
    folder = pathlib.Path(plots_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AsaExportError(f"cannot create the plots folder {folder}: {err.strerror}") from err
    paths = [folder / "density_recall.png", folder / "head_density.png"]
    _plot_curves(plt, report, result["curves"], result.get("base_curves"), paths[0])
    _plot_heatmap(plt, report, paths[1])
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return [str(p) for p in paths]


def _plot_curves(plt, report, curves, base_curves, path) -> None:
    """Per layer: density vs recall over the tau grid (one global tau), the fitted point;
    with a gate, the training-free router's curves dashed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    cmap = plt.get_cmap("viridis")
    for n, (row, curve) in enumerate(zip(report["sites"], curves)):
        color = cmap(n / max(1, len(curves) - 1))
        ax.plot(*_global_curve(curve), color=color, lw=1,
                label=f"layer {row['index']}" if len(curves) <= 8 else None)
        if base_curves is not None:
            ax.plot(*_global_curve(base_curves[n]), color=color, lw=0.8, ls="--")
        ax.plot([row["density"]], [row["recall"]], "o", color=color, ms=3)
    ax.set_xlabel("density (kept / visible key blocks)")
    ax.set_ylabel("attention-mass recall")
    router = report["sites"][0]["router"] if report["sites"] else ""
    extra = " (dashed: training-free)" if base_curves is not None else ""
    ax.set_title(f"{router} router{extra}: one line per layer over one global tau; "
                 "dots: fitted per-head thresholds")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    if len(curves) <= 8:
        ax.legend(fontsize=7)
    else:  # too many lines for a legend: the colour scale names the layer
        scale = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(curves) - 1))
        fig.colorbar(scale, ax=ax, label="layer (site)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _global_curve(curve: stats.ThresholdCurve) -> tuple[np.ndarray, np.ndarray]:
    dens = curve.kept.sum(axis=0) / max(curve.visible.sum(), 1)
    return dens, curve.mass_kept.sum(axis=0) / max(curve.mass_total.sum(), 1e-30)


def _plot_heatmap(plt, report, path) -> None:
    rows = [row["head_density"] for row in report["sites"]]
    width = max(len(r) for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, :len(r)] = r
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * width + 2), max(3.0, 0.22 * len(rows) + 1.5)),
                           dpi=100)
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_xlabel("head (selection unit)")
    ax.set_ylabel("layer (site)")
    ax.set_title("density per layer and head at the fitted thresholds", fontsize=9)
    fig.colorbar(im, ax=ax, label="density")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- plumbing


def _check_options(options: CalibrateOptions) -> tuple[str, float]:
    mode = options.mode()
    kind, value = mode
    if kind in ("recall", "density") and not 0.0 < value <= 1.0:
        raise AsaExportError(f"target {kind} must be in (0, 1], got {value}")
    if kind == "threshold" and not (value > 0 and np.isfinite(value)):
        raise AsaExportError(f"threshold must be > 0, got {value}")
    if options.context < 1 or options.windows < 1:
        raise AsaExportError("context and windows must be >= 1")
    if options.gate and (options.gate_dim < 1 or options.gate_steps < 1):
        raise AsaExportError("gate dim and steps must be >= 1")
    if options.retrieval_heads < 0:
        raise AsaExportError(f"retrieval heads must be >= 0 (0 = none), got "
                             f"{options.retrieval_heads}")
    if options.retrieval_context is not None and options.retrieval_context < 1:
        raise AsaExportError(f"retrieval context must be >= 1, got {options.retrieval_context}")
    if options.retrieval_heads and (options.retrieval_keys < 1 or not options.retrieval_depths
                                    or not all(0 <= d <= 1 for d in options.retrieval_depths)):
        raise AsaExportError("retrieval heads need >= 1 pass key and needle depths in [0, 1]")
    if options.layer_recall:
        if kind != "recall":
            raise AsaExportError("per-layer recall targets apply to the target-recall fit, not "
                                 f"to a target {kind}")
        for site, recall in options.layer_recall:
            if site < 0 or not 0.0 < recall <= 1.0:
                raise AsaExportError(f"per-layer recall needs a layer index >= 0 and a recall in "
                                     f"(0, 1], got layer {site} recall {recall}")
    return mode


def _check_layer_recall(options: CalibrateOptions, sites: list) -> None:
    """Every layer named by `layer_recall` must be one of the model's ASA sites."""
    bad = sorted({i for i, _ in options.layer_recall if i >= len(sites)})
    if bad:
        raise AsaExportError(f"per-layer recall names layer(s) {bad}, but the model has "
                             f"{len(sites)} attention sites (layers 0-{len(sites) - 1})")


def _check_paths(model_path, output_path, report_path, plots_dir) -> None:
    from asa_export import io

    inputs = [os.path.abspath(model_path)]
    io.check_output_path(output_path, inputs=inputs)
    if report_path is not None:
        io.check_output_path(report_path, inputs=inputs)
        if os.path.abspath(report_path) == os.path.abspath(output_path):
            raise AsaExportError("the report path and the output path are the same file")
    if plots_dir is not None and os.path.exists(plots_dir) and not os.path.isdir(plots_dir):
        raise AsaExportError(f"--plots {plots_dir} exists and is not a folder")


def _fingerprint(model_path, ids, wins, options: CalibrateOptions) -> dict:
    """What the captures depend on (the capture runs dense: router attributes do not count)."""
    st = os.stat(model_path)
    return {"version": _RUN_VERSION, "model": os.path.abspath(model_path), "model_size": st.st_size,
            "model_mtime_ns": st.st_mtime_ns,
            "tokens": hashlib.sha1(ids.tobytes()).hexdigest(), "context": options.context,
            "window_offsets": wins}


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _check_run(work: pathlib.Path, fingerprint: dict) -> None:
    """A work folder belongs to one run: refuse one left by other settings."""
    path = work / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        # Window choices are prefixes of one seeded permutation: more or fewer windows reuse
        # the captured ones (capture/w{i} is the i-th window of both runs).
        old_wins, new_wins = old.get("window_offsets", []), fingerprint["window_offsets"]
        short, long = sorted((old_wins, new_wins), key=len)
        rest = {k: v for k, v in old.items() if k != "window_offsets"}
        if long[:len(short)] != short or rest != {k: v for k, v in fingerprint.items()
                                                  if k != "window_offsets"}:
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise AsaExportError(f"the resume folder {work} holds a run with other settings "
                                 f"({', '.join(diff)}): use another folder or delete it")
        fingerprint = dict(fingerprint, window_offsets=long)
    path.write_text(json.dumps(fingerprint))


class _work_dir:
    """The resume folder (kept) or a temporary folder (removed at the end)."""

    def __init__(self, resume_dir):
        self.resume = resume_dir

    def __enter__(self) -> pathlib.Path:
        if self.resume is not None:
            path = pathlib.Path(self.resume)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise AsaExportError(f"cannot create the resume folder {path}: {err.strerror}") from err
            self.tmp = None
            return path
        self.tmp = tempfile.mkdtemp(prefix="asa_calibrate_")
        return pathlib.Path(self.tmp)

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _timed(walls: dict, key: str, func, *args):
    t0 = time.perf_counter()
    out = func(*args)
    walls[key] = time.perf_counter() - t0
    logger.info("%s: %.1f s", key, walls[key])
    return out
