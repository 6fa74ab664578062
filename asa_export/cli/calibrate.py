"""`asa-export calibrate MODEL --text FILE... --tokenizer PATH --out OUT`: fit the router on text.

Composes asa_export.router.calibrate.calibrate; every option maps to one of its arguments.
"""

from __future__ import annotations

import argparse

from asa_export.cli.export import add_router_arguments
from asa_export.cli.export import options_from as rewrite_options_from
from asa_export.errors import AsaExportError
from asa_export.router import calibrate as cal

HELP = ("calibrate the router of MODEL on text: per-head thresholds (and, with --gate, a learned "
        "gate) written into the ASA nodes")
_DEFAULTS = cal.CalibrateOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `calibrate` (each maps to calibrate() / CalibrateOptions)."""
    parser.add_argument("model", metavar="MODEL",
                        help="an ONNX export (rewritten first) or a model with ASA nodes")
    parser.add_argument("--text", nargs="+", required=True, metavar="FILE",
                        help="calibration text files (UTF-8, concatenated)")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="the model's tokenizer: a folder, a tokenizer.json or a GGUF file")
    parser.add_argument("--out", "-o", required=True, metavar="OUT",
                        help="the calibrated model, e.g. model.asa.onnx")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-recall", type=float, metavar="R",
                        help="per-head tau reaching this attention-mass recall "
                        f"(default {cal.DEFAULT_TARGET_RECALL})")
    target.add_argument("--target-density", type=float, metavar="D",
                        help="per-head tau at the highest recall whose overall density <= D")
    target.add_argument("--threshold", type=float, metavar="TAU",
                        help="one tau for every head (statistics still reported)")
    parser.add_argument("--gate", action="store_true",
                        help="phase 2: train a learned gate per layer (torch), thresholds on it")
    parser.add_argument("--context", type=int, default=_DEFAULTS.context, metavar="N",
                        help="tokens per calibration window (default %(default)s)")
    parser.add_argument("--windows", type=int, default=_DEFAULTS.windows, metavar="N",
                        help="calibration windows (default %(default)s)")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, metavar="S",
                        help="seeds the window choice and the gate (default %(default)s)")
    parser.add_argument("--retrieval-heads", type=int, default=_DEFAULTS.retrieval_heads,
                        metavar="N",
                        help="after fitting, keep the N query heads (over all layers) that "
                        "attend most to a pass key hidden in the calibration text dense (tau 1): "
                        "scored on passkey prompts of --retrieval-context tokens; these heads "
                        "read far-away facts that the block router can drop. 20 was the "
                        "measured choice for SmolLM2-135M at 4K (BENCHMARKS.md, Router "
                        "accuracy). Works with --gate; their density comes on top of "
                        "--target-density (default %(default)s: none)")
    parser.add_argument("--retrieval-context", type=int, metavar="N",
                        help="tokens per --retrieval-heads scoring prompt (default: --context; "
                        "SmolLM2-135M's measured point: --context 2048, --retrieval-context "
                        "4096)")
    parser.add_argument("--layer-recall", action="append", default=[], metavar="LAYERS=R",
                        help="another --target-recall for some layers (ASA sites in graph "
                        "order), e.g. 0-9,25-29=0.90; repeatable. SmolLM2-135M at 4K: recall "
                        "0.95 with 0-9,25-29=0.90 and 20 retrieval heads (BENCHMARKS.md, Router "
                        "accuracy)")
    parser.add_argument("--report", metavar="FILE.json", help="write the JSON report")
    parser.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR (matplotlib)")
    parser.add_argument("--resume", metavar="DIR",
                        help="work folder kept between runs: captured windows and fitted sites "
                        "found there are skipped")
    add_router_arguments(parser, title="router attributes when MODEL is an original export",
                         threshold=False)
    _add_gate_arguments(parser)


def _add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learned gate (--gate)")
    group.add_argument("--gate-dim", type=int, default=_DEFAULTS.gate_dim, metavar="N",
                       help="gate width Dg (default %(default)s)")
    group.add_argument("--gate-steps", type=int, default=_DEFAULTS.gate_steps, metavar="N",
                       help="training steps per layer (default %(default)s)")
    group.add_argument("--device", default=_DEFAULTS.device,
                       help="torch device for the gate: auto, cpu, cuda (default %(default)s)")


def options_from(args: argparse.Namespace) -> cal.CalibrateOptions:
    """CalibrateOptions from parsed arguments."""
    return cal.CalibrateOptions(
        target_recall=args.target_recall, target_density=args.target_density,
        threshold=args.threshold, gate=args.gate, context=args.context, windows=args.windows,
        seed=args.seed, rewrite=rewrite_options_from(args, threshold=False),
        gate_dim=args.gate_dim, gate_steps=args.gate_steps,
        device=args.device, retrieval_heads=args.retrieval_heads,
        retrieval_context=args.retrieval_context,
        layer_recall=parse_layer_recall(args.layer_recall))


def parse_layer_recall(specs: list[str]) -> tuple[tuple[int, float], ...]:
    """(layer, recall) pairs from `LAYERS=R` strings, LAYERS a comma list of indices and ranges.

    Raises:
        AsaExportError: a malformed spec, or a layer named twice.
    """
    pairs: dict[int, float] = {}
    for spec in specs:
        layers, sep, value = spec.partition("=")
        try:
            if not sep or not layers:
                raise ValueError
            recall = float(value)
            indices = []
            for part in layers.split(","):
                lo, dash, hi = part.partition("-")
                indices.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        except ValueError:
            raise AsaExportError(f"--layer-recall wants LAYERS=R, e.g. 0-9,25-29=0.90; got "
                                 f"{spec!r}") from None
        for i in indices:
            if i in pairs:
                raise AsaExportError(f"--layer-recall names layer {i} twice")
            pairs[i] = recall
    return tuple(sorted(pairs.items()))


def run(args: argparse.Namespace) -> int:
    """Calibrate, then print the totals and per-layer table on stdout."""
    report = cal.calibrate(args.model, args.text, args.tokenizer, args.out, options_from(args),
                           report_path=args.report, plots_dir=args.plots,
                           resume_dir=args.resume)
    print(summary_table(report))
    print(f"\nwrote {report['output']}")
    return 0


def summary_table(report: dict) -> str:
    """Per-site thresholds, density and recall, then the totals, as plain text."""
    lines = [f"{'site':<24} {'router':<6} {'density':>7} {'recall':>7}  low-density heads  "
             "thresholds"]
    for row in report["sites"]:
        taus = " ".join(f"{t:g}" for t in row["thresholds"])
        low = ",".join(str(h) for h in row["low_density_heads"]) or "-"
        lines.append(f"{row['name']:<24} {row['router']:<6} {row['density']:7.3f} "
                     f"{row['recall']:7.4f}  {low:<17}  {taus}")
    t = report["totals"]
    lines.append(f"total: density {t['density']:.4f}, attention-mass recall {t['recall']:.4f}"
                 + (f" (recall target {t['recall_target']:g})" if t["recall_target"] else ""))
    if "training_free" in t:
        tf = t["training_free"]
        lines.append(f"training-free router at the same target: density {tf['density']:.4f}, "
                     f"recall {tf['recall']:.4f}")
    if "retrieval" in report:
        heads = report["retrieval"]["heads"]
        lines.append(f"retrieval heads at tau 1 ({len(heads)}, layer:head): "
                     + " ".join(f"{layer}:{head}" for layer, head in heads)
                     + f"; fitted density {report['retrieval']['fitted']['density']:.4f}")
    lines.append("wall: " + ", ".join(
        f"{k} {v if isinstance(v, float) else sum(v):.1f} s" for k, v in report["wall_s"].items()))
    return "\n".join(lines)
