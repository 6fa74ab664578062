"""`asa-export inspect MODEL`: every attention site, and every region left unchanged with why."""

from __future__ import annotations

import argparse

from asa_export import api
from asa_export.cli import tables

HELP = "list the attention sites of MODEL and the regions that would not be rewritten"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `inspect`."""
    parser.add_argument("model", metavar="MODEL", help="the ONNX model to inspect")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead")


def run(args: argparse.Namespace) -> int:
    """Print the tables (or JSON); exit 0 even when nothing matched (that is an answer)."""
    report = api.inspect(args.model)
    print(report.to_json() if args.json else tables.report_table(report))
    return 0
