"""Router accuracy evaluation on SmolLM2-135M (real weights) and real text.

    text (KJV | pydoc) --tokenize--> windows (eval: last quarter of KJV; calib: first half)
      calibrate: dense forward on calib windows, naive + oracle threshold curves per layer/head
                 -> curves .npz (per-head thresholds are fitted from it)
      ppl:       one forward per (setting, window) with the torch research path
                 (asa_export.router.research) -> one JSON per window (resumable)
      ort:       the rewritten ONNX export in ONNX Runtime (asa_export.runtime.ort.session)
      table:     per (text, context, setting): density, perplexity, delta vs dense

Settings are strings: `dense`, `naive:tau=0.9`, `oracle:tau=0.9`, `naive:tau=0.9,sink=2,local=2`,
`perhead:recall=0.95[,sink=1,local=1]` (per-head tau reaching that attention-mass recall on the
calibration curves), `tradeoff:cost=0.2` (per-head tau maximizing recall - cost * density);
`lse:tau=0.99` and `perhead:...,router=lse` are a research pooling outside contract v1
(research.pooled_probs "lse"), measured for a contract proposal.
Seeded (window choice), resumable (existing JSON files are skipped), prints wall times.

Example:
    python tools/eval_router.py calibrate --context 2048 --windows 2
    python tools/eval_router.py ppl --context 2048 --windows 8 dense naive:tau=0.9 perhead:recall=0.95
    python tools/eval_router.py table
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asa_export.errors import AsaExportError  # noqa: E402

DEFAULT_OUT = REPO / ".cache" / "eval_router"


# ------------------------------------------------------------------ text and windows


def kjv_text(path: str | None) -> str:
    """The KJV text: a file, or the Debian `bible` command (`bible "gen1:1-rev22:21"`)."""
    if path:
        return pathlib.Path(path).read_text()
    exe = shutil.which("bible")
    if exe is None:
        raise AsaExportError("KJV text not found: pass --kjv FILE, or install Debian bible-kjv "
                             "(`apt-get download bible-kjv bible-kjv-text && dpkg -x ...`, then "
                             "`bible -p <dir>/usr/lib 'gen1:1-rev22:21' > kjv.txt`)")
    return subprocess.run([exe, "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout


def pydoc_text() -> str:
    """Python documentation topics shipped with CPython (pydoc_data.topics), in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def segment(args, text_name: str, split: str) -> str:
    """Evaluation text is the last quarter; calibration text the first half (disjoint)."""
    text = kjv_text(args.kjv) if text_name == "kjv" else pydoc_text()
    n = len(text)
    return text[3 * n // 4:] if split == "eval" else text[: n // 2]


def windows(tokenizer, text: str, context: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` non-overlapping windows of `context` tokens chosen with a seeded generator.

    The choice is a prefix of one seeded permutation, so the first n windows are the same for
    any count >= n (a run with more windows extends a finished one).
    """
    ids = np.asarray(tokenizer(text).input_ids, dtype=np.int64)
    slots = len(ids) // context
    if slots < count:
        raise AsaExportError(f"text has {len(ids)} tokens: only {slots} windows of {context}")
    chosen = np.random.default_rng(seed).permutation(slots)[:count]
    return [ids[s * context:(s + 1) * context] for s in chosen]


# ------------------------------------------------------------------ settings


def parse_setting(spec: str, curves_file: pathlib.Path | None):
    """'naive:tau=0.9,sink=1,local=1' -> RouterSetting (perhead: thresholds from the curves)."""
    from asa_export.router import research, stats

    name, _, rest = spec.partition(":")
    kv = dict(item.split("=") for item in rest.split(",") if item)
    sink, local = int(kv.get("sink", 1)), int(kv.get("local", 1))
    if name in ("dense", "naive", "oracle", "lse"):
        return research.RouterSetting(router=name, threshold=float(kv.get("tau", 1.0)),
                                      sink_blocks=sink, local_blocks=local)
    if name in ("perhead", "tradeoff"):
        if curves_file is None or not curves_file.is_file():
            raise AsaExportError(f"perhead needs calibration curves: run `calibrate` first ({curves_file})")
        router = kv.get("router", "naive")  # "lse": research pooling, outside contract v1
        curves = research.arrays_to_curves(np.load(curves_file))[(router, sink, local)]
        if name == "perhead":
            taus = {i: stats.fit_head_thresholds(c, float(kv["recall"])) for i, c in enumerate(curves)}
        else:
            taus = {i: stats.fit_head_thresholds_tradeoff(c, float(kv["cost"])) for i, c in enumerate(curves)}
        return research.RouterSetting(router=router, threshold=1.0, sink_blocks=sink,
                                      local_blocks=local, head_thresholds=taus)
    raise AsaExportError(f"unknown setting {spec!r}: dense | naive:tau= | oracle:tau= | perhead:recall= | tradeoff:cost=")


# ------------------------------------------------------------------ torch path


def load(attn_name: str):
    from graphs import smollm2

    model = smollm2.load_model("sdpa")
    model.config._attn_implementation = attn_name
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = attn_name
    return model, smollm2.load_tokenizer()


def calib_file(args) -> pathlib.Path:
    context = args.calib_context or args.context
    return pathlib.Path(args.out) / f"curves-kjv-{context}-w{args.calib_windows}.npz"


def cmd_calibrate(args) -> None:
    """Dense forwards on calibration windows; naive and oracle curves per layer and head."""
    from asa_export.router import research

    setting = research.RouterSetting(router="dense")
    rec = research.Recorder()
    variants = tuple(tuple(int(x) for x in v.split(",")) for v in args.variants)
    research.register("asa_research", research.make_attention(setting, rec, capture=True,
                                                              capture_variants=variants))
    model, tok = load("asa_research")
    import torch

    for i, w in enumerate(windows(tok, segment(args, "kjv", "calib"), args.context, args.calib_windows, args.seed + 1)):
        t0 = time.time()
        research.window_nll(model, torch.from_numpy(w)[None])
        print(f"calibrate window {i}: {time.time() - t0:.1f} s", flush=True)
    out = calib_file(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **research.curves_to_arrays(rec.curves))
    print(f"wrote {out}")


def cmd_ppl(args) -> None:
    """Perplexity of each setting on each window; one JSON per (setting, window), resumable."""
    import torch

    from asa_export.router import research

    holder = {}

    def attention(*a, **k):  # dispatches to the current setting's function
        return holder["fn"](*a, **k)

    research.register("asa_research", attention)
    model, tok = load("asa_research")
    wins = windows(tok, segment(args, args.text, "eval"), args.context, args.windows, args.seed)
    for spec in args.settings:
        setting = parse_setting(spec, calib_file(args))
        folder = pathlib.Path(args.out) / args.text / str(args.context) / spec.replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i, w in enumerate(wins):
            path = folder / f"w{i}.json"
            if path.exists():
                continue
            rec = research.Recorder()
            holder["fn"] = research.make_attention(setting, rec)
            t0 = time.time()
            nll, n = research.window_nll(model, torch.from_numpy(w)[None])
            wall = time.time() - t0
            row = {"setting": spec, "text": args.text, "context": args.context, "window": i,
                   "seed": args.seed, "nll": nll, "tokens": n, "kept": rec.kept,
                   "visible": rec.visible, "wall_s": wall}
            path.write_text(json.dumps(row))
            print(f"{spec:36s} w{i} ppl {np.exp(nll / n):8.4f} density {rec.density():.3f} {wall:6.1f} s", flush=True)


# ------------------------------------------------------------------ ONNX Runtime path


def cmd_ort(args) -> None:
    """Rewrite the SmolLM2 export at one operating point and measure perplexity in ORT."""
    import onnx_ir as ir

    from asa_export.passes.pipeline import RewriteOptions, rewrite_model
    from graphs import exporters, smollm2

    # An explicit --model avoids a re-export (about 6 minutes here) when the graphs cache key moved.
    source = args.model or exporters.export("smollm2", args.exporter, attn="sdpa")
    tok = smollm2.load_tokenizer()
    wins = windows(tok, segment(args, args.text, "eval"), args.context, args.windows, args.seed)
    folder = pathlib.Path(args.out) / "ort" / args.text / str(args.context)
    folder.mkdir(parents=True, exist_ok=True)
    for tau in args.taus:
        tag = f"tau{tau}-s{args.sink}-l{args.local}" + (f"-recall{args.recall}" if args.recall else "")
        model_path = folder / f"smollm2-{tag}.onnx"
        if not model_path.exists():
            t0 = time.time()
            model = ir.load(str(source))
            report = rewrite_model(model, RewriteOptions(threshold=tau, sink_blocks=args.sink, local_blocks=args.local))
            if args.recall:
                spec = f"perhead:recall={args.recall},sink={args.sink},local={args.local}"
                set_head_thresholds(model, report, parse_setting(spec, calib_file(args)).head_thresholds)
            ir.save(model, str(model_path))
            print(f"rewrote {len(report.sites)} sites -> {model_path} ({time.time() - t0:.1f} s)")
        sess = _ort_session(model_path)
        for i, w in enumerate(wins):
            path = folder / f"{tag}-w{i}.json"
            if path.exists():
                continue
            t0 = time.time()
            nll, n = _ort_nll(sess, w)
            wall = time.time() - t0
            row = {"setting": f"ort:{tag}", "window": i, "nll": nll,
                   "tokens": n, "wall_s": wall, "context": args.context, "text": args.text}
            path.write_text(json.dumps(row))
            print(f"ort tau {tau} w{i} ppl {np.exp(nll / n):8.4f} {wall:6.1f} s", flush=True)


def set_head_thresholds(model, report, thresholds: dict) -> None:
    """Give each rewritten site its fitted `head_thresholds` input (contract input 5).

    Args:
        model: onnx_ir model rewritten by `rewrite_model`.
        report: its Report (site names in layer order).
        thresholds: {layer: float32 [Hq]}.
    """
    import onnx_ir as ir

    from asa_export.passes import rewrite

    by_name = {node.name: node for node in model.graph}
    nodes = []
    for site in report.sites:
        node = by_name[site.name]
        value = ir.Value(name=f"{site.name}_head_thresholds",
                         const_value=ir.tensor(np.asarray(thresholds[site.layer], dtype=np.float32)))
        model.graph.register_initializer(value)
        if len(node.inputs) < 6:
            node.resize_inputs(6)
        node.replace_input_with(5, value)
        nodes.append(node)
    rewrite.add_functions(model, nodes)
    used = {(n.domain, n.op_type, n.overload) for n in model.graph}
    for key in [k for k in model.functions if k not in used]:
        del model.functions[key]


def _ort_session(path):
    try:
        from asa_export.runtime.ort import session
    except ImportError:
        import onnxruntime

        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session(str(path))


def _ort_nll(sess, ids: np.ndarray) -> tuple[float, int]:
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids[None]
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, len(ids)), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(len(ids), dtype=np.int64)[None]
        else:
            raise AsaExportError(f"unexpected model input {inp.name}")
    logits = sess.run([sess.get_outputs()[0].name], feeds)[0][0, :-1].astype(np.float64)
    target = ids[1:]
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return float((logz - logits[np.arange(len(target)), target]).sum()), len(target)


# ------------------------------------------------------------------ curves


def cmd_curves(args) -> None:
    """Print the calibration proxy: density and attention-mass recall per router and tau."""
    from asa_export.router import research, stats

    curves = research.arrays_to_curves(np.load(calib_file(args)))
    for (router, sink, local), layers in sorted(curves.items()):
        total = layers[0]
        for c in layers[1:]:
            total = total + c
        dens, rec = total.density().mean(0), total.recall().mean(0)
        print(f"{router} sink={sink} local={local}: " + "  ".join(
            f"tau {t:g}: d {d:.3f} r {r:.4f}" for t, d, r in zip(total.taus, dens, rec)))
        if router == "naive":
            for target in args.recalls:
                pts = [stats.curve_at(c, stats.fit_head_thresholds(c, target)) for c in layers]
                kept = sum(p[0] * c.visible.sum() for p, c in zip(pts, layers))
                mass = sum(p[1] * c.mass_total.sum() for p, c in zip(pts, layers))
                vis = sum(c.visible.sum() for c in layers)
                tot = sum(c.mass_total.sum() for c in layers)
                print(f"  perhead recall {target}: d {kept / vis:.3f} r {mass / tot:.4f}")


def cmd_thresholds(args) -> None:
    """Write fitted per-head thresholds as JSON {"layer": [tau per query head]}."""
    setting = parse_setting(args.setting, calib_file(args))
    if setting.head_thresholds is None:
        raise AsaExportError("thresholds needs a perhead: or tradeoff: setting")
    table = {str(layer): [round(float(t), 6) for t in taus] for layer, taus in sorted(setting.head_thresholds.items())}
    pathlib.Path(args.to).write_text(json.dumps({"setting": args.setting, "curves": calib_file(args).name,
                                                 "head_thresholds": table}, indent=1))
    print(f"wrote {args.to}")


# ------------------------------------------------------------------ pooling study (proposal)

POOLINGS = ("mean", "lse", "max", "last")


def cmd_pooling(args) -> None:
    """Recall / density proxy of alternative poolings on calibration windows (dense forward)."""
    import torch

    from asa_export.contract import AsaAttributes, reference
    from asa_export.router import research, stats

    captured = []

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        captured.append((query.detach().clone(), key.detach().clone(), float(scaling)))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    research.register("asa_capture", capture)
    model, tok = load("asa_capture")
    totals = {}
    wins = windows(tok, segment(args, "kjv", "calib"), args.context, args.calib_windows, args.seed + 1)
    for w in wins:
        captured.clear()
        t0 = time.time()
        research.window_nll(model, torch.from_numpy(w)[None])
        for q, k, scale in captured:
            seq = q.shape[2]
            attrs = AsaAttributes(scale=scale, causal=True, block_size=64)
            mass = research.block_mass_torch(q, k, scale, 64)
            visible = reference.block_visibility(reference.visibility(1, seq, seq, attrs), 64)
            for pooling in POOLINGS:
                curve = stats.threshold_curve(research.pooled_probs(q, k, scale, 64, pooling), mass, visible, attrs, seq, seq)
                totals[pooling] = totals[pooling] + curve if pooling in totals else curve
        print(f"pooling window: {time.time() - t0:.1f} s", flush=True)
    for pooling, curve in totals.items():
        print(pooling + ": " + "  ".join(f"tau {t:g}: d {d:.3f} r {r:.4f}" for t, d, r in
                                         zip(curve.taus, curve.density().mean(0), curve.recall().mean(0))))


# ------------------------------------------------------------------ table


def cmd_table(args) -> None:
    """Aggregate the JSON results: density, perplexity, delta vs dense per (text, context)."""
    rows = {}
    for path in sorted(pathlib.Path(args.out).rglob("w*.json")) + sorted(pathlib.Path(args.out).rglob("ort/**/*.json")):
        r = json.loads(path.read_text())
        key = (r["text"], r["context"], r["setting"])
        agg = rows.setdefault(key, {"nll": 0.0, "tokens": 0, "kept": 0, "visible": 0, "n": 0, "wall": 0.0,
                                    "w": set(), "per": {}})
        if r["window"] in agg["w"]:
            continue
        agg["w"].add(r["window"])
        agg["per"][r["window"]] = r["nll"] / r["tokens"]
        for f in ("nll", "tokens"):
            agg[f] += r[f]
        agg["kept"] += r.get("kept", 0)
        agg["visible"] += r.get("visible", 0)
        agg["n"] += 1
        agg["wall"] += r["wall_s"]
    print("| text | context | setting | windows | density | perplexity | Δ% vs dense | Δ% per window (min..max) | s/window |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (text, ctx, setting), a in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "dense", kv[0][2])):
        dense = rows.get((text, ctx, "dense"))
        ppl = np.exp(a["nll"] / a["tokens"])
        delta, spread = "", ""
        if dense and a["w"] <= dense["w"]:
            same = [dense["per"][w] for w in a["w"]]
            dense_ppl = np.exp(np.mean(same))  # windows have equal token counts
            delta = f"{100 * (ppl / dense_ppl - 1):+.2f}"
            per = [100 * (np.exp(a["per"][w] - dense["per"][w]) - 1) for w in sorted(a["w"])]
            spread = f"{min(per):+.2f}..{max(per):+.2f}"
        dens = f"{a['kept'] / a['visible']:.4f}" if a["visible"] else "n/a"
        print(f"| {text} | {ctx} | {setting} | {a['n']} | {dens} | {ppl:.4f} | {delta} | {spread} | {a['wall'] / a['n']:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (resumable)")
    parser.add_argument("--kjv", default=None, help="KJV text file (default: the `bible` command)")
    parser.add_argument("--seed", type=int, default=0)
    sub = parser.add_subparsers(dest="cmd", required=True)
    cal = sub.add_parser("calibrate")
    cal.add_argument("--variants", nargs="*", default=["1,1"], help="sink,local pairs")
    ppl = sub.add_parser("ppl")
    ppl.add_argument("settings", nargs="+")
    ort = sub.add_parser("ort")
    ort.add_argument("--taus", type=float, nargs="+", default=[1.0])
    ort.add_argument("--sink", type=int, default=1)
    ort.add_argument("--local", type=int, default=1)
    ort.add_argument("--exporter", default="dynamo23")
    ort.add_argument("--model", default=None, help="an existing SmolLM2 ONNX export (default: graphs cache)")
    ort.add_argument("--recall", type=float, default=None,
                     help="per-head thresholds fitted for this mass recall (needs `calibrate`)")
    sub.add_parser("table")
    pool = sub.add_parser("pooling")
    thr = sub.add_parser("thresholds")
    thr.add_argument("setting")
    thr.add_argument("--to", required=True)
    cur = sub.add_parser("curves")
    cur.add_argument("--recalls", type=float, nargs="+", default=[0.9, 0.95, 0.97, 0.98, 0.99])
    for p in (cal, ppl, ort, cur, pool, thr):
        p.add_argument("--context", type=int, default=2048)
        p.add_argument("--windows", type=int, default=8)
        p.add_argument("--calib-windows", type=int, default=2)
        p.add_argument("--calib-context", type=int, default=None,
                       help="context of the calibration curves (default: --context)")
        p.add_argument("--text", choices=("kjv", "pydoc"), default="kjv")
    ppl.set_defaults(fn=cmd_ppl)
    cal.set_defaults(fn=cmd_calibrate)
    ort.set_defaults(fn=cmd_ort)
    cur.set_defaults(fn=cmd_curves)
    pool.set_defaults(fn=cmd_pooling)
    thr.set_defaults(fn=cmd_thresholds)
    args = parser.parse_args(argv)
    if args.cmd == "table":
        cmd_table(args)
        return 0
    t0 = time.time()
    try:
        args.fn(args)
    except AsaExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"total wall {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
