"""`asa-export demo`: the main job on the built-in default model, end to end.

    graphs.default_model (small Llama-architecture model, random weights, exported locally)
      -> export with the default router settings -> sites table
      -> check against the original: error statistics and attention density per layer
         (default sizes plus one 1024-token input, long enough for the router to drop blocks)
      -> export again at threshold 1.0 (exactly dense) -> check parity within atol/rtol

The exit status is the dense parity verdict: at threshold < 1 the rewritten model computes
block-sparse attention by design, so its errors are reported, not judged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from asa_export import api
from asa_export.cli import tables
from asa_export.cli.check import add_check_arguments, check_kwargs
from asa_export.cli.check import report as check_report
from asa_export.cli.export import add_router_arguments, options_from
from asa_export.errors import AsaExportError

SPARSE_SEQ = 1024
HELP = "build the default small Llama-architecture model, rewrite it, inspect and check it"
logger = logging.getLogger("asa_export.demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `demo`: a work directory, the router settings and the check settings."""
    parser.add_argument("--workdir", default="asa-demo", metavar="DIR",
                        help="where the models and report.json go (default ./%(default)s)")
    add_router_arguments(parser)
    add_check_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the demo; print the tables and where the report is."""
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    original = _default_model(workdir)
    options = options_from(args)
    sparse_out = os.path.join(workdir, "model.asa.onnx")
    report = api.export(original, sparse_out, options)
    print(tables.report_table(report))
    print(f"\n== check: threshold {options.threshold} against the original "
          "(block-sparse by design: errors reported, not judged)")
    sparse = api.check(original, sparse_out, **_sparse_check_kwargs(args))
    print(tables.check_tables(sparse))
    dense_out = os.path.join(workdir, "model.dense.asa.onnx")
    api.export(original, dense_out, dataclasses.replace(options, threshold=1.0))
    print("\n== check: threshold 1.0 (exactly dense) against the original: parity")
    dense = api.check(original, dense_out, **check_kwargs(args))
    print(check_report(dense))
    report_path = os.path.join(workdir, "report.json")
    _write_report(report_path, report, sparse, dense)
    print(f"\nmodels and report in {workdir} (report: {report_path})")
    return 0 if dense.passed else 1


def _sparse_check_kwargs(args: argparse.Namespace) -> dict:
    """The check's sizes, plus one long input: with 64-key blocks, lengths up to 128 keep every
    block (sink + local), so only a longer context shows what the router drops."""
    kwargs = check_kwargs(args)
    if args.batch is None and args.seq is None and args.past is None:
        kwargs["iterations"] = [
            {"batch": 2, "seq": 37, "pad": "left"},
            {"batch": 2, "seq": 150, "pad": "right"},
            {"batch": 1, "seq": SPARSE_SEQ, "pad": None},
        ]
    return kwargs


def _default_model(workdir: str) -> str:
    try:
        import graphs
    except ImportError as err:
        raise AsaExportError(
            f"the demo needs the `graphs` package of this repository ({err}); "
            "install with `pip install -e '.[models]'`"
        ) from err
    logger.info("building the default model in %s ...", workdir)
    try:
        return os.fspath(graphs.default_model(workdir))
    except ImportError as err:
        raise AsaExportError(
            f"building the default model needs torch and transformers ({err}); install with "
            "`pip install torch==2.13.0 -e '.[models]'`"
        ) from err


def _write_report(path: str, report, sparse, dense) -> None:
    from asa_export import io

    data = {"export": report.to_dict(), "check": sparse.to_dict(), "dense_check": dense.to_dict()}
    io.write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
