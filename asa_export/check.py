"""Numeric parity of a rewritten model with its original, and attention density per layer.

    feeds (generated: input names, dynamic dims, padding masks; several batch/seq/padding mixes)
      -> Polygraphy Comparator.run([OnnxrtRunner(rewritten), OnnxrtRunner(original),
                                    OnnxrtRunner(original, graph optimizations off),
                                    TrtRunner(engine)   (only where TensorRT is installed)])
      -> zero the query rows with no visible key in all (they differ by contract)
      -> Comparator.compare_accuracy(rewritten vs original; atol, rtol)  +  per-output statistics
      -> noise floor = max over outputs of |original - original unoptimized|  (fp32 reordering)
      -> verdict: every output within atol/rtol ("element-wise"), else every output's max abs
         error <= NOISE_FACTOR x noise floor ("noise floor"), else failed; the engine's outputs
         (vs the original) are judged by the same rule

The engine runner is built (fp32, a profile spanning the feeds) or loaded (`engine=`) with the
ASA plugin library registered. Where `tensorrt` cannot be imported (this CI machine: DESIGN.md
"What can be run where") it is skipped and the result says so; it has never run here.
    rewritten copy whose ASA nodes also emit block_counts / visible_counts
      -> density per layer = sum(block_counts) / (sum(visible_counts) * Hsel)

Rows are judged by SPEC.md "Parity": only query rows with at least one visible key count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile

import numpy as np
import onnx_ir as ir

from asa_export import contract
from asa_export.errors import AsaExportError
from asa_export.inputs import generate_feeds, input_roles, key_padding
from asa_export.passes.rewrite import asa_nodes

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
# (batch, seq, past, pad): odd lengths, both paddings, and more than two 64-key blocks so that a
# threshold below 1 can drop blocks.
DEFAULT_ITERATIONS = ((2, 37, 0, "left"), (1, 16, 0, None), (2, 150, 0, "right"))
PAST_ITERATION = (2, 9, 21, "left")
# A rewrite reorders every attention layer's fp32 sums, the unoptimized original only some of
# them: 3x its noise, as tests/passes/test_models.py judges deep models (FlashAttention's bar for
# one reordered kernel is 2x).
NOISE_FACTOR = 3.0
RULE_ELEMENTWISE = "element-wise"
RULE_NOISE = "noise floor"


@dataclasses.dataclass
class OutputStats:
    """Error of one output over all iterations, on the compared (visible) rows only.

    Attributes:
        name: graph output name.
        max_abs, mean_abs: absolute error |rewritten - original|.
        max_rel, mean_rel: relative error |rewritten - original| / |original|, over elements
            with |original| >= atol (smaller ones are judged by the absolute error alone;
            dividing by them would report meaningless huge ratios).
        compared: number of elements compared; skipped: elements of rows without a visible key.
        passed: Polygraphy's element-wise verdict for this output (every iteration).
        noise_abs: max |original - original with ORT graph optimizations off| on the same
            rows: the original's own fp32 reordering noise (None when not measured).
    """

    name: str
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    mean_rel: float = 0.0
    compared: int = 0
    skipped: int = 0
    passed: bool = True
    noise_abs: float | None = None


@dataclasses.dataclass
class LayerDensity:
    """Attention density of one ASA node over all iterations.

    Attributes:
        layer: index of the ASA node in graph order.
        node: its name.
        kept: total kept key blocks; visible: total visible key blocks times Hsel.
        density: kept / visible (1.0 = dense).
    """

    layer: int
    node: str
    kept: int
    visible: int
    density: float


@dataclasses.dataclass
class CheckResult:
    """Outcome of `check`: the verdict, per-output errors and density per layer.

    Attributes:
        passed: the verdict, decided by `rule`.
        atol, rtol: tolerances used (an element fails when it exceeds both).
        elementwise_passed: every output within atol/rtol on every iteration (Polygraphy).
        noise_floor: the original's own fp32 reordering noise, max over outputs (None when not
            measured); noise_factor: the multiple of it an output's max abs error may reach.
        rule: which rule decided a pass, RULE_ELEMENTWISE or RULE_NOISE ("" when failed).
        runner_notes: runners that could not be added, with why (e.g. no TensorRT).
        engine_outputs: per-output statistics of the TensorRT engine vs the original (empty
            when no engine ran).
        iterations: the input sizes used, as dicts (batch, seq, past, pad).
        outputs: per-output error statistics.
        density: per-layer density (empty when the model has no ASA node).
        density_error: why density could not be measured ("" when it was).
    """

    passed: bool
    atol: float
    rtol: float
    elementwise_passed: bool = False
    noise_floor: float | None = None
    noise_factor: float = NOISE_FACTOR
    rule: str = ""
    runner_notes: list[str] = dataclasses.field(default_factory=list)
    engine_outputs: list[OutputStats] = dataclasses.field(default_factory=list)
    iterations: list[dict] = dataclasses.field(default_factory=list)
    outputs: list[OutputStats] = dataclasses.field(default_factory=list)
    density: list[LayerDensity] = dataclasses.field(default_factory=list)
    density_error: str = ""

    @property
    def overall_density(self) -> float | None:
        visible = sum(layer.visible for layer in self.density)
        return sum(layer.kept for layer in self.density) / visible if visible else None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["overall_density"] = self.overall_density
        return data


def check(
    original: str | os.PathLike,
    rewritten: str | os.PathLike,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    batch: int | None = None,
    seq: int | None = None,
    past: int | None = None,
    seed: int = 0,
    iterations: list[dict] | None = None,
    feeds: list[dict[str, np.ndarray]] | None = None,
    density: bool = True,
    library: bool | str | None = None,
    noise: bool = True,
    engine: str | os.PathLike | None = None,
    plugin_library: str | os.PathLike | None = None,
    tensorrt: bool = True,
) -> CheckResult:
    """Compare `rewritten` with `original` in ONNX Runtime (CPU) through Polygraphy.

    Args:
        original: the model before the rewrite.
        rewritten: the model after the rewrite.
        atol, rtol: an element mismatches when its absolute error exceeds atol and its relative
            error (to the original) exceeds rtol.
        batch, seq, past: fix these input sizes (default: a built-in mix of sizes).
        seed: seed of the generated inputs.
        iterations: input sizes to generate, as dicts with keys batch, seq, past, pad
            (default: `iteration_configs` with batch / seq / past applied).
        feeds: use these input dicts instead of generated ones.
        density: also measure attention density per layer of the rewritten model.
        library: how the rewritten model's ASA nodes run: None = the native ONNX Runtime
            library when built, else the model-local function; False = always the function;
            True = the library (error when not built); a path = that library.
        noise: also run the original with ONNX Runtime's graph optimizations off and report its
            own reordering noise; a model that misses the element-wise bar then passes if every
            output's max abs error is within NOISE_FACTOR x that noise floor.
        engine: a TensorRT engine of `rewritten` to compare as well (needs TensorRT); None
            builds one (fp32) when TensorRT is installed.
        plugin_library: libasa_trt.so for the engine (default: the usual places).
        tensorrt: False skips the engine runner even where TensorRT is installed.

    Returns:
        A CheckResult.

    Raises:
        AsaExportError: a model cannot be loaded, the models' input or output names differ, or
            `engine` is given where TensorRT is not installed.
    """
    from asa_export import io

    original, rewritten = os.fspath(original), os.fspath(rewritten)
    original_model = io.load_model(original)
    rewritten_model = io.load_model(rewritten)
    _check_same_interface(original_model, rewritten_model)
    geometry = _mask_geometry(rewritten_model)
    if feeds is None:
        configs = iterations or iteration_configs(original_model, batch=batch, seq=seq, past=past)
        configs = [{"batch": 2, "seq": 16, "past": 0, "pad": None, **c} for c in configs]
        feeds = [_generate(original_model, config, seed + i) for i, config in enumerate(configs)]
    else:
        configs = [_config_of(feed, original_model) for feed in feeds]
    masks = [key_padding(feed, original_model) for feed in feeds]
    row_masks = [_visible_rows(m, c, geometry) for m, c in zip(masks, configs)]
    with tempfile.TemporaryDirectory(prefix="asa-check-") as tmp:
        engine_runner, note = (None, "")
        if tensorrt or engine is not None:
            engine_runner, note = _engine_runner(rewritten, feeds, engine, plugin_library, tmp)
        result = _compare(original, rewritten, feeds, configs, row_masks, atol, rtol, library,
                          noise, engine_runner)
    if note:
        result.runner_notes.append(note)
    if density:
        _measure_density(rewritten_model, feeds, result, library)
    return result


def iteration_configs(
    model: ir.Model, *, batch: int | None = None, seq: int | None = None, past: int | None = None
) -> list[dict]:
    """The input sizes `check` runs: a default mix, with any given size fixed.

    Returns:
        A list of dicts with keys batch, seq, past, pad.
    """
    rows = list(DEFAULT_ITERATIONS)
    if _has_past_inputs(model):
        rows.append(PAST_ITERATION)
    configs = []
    for b, s, p, pad in rows:
        config = {
            "batch": batch or b,
            "seq": seq or s,
            "past": p if past is None else past,
            "pad": pad,
        }
        if config not in configs:
            configs.append(config)
    return configs


# -- comparison ------------------------------------------------------------------------------


def _compare(original, rewritten, feeds, configs, row_masks, atol, rtol, library,
             noise, engine_runner=None) -> CheckResult:
    logger.info("running %d input set(s) through the models ...", len(feeds))
    with _quiet_polygraphy():
        from polygraphy.backend.onnxrt import OnnxrtRunner
        from polygraphy.comparator import Comparator

        # The rewritten model first: Polygraphy divides by the second runner's output.
        runners = [
            OnnxrtRunner(_rewritten_session(rewritten, library), name="rewritten"),
            OnnxrtRunner(_plain_session(original), name="original"),
        ]
        if noise:
            runners.append(OnnxrtRunner(_plain_session(original, optimize=False),
                                        name="original-unoptimized"))
        if engine_runner is not None:
            runners.append(engine_runner)
        results = _run_all(Comparator, runners, feeds)
        iterations = [iters for _, iters in results]
        stats = _mask_and_measure(iterations[0], iterations[1], iterations[2] if noise else None,
                                  configs, row_masks, atol)
        verdict = Comparator.compare_accuracy(results, comparisons=[(0, 1)],
                                              compare_func=_compare_func(atol, rtol))
        engine_stats, engine_verdict = {}, True
        if engine_runner is not None:
            engine_stats = _mask_and_measure(iterations[-1], iterations[1], None, configs,
                                             row_masks, atol)
            engine_verdict = Comparator.compare_accuracy(
                results, comparisons=[(len(runners) - 1, 1)], compare_func=_compare_func(atol, rtol))
            _apply_verdicts(engine_stats, engine_verdict)
    _apply_verdicts(stats, verdict)
    result = CheckResult(
        passed=False,
        atol=atol,
        rtol=rtol,
        elementwise_passed=bool(verdict) and bool(engine_verdict)
        and all(s.passed for s in [*stats.values(), *engine_stats.values()]),
        iterations=configs,
        outputs=list(stats.values()),
        engine_outputs=list(engine_stats.values()),
    )
    if noise:
        result.noise_floor = max((s.noise_abs or 0.0 for s in stats.values()), default=0.0)
    _decide(result)
    return result


def _run_all(comparator, runners, feeds):
    """Comparator.run; a runner that fails on the generated inputs is a user-facing error."""
    try:
        return comparator.run(runners, data_loader=feeds)
    except Exception as err:  # Polygraphy re-raises the runtime's own exception types
        raise AsaExportError(
            f"a model failed on the generated inputs ({type(err).__name__}: {err}). The input "
            "generator knows token ids, padding masks, positions and past KV; other integer "
            "inputs get small random values (e.g. GroupQueryAttention's seqlens_k / "
            "total_sequence_length as graph inputs): use the Python API's check(feeds=...)"
        ) from None


def _decide(result: CheckResult) -> None:
    """The verdict and the rule that decided it (see the module docstring)."""
    if result.elementwise_passed:
        result.passed, result.rule = True, RULE_ELEMENTWISE
        return
    bar = None if result.noise_floor is None else result.noise_factor * result.noise_floor
    judged = [*result.outputs, *result.engine_outputs]
    if bar and all(s.passed or s.max_abs <= bar for s in judged):
        result.passed, result.rule = True, RULE_NOISE
    else:
        result.passed, result.rule = False, ""


def _compare_func(atol: float, rtol: float):
    """Polygraphy's elementwise comparison (SimpleCompareFunc where it exists, else the old name)."""
    from polygraphy import comparator

    if hasattr(comparator, "SimpleCompareFunc"):
        return comparator.SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True)
    return comparator.CompareFunc.simple(atol=atol, rtol=rtol, check_shapes=True)


