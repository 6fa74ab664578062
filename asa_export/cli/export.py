"""`asa-export [export] MODEL --out OUT`: rewrite every attention site into an ASA node."""

from __future__ import annotations

import argparse

from asa_export import api
from asa_export.cli import tables
from asa_export.passes.pipeline import RewriteOptions

HELP = "rewrite every attention site of MODEL into an AdaptiveSparseAttention node"
_DEFAULTS = RewriteOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `export` (each maps to an api.export / RewriteOptions argument)."""
    parser.add_argument("model", metavar="MODEL", help="the ONNX model to rewrite")
    parser.add_argument(
        "--out", "-o", required=True, metavar="OUT",
        help="the rewritten model, e.g. model.asa.onnx (external data goes to OUT.data when "
        "the model is large or the input used external data)",
    )
    add_router_arguments(parser)
    parser.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    add_engine_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """TensorRT settings (api.EngineOptions), used when OUT ends in .plan or .engine."""
    defaults = api.EngineOptions()
    group = parser.add_argument_group("TensorRT engine (OUT ending in .plan / .engine)")
    group.add_argument("--precision", default=defaults.precision, choices=("fp16", "bf16", "fp32"),
                       help="engine precision; the graph is converted first (default %(default)s)")
    group.add_argument("--max-seq", type=int, metavar="N",
                       help="largest sequence length of the default optimization profile")
    group.add_argument("--max-batch", type=int, default=defaults.max_batch, metavar="N",
                       help="largest batch of the default optimization profile (default %(default)s)")
    for which in ("min", "opt", "max"):
        group.add_argument(f"--{which}-shapes", metavar="NAME:DIMS,...",
                           help=f"explicit {which} shapes of the profile, e.g. input_ids:1x128")
    group.add_argument("--plugin-library", metavar="PATH",
                       help="libasa_trt.so (default: $ASA_TRT_PLUGIN or the build folder)")
    group.add_argument("--backend", default=defaults.backend, choices=("tensorrt", "tensorrt-rtx"),
                       help="TensorRT or TensorRT-RTX (default %(default)s)")
    group.add_argument("--target", metavar="SMxx",
                       help="ahead-of-time target for TensorRT-RTX, e.g. SM89")


def engine_options_from(args: argparse.Namespace) -> api.EngineOptions:
    """api.EngineOptions from parsed engine arguments."""
    return api.EngineOptions(
        precision=args.precision, min_shapes=args.min_shapes, opt_shapes=args.opt_shapes,
        max_shapes=args.max_shapes, max_seq=args.max_seq, max_batch=args.max_batch,
        plugin_library=args.plugin_library, backend=args.backend, target=args.target,
    )


def add_router_arguments(parser: argparse.ArgumentParser,
                         title: str = "router settings (written into every ASA node)",
                         threshold: bool = True) -> None:
    """The router settings (RewriteOptions), shared with `demo` and `calibrate`.

    Args:
        parser: the subcommand's parser.
        title: the argument group's title.
        threshold: add --threshold (calibrate has its own, with another meaning).
    """
    group = parser.add_argument_group(title)
    group.add_argument("--block-size", type=int, default=_DEFAULTS.block_size, choices=(64, 128),
                       help="router block size b (default %(default)s)")
    if threshold:
        group.add_argument("--threshold", type=float, default=_DEFAULTS.threshold, metavar="TAU",
                           help="cumulative threshold tau; 1.0 = exactly dense (default %(default)s)")
    group.add_argument("--sink-blocks", type=int, default=_DEFAULTS.sink_blocks, metavar="N",
                       help="leading key blocks always kept (default %(default)s)")
    group.add_argument("--local-blocks", type=int, default=_DEFAULTS.local_blocks, metavar="N",
                       help="local band of key blocks always kept (default %(default)s)")
    group.add_argument("--select-per", default="head", choices=("head", "group"),
                       help="one block list per query head or per KV group (default %(default)s)")


def options_from(args: argparse.Namespace, threshold: bool = True) -> RewriteOptions:
    """RewriteOptions from parsed router arguments (`threshold`: as in add_router_arguments;
    without it the default tau is kept)."""
    return RewriteOptions(
        block_size=args.block_size,
        threshold=args.threshold if threshold else _DEFAULTS.threshold,
        sink_blocks=args.sink_blocks,
        local_blocks=args.local_blocks,
        select_per=0 if args.select_per == "head" else 1,
    )


def run(args: argparse.Namespace) -> int:
    """Export, then print the sites table on stdout."""
    report = api.export(args.model, args.out, options_from(args), report_path=args.report,
                        engine=engine_options_from(args))
    print(tables.report_table(report))
    print(f"\nwrote {report.output}")
    return 0
