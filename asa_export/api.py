"""The public Python API; the `asa-export` CLI only composes these functions.

    export(model.onnx, model.asa.onnx)   load -> rewrite every attention site -> save atomically
    inspect(model.onnx)                  load -> match only (nothing written)
    check(original, rewritten)           Polygraphy comparison + attention density per layer

Progress goes to the `asa_export` logger (the CLI prints it on stderr).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time

from asa_export.contract import AsaAttributes
from asa_export.errors import AsaExportError
from asa_export.passes.pipeline import RewriteOptions, find_sites, rewrite_model
from asa_export.passes.rewrite import asa_nodes
from asa_export.report import Report
from asa_export.runtime import tensorrt as trt_runtime

logger = logging.getLogger("asa_export")

ENGINE_SUFFIXES = (".plan", ".engine")


def export(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: RewriteOptions = RewriteOptions(),
    *,
    report_path: str | os.PathLike | None = None,
    engine: EngineOptions | None = None,
) -> Report:
    """Rewrite every attention site of a model into an ASA node and write the result.

    An output ending in `.plan` / `.engine` is a TensorRT engine: the rewritten model goes to a
    temporary folder and asa_export.runtime.tensorrt.build_engine builds the engine from it.

    Nothing is written unless the whole rewrite succeeds; the input is never modified.

    Args:
        input_path: the ONNX model (external data beside it is followed).
        output_path: the rewritten model, e.g. `model.asa.onnx` (external data is written to
            `<output>.data` when the model is large or the input used external data).
        options: router settings written into every ASA node.
        report_path: where to write the JSON report (optional).
        engine: TensorRT build settings for an engine output (defaults: EngineOptions()).

    Returns:
        The Report: rewritten sites, per-rule counts and regions left unchanged with reasons.

    Raises:
        AsaExportError: bad input or output path, invalid options, TensorRT missing for an
            engine output, or a model without any attention site (an already rewritten model
            is accepted for an engine output and built as it is).
    """
    from asa_export import io

    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    building_engine = output_path.lower().endswith(ENGINE_SUFFIXES)
    if building_engine:  # fail fast, before minutes of rewriting, when TensorRT is missing
        engine = engine or EngineOptions()
        trt_runtime.import_tensorrt(engine.backend)
        trt_runtime.plugin_library_path(engine.plugin_library)
    validate_options(options)
    # Refuse bad outputs before spending minutes on a large model.
    io.check_output_path(output_path, inputs=[os.path.abspath(input_path)])
    if report_path is not None:
        io.check_output_path(report_path, inputs=[os.path.abspath(input_path)])
        if os.path.abspath(report_path) == os.path.abspath(output_path):
            raise AsaExportError("the report path and the output path are the same file")

    model = _timed(f"loading {input_path}", io.load_model, input_path)
    # Now the input's external data files are known: none of them may be overwritten either.
    io.check_output_path(output_path, inputs=io.model_files(model))
    report = _timed("matching and rewriting attention", rewrite_model, model, options)
    report.model = os.fspath(input_path)
    report.options = options.summary()  # JSON-ready: thresholds/gates may be numpy arrays
    existing = len(asa_nodes(model)) if not report.sites else 0
    if not report.sites and not (existing and building_engine):
        raise AsaExportError(no_site_message(input_path, report, existing))
    if existing:
        # A rewritten or calibrated model: its nodes carry their own router settings (per-head
        # thresholds, gate weights); the engine is built from them unchanged.
        logger.info("%s already holds %d ASA node(s): building the engine from them as they are "
                    "(router options given here are not applied)", input_path, existing)
        report.options = {}
    else:
        counts = ", ".join(f"{rule}: {n}" for rule, n in sorted(report.counts_per_rule().items()))
        logger.info("rewrote %d attention site(s) (%s)", len(report.sites), counts)
    report.output = os.path.abspath(output_path)
    if building_engine:
        _build_engine(model, output_path, engine)
    else:
        _timed(f"writing {output_path}", io.save_model, model, output_path)
    if report_path is not None:
        io.write_text_atomic(report_path, report.to_json() + "\n")
        logger.info("wrote the report to %s", report_path)
    return report


def inspect(path: str | os.PathLike) -> Report:
    """Match every attention site of a model without changing or writing anything.

    Args:
        path: the ONNX model.

    Returns:
        The Report: sites that would be rewritten and regions that would not, with reasons.

    Raises:
        AsaExportError: the file cannot be loaded as an ONNX model.
    """
    from asa_export import io

    model = _timed(f"loading {path}", io.load_model, path)
    report = _timed("matching attention", find_sites, model)
    report.model = os.fspath(path)
    return report


def check(original: str | os.PathLike, rewritten: str | os.PathLike, **options):
    """Compare a rewritten model with its original (see asa_export.check.check).

    Args:
        original: the model before the rewrite.
        rewritten: the model after the rewrite.
        **options: tolerances and input sizes (atol, rtol, batch, seq, ...).

    Returns:
        An asa_export.check.CheckResult (`passed`, per-output statistics, density per layer).
    """
    from asa_export import check as check_module

    return check_module.check(original, rewritten, **options)


def validate_options(options: RewriteOptions) -> None:
    """Raise AsaExportError when the router settings break the contract.

    Raises:
        AsaExportError: with every problem found, in one message.
    """
    try:
        AsaAttributes(
            block_size=options.block_size,
            threshold=options.threshold,
            sink_blocks=options.sink_blocks,
            local_blocks=options.local_blocks,
            select_per=options.select_per,
        )
    except ValueError as err:
        raise AsaExportError(f"invalid options: {err}") from err


def no_site_message(path: str | os.PathLike, report: Report, existing: int = 0) -> str:
    """The error text for a model in which nothing was rewritten, with every rejection.

    Args:
        path: the input model.
        report: its (empty) rewrite report.
        existing: how many ASA nodes the model already holds.
    """
    if existing:
        return (f"{path} is already rewritten: it holds {existing} AdaptiveSparseAttention "
                "node(s) and no other attention; nothing was written. Build an engine from it "
                "with --out engine.plan, or rewrite the original model to change router settings")
    lines = [f"no attention site found in {path}; nothing was written"]
    if report.rejected:
        lines.append("regions that looked like attention but were left unchanged:")
        lines += [f"  {r.anchor} ({r.rule}): {r.reason}" for r in report.rejected]
    else:
        lines.append("(no Softmax-based attention, Attention, MultiHeadAttention or "
                     "GroupQueryAttention node in the graph)")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """TensorRT settings for `export(..., output_path="engine.plan")`.

    Args:
        precision: "fp16", "bf16" or "fp32" (the ONNX graph is converted before the build).
        min_shapes, opt_shapes, max_shapes: explicit optimization profile, "name:1x128,..." text.
        max_seq: largest sequence length of the default profile (dynamic dims).
        max_batch: largest batch of the default profile.
        plugin_library: libasa_trt.so (default: $ASA_TRT_PLUGIN or the build folder).
        backend: "tensorrt" or "tensorrt-rtx".
        target: ahead-of-time compute capability for TensorRT-RTX, e.g. "SM89".
    """

    precision: str = "fp16"
    min_shapes: str | None = None
    opt_shapes: str | None = None
    max_shapes: str | None = None
    max_seq: int | None = None
    max_batch: int = 1
    plugin_library: str | None = None
    backend: str = "tensorrt"
    target: str | None = None


def _build_engine(model, output_path: str, engine: EngineOptions) -> None:
    """Save the rewritten model to a temporary folder and build the engine from it."""
    from asa_export import io

    shapes = {name: trt_runtime.parse_shapes(text) if text else None
              for name, text in (("min_shapes", engine.min_shapes),
                                 ("opt_shapes", engine.opt_shapes),
                                 ("max_shapes", engine.max_shapes))}
    with tempfile.TemporaryDirectory(prefix="asa_export_") as tmp:
        onnx_path = os.path.join(tmp, "model.asa.onnx")
        _timed("writing the rewritten model", io.save_model, model, onnx_path)
        _timed(
            f"building {output_path}",
            lambda: trt_runtime.build_engine(
                onnx_path, output_path, precision=engine.precision, max_seq=engine.max_seq,
                max_batch=engine.max_batch, plugin_library=engine.plugin_library,
                progress=lambda message: logger.info("%s", message), backend=engine.backend,
                target=engine.target, **shapes,
            ),
        )


def _timed(what: str, func, *args):
    logger.info("%s ...", what)
    start = time.perf_counter()
    result = func(*args)
    logger.info("%s: done in %.1f s", what, time.perf_counter() - start)
    return result