def _mask_and_measure(rewritten_iters, original_iters, noise_iters, configs, row_masks,
                      atol) -> dict[str, OutputStats]:
    """Zero rows without a visible key in both runners' outputs (in place); collect error
    statistics (candidate vs original) and the original's reordering noise (when given)."""
    noise_iters = noise_iters or [None] * len(original_iters)
    stats: dict[str, OutputStats] = {}
    sums: dict[str, list[float]] = {}
    for new, old, ref2, config, rows in zip(rewritten_iters, original_iters, noise_iters, configs,
                                            row_masks):
        for name in old.keys():
            if name not in new:
                continue
            keep = _element_mask(old[name].shape, rows, config)
            stat = stats.setdefault(name, OutputStats(name))
            total = sums.setdefault(name, [0.0, 0.0, 0])
            if ref2 is not None:
                stat.noise_abs = max(stat.noise_abs or 0.0, _max_abs(ref2[name], old[name], keep))
            if new[name].shape != old[name].shape:
                stat.passed = False
                stat.max_abs = float("inf")  # no noise floor excuses a shape mismatch
                continue
            a, b = _masked(new[name], keep), _masked(old[name], keep)
            new[name], old[name] = a, b
            _accumulate(stat, total, a, b, keep, atol)
    for name, stat in stats.items():
        if stat.compared:
            stat.mean_abs = sums[name][0] / stat.compared
        if sums[name][2]:
            stat.mean_rel = sums[name][1] / sums[name][2]
    return stats


