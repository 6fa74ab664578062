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


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    """The router settings (RewriteOptions), shared with `demo`."""
    group = parser.add_argument_group("router settings (written into every ASA node)")
    group.add_argument("--block-size", type=int, default=_DEFAULTS.block_size, choices=(64, 128),
                       help="router block size b (default %(default)s)")
    group.add_argument("--threshold", type=float, default=_DEFAULTS.threshold, metavar="TAU",
                       help="cumulative threshold tau; 1.0 = exactly dense (default %(default)s)")
    group.add_argument("--sink-blocks", type=int, default=_DEFAULTS.sink_blocks, metavar="N",
                       help="leading key blocks always kept (default %(default)s)")
    group.add_argument("--local-blocks", type=int, default=_DEFAULTS.local_blocks, metavar="N",
                       help="local band of key blocks always kept (default %(default)s)")
    group.add_argument("--select-per", default="head", choices=("head", "group"),
                       help="one block list per query head or per KV group (default %(default)s)")


def options_from(args: argparse.Namespace) -> RewriteOptions:
    """RewriteOptions from parsed router arguments."""
    return RewriteOptions(
        block_size=args.block_size,
        threshold=args.threshold,
        sink_blocks=args.sink_blocks,
        local_blocks=args.local_blocks,
        select_per=0 if args.select_per == "head" else 1,
    )


def run(args: argparse.Namespace) -> int:
    """Export, then print the sites table on stdout."""
    report = api.export(args.model, args.out, options_from(args), report_path=args.report)
    print(tables.report_table(report))
    print(f"\nwrote {report.output}")
    return 0
