"""`python -m graphs --family llama --exporter dynamo --out x.onnx`: export one test model.

`--list` prints the variants that export here and the refused ones with their reasons.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from asa_export.errors import AsaExportError


def _parser() -> argparse.ArgumentParser:
    from graphs.exporters import EXPORTERS
    from graphs.families import ATTN_IMPLEMENTATIONS, FAMILIES

    parser = argparse.ArgumentParser(prog="python -m graphs", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES)
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo")
    parser.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, default="eager")
    parser.add_argument("--kv-cache", action="store_true", help="past key/value inputs, present outputs")
    parser.add_argument("--out", help="output .onnx path (copied from the cache)")
    parser.add_argument("--cache-dir", help="export cache folder (default $ASA_GRAPHS_CACHE or <repo>/.cache/graphs)")
    parser.add_argument("--list", action="store_true", help="print exportable and refused variants")
    parser.add_argument("--probe", action="store_true",
                        help="export every candidate now (uncached) and print failures with reasons")
    return parser


def _list() -> None:
    from graphs.variants import REFUSED, VARIANTS

    for variant in VARIANTS:
        print("ok      ", *variant)
    for variant, reason in REFUSED:
        print("refused ", *variant, "--", reason)


def _copy_atomic(source, target) -> None:
    # Never leave a half-written output: copy beside the target, then rename over it.
    target = os.path.abspath(target)
    fd, tmp = tempfile.mkstemp(prefix=".graphs-", suffix=".tmp", dir=os.path.dirname(target))
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> int:
    """CLI entry point.

    Args:
        argv: arguments (default sys.argv[1:]).

    Returns:
        Exit code: 0 on success, 1 on a user error, 2 on bad usage.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        _list()
        return 0
    if args.probe:
        from graphs.variants import probe

        ok, refused = probe()
        print(f"{len(ok)} exported")
        for variant, reason in refused:
            print("refused ", *variant, "--", reason)
        return 0
    if not args.family or not args.out:
        parser.error("--family and --out are required (or --list)")
    from graphs.exporters import export

    try:
        path = export(args.family, args.exporter, attn=args.attn, kv_cache=args.kv_cache, cache_dir=args.cache_dir)
    except AsaExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _copy_atomic(path, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