def _accumulate(stat: OutputStats, total: list, a, b, keep, atol: float) -> None:
    """Add one iteration's errors of one output to its running statistics."""
    ref = b.astype(np.float64)
    diff = np.abs(a.astype(np.float64) - ref)
    if keep is not None:
        diff, ref = diff[keep], ref[keep]
        stat.skipped += int(keep.size - np.count_nonzero(keep))
    if diff.size == 0:
        return
    stat.compared += int(diff.size)
    if np.isnan(diff).any():  # NaN where the other side is finite (or both NaN) is an error
        stat.max_abs = stat.max_rel = float("inf")
        diff = np.nan_to_num(diff, nan=np.inf)
    stat.max_abs = max(stat.max_abs, float(diff.max()))
    total[0] += float(diff.sum())
    large = np.abs(ref) >= atol
    if large.any():
        rel = diff[large] / np.abs(ref[large])
        stat.max_rel = max(stat.max_rel, float(rel.max()))
        total[1] += float(rel.sum())
        total[2] += int(rel.size)


def _max_abs(a: np.ndarray, b: np.ndarray, keep: np.ndarray | None) -> float:
    """max |a - b| over the compared elements (NaN counts as infinite)."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if keep is not None:
        diff = diff[np.broadcast_to(keep, diff.shape)]
    if diff.size == 0:
        return 0.0
    return float(np.nan_to_num(diff, nan=np.inf).max())


def _apply_verdicts(stats: dict[str, OutputStats], verdict) -> None:
    """Copy Polygraphy's per-output verdicts into the statistics."""
    # Polygraphy 0.50+ returns a list of AccuracyResult (one per compare function), older ones
    # a single AccuracyResult: {runner pair: [per-iteration {output: result}]}.
    accuracy_results = [verdict] if hasattr(verdict, "values") else list(verdict)
    for accuracy in accuracy_results:
        for iteration_results in accuracy.values():
            for iteration in iteration_results:
                for name, output_result in iteration.items():
                    if name in stats and not bool(output_result):
                        stats[name].passed = False


