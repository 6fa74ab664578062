"""`asa-export check ORIGINAL REWRITTEN`: Polygraphy parity and attention density per layer."""

from __future__ import annotations

import argparse

from asa_export import api
from asa_export.check import DEFAULT_ATOL, DEFAULT_RTOL
from asa_export.cli import tables

HELP = "compare a rewritten model with its original in ONNX Runtime (exit 1 on mismatch)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `check` (each maps to an asa_export.check.check argument)."""
    parser.add_argument("original", metavar="ORIGINAL", help="the model before the rewrite")
    parser.add_argument("rewritten", metavar="REWRITTEN", help="the model after the rewrite")
    add_check_arguments(parser)
    group = parser.add_argument_group("TensorRT engine runner (where TensorRT is installed)")
    group.add_argument("--engine", metavar="PLAN",
                       help="a TensorRT engine of REWRITTEN to compare as well (default: build "
                       "one in fp32 when TensorRT is installed)")
    group.add_argument("--plugin-library", metavar="PATH",
                       help="libasa_trt.so (default: $ASA_TRT_PLUGIN or the build folder)")
    group.add_argument("--no-engine", action="store_true",
                       help="skip the engine runner even where TensorRT is installed")


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """Tolerances and input sizes, shared with `demo`."""
    group = parser.add_argument_group("comparison")
    group.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                       help="absolute tolerance (default %(default)s)")
    group.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                       help="relative tolerance; an element fails when it exceeds both "
                       "(default %(default)s)")
    group.add_argument("--batch", type=int, help="batch size of every input set")
    group.add_argument("--seq", type=int, help="sequence length of every input set")
    group.add_argument("--past", type=int, help="past KV length (models with a KV cache)")
    group.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    group.add_argument("--no-density", action="store_true",
                       help="skip the attention density measurement")
    group.add_argument("--no-noise", action="store_true",
                       help="skip the original's reordering-noise run (ONNX Runtime graph "
                       "optimizations off); the verdict is then element-wise only")
    group.add_argument("--runtime", choices=("auto", "function", "library"), default="auto",
                       help="how ASA nodes run in ONNX Runtime: the native library when built "
                       "(auto), the model-local function, or the library (error when missing)")


def check_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of api.check from parsed arguments."""
    return {
        "atol": args.atol, "rtol": args.rtol, "batch": args.batch, "seq": args.seq,
        "past": args.past, "seed": args.seed, "density": not args.no_density,
        "noise": not getattr(args, "no_noise", False),
        # check only (demo shares the other arguments): the engine runner
        "engine": getattr(args, "engine", None),
        "plugin_library": getattr(args, "plugin_library", None),
        "tensorrt": not getattr(args, "no_engine", False) and hasattr(args, "engine"),
        "library": {"auto": None, "function": False, "library": True}[args.runtime],
    }


def run(args: argparse.Namespace) -> int:
    """Print the error, noise and density tables and the verdict; exit 1 when it fails."""
    result = api.check(args.original, args.rewritten, **check_kwargs(args))
    print(report(result))
    return 0 if result.passed else 1


def report(result) -> str:
    """The check tables, the original's reordering noise, and the verdict with its rule.

    Args:
        result: an asa_export.check.CheckResult.

    Returns:
        Text for stdout; its last line starts with PASSED or FAILED.
    """
    # check_tables' last line is the bare verdict; ours names the rule that decided it.
    body = tables.check_tables(result).rpartition("\n")[0].rstrip("\n")
    parts = [body] + [f"\n{note}" for note in result.runner_notes]
    if result.engine_outputs:
        parts.append("\nTensorRT engine vs original (same rows):")
        parts.append(tables.table(
            ["output", "max abs", "mean abs", "max rel", "result"],
            [[o.name, f"{o.max_abs:.3g}", f"{o.mean_abs:.3g}", f"{o.max_rel:.3g}",
              "ok" if o.passed else "MISMATCH"] for o in result.engine_outputs]))
    if result.noise_floor is not None:
        parts.append(noise_table(result))
    parts.append("\n" + verdict_line(result))
    return "\n".join(parts)


def noise_table(result) -> str:
    """Per output: the rewrite's max abs error next to the original's own reordering noise."""
    rows = []
    for o in result.outputs:
        ratio = o.max_abs / o.noise_abs if o.noise_abs else None
        rows.append([o.name, f"{o.max_abs:.3g}", f"{o.noise_abs or 0.0:.3g}",
                     "-" if ratio is None else f"{ratio:.2f}"])
    head = ("\nreordering noise of the original (ONNX Runtime graph optimizations on vs off, "
            "same inputs, same rows):")
    floor = (f"noise floor {result.noise_floor:.3g} (max over outputs); noise bar "
             f"{result.noise_factor:g} x floor = {result.noise_factor * result.noise_floor:.3g}")
    return "\n".join([head, tables.table(["output", "max abs error", "noise", "error/noise"],
                                          rows), floor])


def verdict_line(result) -> str:
    """PASSED / FAILED and the rule that decided it."""
    bar = f"atol {result.atol:g} / rtol {result.rtol:g}"
    if result.passed and result.rule == "element-wise":
        return f"PASSED (rule: element-wise, every output within {bar})"
    if result.passed:
        return (f"PASSED (rule: noise floor, outputs beyond {bar} have max abs error <= "
                f"{result.noise_factor:g} x the original's own reordering noise "
                f"{result.noise_floor:.3g}; not element-wise)")
    if result.noise_floor is None:
        return f"FAILED: outputs differ beyond {bar} (noise floor not measured)"
    return (f"FAILED: outputs differ beyond {bar} and beyond {result.noise_factor:g} x the "
            f"original's own reordering noise {result.noise_floor:.3g}")
