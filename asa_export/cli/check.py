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
    group.add_argument("--runtime", choices=("auto", "function", "library"), default="auto",
                       help="how ASA nodes run in ONNX Runtime: the native library when built "
                       "(auto), the model-local function, or the library (error when missing)")


def check_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of api.check from parsed arguments."""
    return {
        "atol": args.atol, "rtol": args.rtol, "batch": args.batch, "seq": args.seq,
        "past": args.past, "seed": args.seed, "density": not args.no_density,
        "library": {"auto": None, "function": False, "library": True}[args.runtime],
    }


def run(args: argparse.Namespace) -> int:
    """Print the error and density tables; exit 1 when an output mismatches."""
    result = api.check(args.original, args.rewritten, **check_kwargs(args))
    print(tables.check_tables(result))
    return 0 if result.passed else 1