def _masked(array: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    if keep is None:
        return array
    return np.where(keep, array, np.zeros((), dtype=array.dtype))


# -- which rows count ------------------------------------------------------------------------


def _mask_geometry(model: ir.Model) -> dict:
    """Causality and window of the ASA nodes: they decide which query rows see a key.

    Mixed models take the strictest (causal, smallest window): fewer rows are compared, never
    a row that the contract lets differ.
    """
    causal, window = False, -1
    for node in asa_nodes(model):
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        causal = causal or bool(attrs.get("causal", 0))
        w = int(attrs.get("window", -1))
        if w > 0:
            window = w if window < 0 else min(window, w)
    return {"causal": causal, "window": window}


def _visible_rows(keys: np.ndarray | None, config, geometry) -> np.ndarray | None:
    """[B, seq] bool: query rows with at least one visible key (None: every row).

    Args:
        keys: the [B, past + seq] key padding mask of the feed (nonzero = keep), or None.
        config: the feed's sizes (seq).
        geometry: causal and window of the ASA nodes (see _mask_geometry).
    """
    if keys is None:
        return None
    batch, total = keys.shape
    seq = min(config["seq"], total)
    past = total - seq
    if not geometry["causal"] and geometry["window"] < 0:
        return np.repeat(keys.any(axis=1, keepdims=True), seq, axis=1)
    rows = np.zeros((batch, seq), dtype=bool)
    for r in range(seq):
        p = r + past
        lo = 0 if geometry["window"] < 0 else max(0, p - geometry["window"] + 1)
        hi = p + 1 if geometry["causal"] else min(total, p + geometry["window"])
        rows[:, r] = keys[:, lo:hi].any(axis=1)
    return rows


def _element_mask(shape, rows: np.ndarray | None, config) -> np.ndarray | None:
    """Broadcastable bool mask of an output's elements that belong to compared rows.

    The batch is axis 0; the sequence axis is the one of length seq ([B, S, ...] outputs,
    [B, H, S, D] attention-shaped ones) or past + seq (present key/value caches, whose first
    `past` positions are inputs and always compared).
    """
    if rows is None or len(shape) < 2 or shape[0] != rows.shape[0]:
        return None
    seq, past = rows.shape[1], config.get("past", 0) or 0
    for length, offset in ((seq, 0), (seq + past, past)):
        axes = [axis for axis in range(1, len(shape)) if shape[axis] == length]
        if not axes:
            continue
        axis = 2 if (len(shape) == 4 and 2 in axes) else axes[0]
        positions = np.ones((rows.shape[0], length), dtype=bool)
        positions[:, offset:] = rows
        return np.broadcast_to(_expand(positions, axis, len(shape)), shape)
    return None


def _expand(positions: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """[B, L] -> rank-`rank` array with B on axis 0 and L on `axis`, ones elsewhere."""
    shape = [1] * rank
    shape[0], shape[axis] = positions.shape
    return positions.reshape(shape)


# -- density ---------------------------------------------------------------------------------


def _measure_density(model: ir.Model, feeds, result: CheckResult, library) -> None:
    nodes = asa_nodes(model)
    if not nodes:
        result.density_error = "the rewritten model has no AdaptiveSparseAttention node"
        return
    logger.info("measuring attention density of %d ASA node(s) ...", len(nodes))
    try:
        telemetry = _add_telemetry_outputs(model, nodes)
        with tempfile.TemporaryDirectory(prefix="asa-density-") as tmp:
            from asa_export import io

            path = os.path.join(tmp, "density.onnx")
            io.save_model(model, path)
            session = _rewritten_session(path, library, quiet=True)
            totals = {name: [0, 0] for name, _, _ in telemetry}
            wanted = [value for _, counts, visible in telemetry for value in (counts, visible)]
            for feed in feeds:
                outputs = dict(zip(wanted, session.run(wanted, feed)))
                for name, counts, visible in telemetry:
                    kept = outputs[counts]
                    totals[name][0] += int(kept.sum())
                    totals[name][1] += int(outputs[visible].sum()) * int(kept.shape[1])
    except Exception as err:  # density is a report: a failure here must not hide the parity
        result.density_error = f"{type(err).__name__}: {err}"
        logger.warning("could not measure density: %s", result.density_error)
        return
    for layer, (name, _, _) in enumerate(telemetry):
        kept, visible = totals[name]
        result.density.append(
            LayerDensity(layer, name, kept, visible, kept / visible if visible else float("nan"))
        )


def _add_telemetry_outputs(model: ir.Model, nodes) -> list[tuple[str, str, str]]:
    """Replace each ASA node by one that also emits block_counts and visible_counts.

    Each replacement calls the 4-output overload of the model-local function (added here), so
    the copy still runs in plain ONNX Runtime.

    Returns:
        (node name, block_counts output, visible_counts output) per node, in graph order.
    """
    telemetry = []
    for index, node in enumerate(nodes):
        name = node.name or f"asa_{index}"
        replacement = _four_output_node(model, node, name)
        counts, visible = replacement.outputs[2], replacement.outputs[3]
        counts.name, visible.name = f"{name}__block_counts", f"{name}__visible_counts"
        # Named free dimensions: ONNX Runtime warns about every run of an output whose declared
        # shape it cannot match (unnamed dims inferred by the custom op's shape function).
        counts.shape = ir.Shape([f"{name}_B", f"{name}_Hsel", f"{name}_NQ"])
        visible.shape = ir.Shape([f"{name}_B", f"{name}_NQ"])
        for value in (counts, visible):
            value.type = ir.TensorType(ir.DataType.INT32)
            model.graph.outputs.append(value)
        telemetry.append((name, counts.name, visible.name))
    return telemetry


def _four_output_node(model: ir.Model, node: ir.Node, name: str) -> ir.Node:
    from asa_export.contract import AsaAttributes
    from asa_export.contract.function import build_function, function_overload

    graph = model.graph
    values = {key: attr.value for key, attr in node.attributes.items()}
    attrs = AsaAttributes.from_onnx_attributes(values)
    optional = list(node.inputs[3:]) + [None] * (len(contract.INPUTS) - len(node.inputs))
    present = tuple(value is not None for value in optional)
    opset = model.opset_imports.get("", 18)
    dtype = int(node.inputs[0].dtype) if opset < 15 and node.inputs[0].dtype else None
    overload = function_overload(attrs, present, len(contract.OUTPUTS), dtype)
    if (contract.DOMAIN, contract.OP_TYPE, overload) not in model.functions:
        proto = build_function(attrs, opset, present, len(contract.OUTPUTS), dtype)
        function = ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
    replacement = ir.Node(
        node.domain,
        node.op_type,
        inputs=list(node.inputs),
        attributes=list(node.attributes.values()),
        overload=overload,
        num_outputs=len(contract.OUTPUTS),
        name=name,
    )
    old_out = node.outputs[0]
    graph.insert_before(node, replacement)
    for i, out in enumerate(graph.outputs):
        if out is old_out:
            graph.outputs[i] = replacement.outputs[0]
    ir.convenience.replace_all_uses_with(old_out, replacement.outputs[0])
    out_name, out_type, out_shape = old_out.name, old_out.type, old_out.shape
    graph.remove(node, safe=True)
    replacement.outputs[0].name = out_name
    replacement.outputs[0].type, replacement.outputs[0].shape = out_type, out_shape
    return replacement


# -- sessions and inputs ---------------------------------------------------------------------


def _plain_session(path: str, optimize: bool = True):
    """A CPU session; optimize=False turns ONNX Runtime's graph optimizations off (the same
    model summed in another fp32 order: its outputs differ by the model's reordering noise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise AsaExportError(f"ONNX Runtime cannot load {path}: {err}") from err


def _rewritten_session(path: str, library=None, quiet: bool = False):
    """A session that runs ASA nodes natively (library) or through their model-local function.

    Args:
        quiet: ONNX Runtime logs errors only (the density copy: the library's shape function
            leaves telemetry dims unknown, and ORT warns about that on every run).
    """
    try:
        from asa_export.runtime import ort as asa_ort
    except ImportError:
        return _plain_session(path)
    import onnxruntime as ort

    options = ort.SessionOptions()
    if quiet:
        options.log_severity_level = 3
    try:
        return asa_ort.session(path, providers=["CPUExecutionProvider"], library=library,
                               sess_options=options)
    except AsaExportError as err:
        if library is None:  # the library was picked automatically: say how to do without it
            raise AsaExportError(
                f"{err}\n(to run the ASA nodes through their model-local function instead, pass "
                "library=False; on the command line: --runtime function)"
            ) from err
        raise
    except Exception as err:
        raise AsaExportError(f"ONNX Runtime cannot load {path}: {err}") from err


def _engine_runner(rewritten: str, feeds, engine, plugin_library, tmp: str):
    """(Polygraphy TrtRunner or None, note): the engine as a runner, or why it is skipped.

    The runner holds the TensorRT runtime (it must outlive the engine).
    """
    from asa_export.runtime import tensorrt as art

    try:
        art.import_tensorrt("tensorrt")
    except AsaExportError:
        if engine is not None:
            raise
        return None, ("TensorRT not installed: engine runner skipped (to compare an engine too: "
                      f"{art.INSTALL_HINT['tensorrt']})")
    from polygraphy.backend.trt import TrtRunner

    if engine is None:  # fp32, so the engine is judged by the same tolerances as ONNX Runtime
        engine = os.path.join(tmp, "check.plan")
        low, high = _shape_range(feeds)
        logger.info("building a TensorRT engine of %s for the comparison ...", rewritten)
        art.build_engine(rewritten, engine, precision="fp32", min_shapes=low, opt_shapes=high,
                         max_shapes=high, plugin_library=plugin_library)
    runtime, trt_engine = art.load_engine(engine, plugin_library=plugin_library)
    runner = TrtRunner(trt_engine, name="engine")
    runner.asa_runtime = runtime
    return runner, ""


def _shape_range(feeds) -> tuple[dict, dict]:
    """Per input, the element-wise min and max shape over the feeds (the engine's profile)."""
    low, high = {}, {}
    for feed in feeds:
        for name, array in feed.items():
            shape = tuple(array.shape)
            low[name] = tuple(map(min, low.get(name, shape), shape))
            high[name] = tuple(map(max, high.get(name, shape), shape))
    return low, high


def _generate(model: ir.Model, config: dict, seed: int) -> dict[str, np.ndarray]:
    return generate_feeds(
        model,
        batch=config["batch"],
        seq=config["seq"],
        past=config["past"],
        pad=config["pad"],
        seed=seed,
    )


def _config_of(feed: dict[str, np.ndarray], model: ir.Model) -> dict:
    """Sizes of a user-given feed: batch and length from its padding mask or first input."""
    mask = key_padding(feed, model)
    sample = mask if mask is not None else next(iter(feed.values()))
    batch = int(sample.shape[0]) if sample.ndim else 1
    seq = int(sample.shape[1]) if sample.ndim > 1 else 1
    return {"batch": batch, "seq": seq, "past": 0, "pad": "given"}


def _has_past_inputs(model: ir.Model) -> bool:
    return any(role.role == "past" for role in input_roles(model))


def _check_same_interface(original: ir.Model, rewritten: ir.Model) -> None:
    """A rewrite keeps the graph's input and output names; anything else is another model."""
    for kind in ("inputs", "outputs"):
        names = [v.name for v in getattr(original.graph, kind)]
        new_names = [v.name for v in getattr(rewritten.graph, kind)]
        if sorted(names) != sorted(new_names):
            raise AsaExportError(
                f"the models have different {kind}: original {names}, rewritten {new_names}; "
                "is the second model a rewrite of the first?"
            )


@contextlib.contextmanager
def _quiet_polygraphy():
    """Polygraphy logs to stdout: keep stdout for our tables; our tables report its verdicts."""
    with contextlib.redirect_stdout(sys.stderr):
        from polygraphy.logger import G_LOGGER

        old = G_LOGGER.module_severity
        G_LOGGER.module_severity = G_LOGGER.CRITICAL
        try:
            yield
        finally:
            G_LOGGER.module_severity = old
