"""`asa-export`: the command line over asa_export.api (the library never imports this package).

    asa-export MODEL --out OUT [options]      (alias: asa-export export MODEL --out OUT)
    asa-export inspect MODEL
    asa-export calibrate MODEL --text FILE... --tokenizer PATH --out OUT
    asa-export check ORIGINAL REWRITTEN
    asa-export demo [--workdir DIR]

An AsaExportError becomes its message on stderr and exit status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from asa_export import __version__
from asa_export.cli import calibrate, check, demo, export, inspect
from asa_export.errors import AsaExportError

SUBCOMMANDS = {"export": export, "inspect": inspect, "calibrate": calibrate, "check": check,
               "demo": demo}


def main(argv: list[str] | None = None) -> int:
    """Run `asa-export` with `argv` (default: sys.argv[1:]).

    Returns:
        The exit status: 0 success, 1 user error or failed check, 2 bad command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # The bare form `asa-export MODEL --out OUT` is the export subcommand without its name.
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "export")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(args.quiet)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except AsaExportError as err:
        print(f"asa-export: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("asa-export: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The full parser: one subparser per subcommand module."""
    parser = argparse.ArgumentParser(
        prog="asa-export",
        description="Rewrite the attention of ONNX transformer exports into "
        "AdaptiveSparseAttention nodes, inspect attention sites, and check parity.",
        epilog="Without a subcommand, `asa-export MODEL --out OUT` runs `export`.",
    )
    parser.add_argument("--version", action="version", version=f"asa-export {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, module in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
        module.add_arguments(sub)
    return parser


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("asa-export: %(message)s"))
    root = logging.getLogger("asa_export")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    # Library warnings (e.g. "ASA library not built, using the function") as one plain line.
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"asa-export: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
