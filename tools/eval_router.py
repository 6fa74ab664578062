"""Router accuracy evaluation on SmolLM2-135M (real weights) and real text.

    text (KJV | pydoc) --tokenize--> windows (eval: last quarter of KJV; calib: first half)
      calibrate: dense forward on calib windows, naive + oracle threshold curves per layer/head
                 -> curves .npz (per-head thresholds are fitted from it)
      ppl:       one forward per (setting, window) with the torch research path
                 (asa_export.router.research) -> one JSON per window (resumable)
      ort:       the rewritten ONNX export in ONNX Runtime (asa_export.runtime.ort.session)
      passkey:   needle retrieval, teacher-forced in one forward; --decode: prefill the prompt
                 through the rewritten KV-cache export, then decode the answer Sq = 1 (as users
                 run it), with the needle-block drops per layer / head from block_indices
      retrieval: retrieval-head scores on passkey prompts built from the calibration text
      overlap:   decode (Sq = 1) at each of a window's last positions: how much of each step's
                 kept list the previous step's list holds (a predictor for overlapping the
                 router with the attention's K/V stream)
      table:     per (text, context, setting): density, perplexity, delta vs dense

Settings are strings: `dense`, `naive:tau=0.9`, `oracle:tau=0.9`, `naive:tau=0.9,sink=2,local=2`,
`perhead:recall=0.95[,sink=1,local=1]` (per-head tau reaching that attention-mass recall on the
calibration curves), `tradeoff:cost=0.2` (per-head tau maximizing recall - cost * density);
`lse:tau=0.99` and `perhead:...,router=lse` are a research pooling outside contract v1
(research.pooled_probs "lse"), measured for a contract proposal. `<setting>,retrieval=N[,rctx=C]`
adds the N highest-scoring retrieval heads (`retrieval` command; scored at context C) at tau 1
through head_thresholds.
`<setting>,dense=0-4[+10-14]` makes every head of those layers tau 1 (which layers carry the loss);
`perhead:recall=R,recall2=R2,layers2=0-9` fits recall R2 in the layers listed, R elsewhere.
`perhead:...,floor=F` raises every fitted tau below F to F.
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
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asa_export.errors import AsaExportError  # noqa: E402
from asa_export.router import retrieval  # noqa: E402
from asa_export.router.retrieval import PASSKEY_NEEDLE, PASSKEY_PREFIX, PASSKEY_QUESTION  # noqa: F401

# SmolLM2-135M: 30 layers of 9 query heads (the `dense=` layer option builds [Hq] rows for them).
SMOLLM2_LAYERS, SMOLLM2_HEADS = 30, 9

DEFAULT_OUT = REPO / ".cache" / "eval_router"


# ------------------------------------------------------------------ text and windows


def kjv_text(path: str | None) -> str:
    """The KJV text: a file, or the Debian `bible` command (`bible "gen1:1-rev22:21"`)."""
    if path:
        if not pathlib.Path(path).is_file():
            raise AsaExportError(f"KJV text file not found: {path}")
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
    if "retrieval" in kv:
        return _with_retrieval_heads(name, kv, curves_file)
    sink, local = int(kv.get("sink", 1)), int(kv.get("local", 1))
    if name in ("dense", "naive", "oracle", "lse"):
        return _with_dense_layers(research.RouterSetting(router=name, threshold=float(kv.get("tau", 1.0)),
                                                         sink_blocks=sink, local_blocks=local), kv)
    if name in ("perhead", "tradeoff"):
        if curves_file is None or not curves_file.is_file():
            raise AsaExportError(f"perhead needs calibration curves: run `calibrate` first ({curves_file})")
        router = kv.get("router", "naive")  # "lse": research pooling, outside contract v1
        curves = research.arrays_to_curves(np.load(curves_file))[(router, sink, local)]
        if name == "perhead":
            recall = {i: float(kv["recall"]) for i in range(len(curves))}
            if "layers2" in kv:  # another recall target in those layers (sensitivity studies)
                recall.update({i: float(kv["recall2"]) for i in layer_list(kv["layers2"])})
            taus = {i: stats.fit_head_thresholds(c, recall[i]) for i, c in enumerate(curves)}
            if "floor" in kv:  # no head below this tau (heads the 2K fit sends to the grid's floor)
                taus = {i: np.maximum(t, np.float32(kv["floor"])) for i, t in taus.items()}
        else:
            taus = {i: stats.fit_head_thresholds_tradeoff(c, float(kv["cost"])) for i, c in enumerate(curves)}
        return _with_dense_layers(research.RouterSetting(router=router, threshold=1.0, sink_blocks=sink,
                                                         local_blocks=local, head_thresholds=taus), kv)
    raise AsaExportError(f"unknown setting {spec!r}: dense | naive:tau= | oracle:tau= | perhead:recall= | tradeoff:cost=")


def layer_list(text: str) -> list[int]:
    """'0-4+10+25-29' -> [0, 1, 2, 3, 4, 10, 25, ..., 29] (',' separates setting keys)."""
    layers = []
    for part in text.split("+"):
        first, _, last = part.partition("-")
        layers.extend(range(int(first), int(last or first) + 1))
    return layers


def _with_dense_layers(setting, kv: dict, layers: int = SMOLLM2_LAYERS, heads: int = SMOLLM2_HEADS):
    """`dense=a-b[+c-d]`: every head of those layers at tau 1 through head_thresholds (which
    layers carry a setting's perplexity loss); the setting unchanged without the key."""
    if "dense" not in kv:
        return setting
    if setting.router not in ("naive", "dense"):
        raise AsaExportError("dense=LAYERS applies to contract-v1 settings (naive, perhead) only")
    chosen = {layer: list(range(heads)) for layer in layer_list(kv["dense"])}
    setting.head_thresholds = retrieval.dense_heads(setting.head_thresholds or setting.threshold, chosen,
                                                    layers, heads)
    return setting


def retrieval_file(curves_file: pathlib.Path) -> pathlib.Path:
    """Retrieval-head scores beside the calibration curves (same context): `cmd_retrieval`."""
    return curves_file.parent / curves_file.name.replace("curves-", "retrieval-").replace(".npz", ".json")


def _with_retrieval_heads(name: str, kv: dict, curves_file) -> "research.RouterSetting":
    """`<setting>,retrieval=N[,rctx=C]`: the setting without it, plus the N highest-scoring
    retrieval heads (`cmd_retrieval`; scored on context C's prompts, default the calibration
    context) at tau 1 through head_thresholds (no contract change)."""

    base = parse_setting(name + ":" + ",".join(f"{k}={v}" for k, v in kv.items() if k not in ("retrieval", "rctx")),
                         curves_file)
    path = retrieval_file(curves_file)
    if "rctx" in kv:  # scores from prompts of another context than the thresholds' curves
        stem = path.name.split("-")
        path = path.with_name("-".join(stem[:2] + [kv["rctx"]] + stem[3:]))
    if not path.is_file():
        raise AsaExportError(f"retrieval heads: run `retrieval` first ({path})")
    scores = np.asarray(json.loads(path.read_text())["scores"])
    heads = retrieval.top_heads(scores, int(kv["retrieval"]))
    base.head_thresholds = retrieval.dense_heads(base.head_thresholds or base.threshold, heads, *scores.shape)
    return base


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
    """Perplexity and density of each setting through ONNX Runtime on the rewritten export.

    One rewritten model per setting (cached under <out>/ort/models, shared by contexts and
    texts), with the ops' block_counts / visible_counts exposed as graph outputs so that the
    density comes from the same run; one JSON per (setting, window), resumable.
    """
    source = args.model or _default_export(args.exporter)
    from graphs import smollm2

    wins = windows(smollm2.load_tokenizer(), segment(args, args.text, "eval"), args.context,
                   args.windows, args.seed)
    for spec in args.settings:
        folder = pathlib.Path(args.out) / "ort" / args.text / str(args.context) / spec.replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        if args.reuse_torch:
            _reuse_torch(args, spec, folder, len(wins))
        todo = [i for i in range(len(wins)) if not (folder / f"w{i}.json").exists()]
        if not todo:
            continue
        sess, telemetry = ort_model(args, spec, source)
        for i in todo:
            t0 = time.time()
            nll, n, kept, visible = ort_window(sess, telemetry, wins[i])
            row = {"setting": f"ort:{spec}", "engine": "ort", "text": args.text, "context": args.context,
                   "window": i, "seed": args.seed, "nll": nll, "tokens": n, "kept": kept, "visible": visible,
                   "wall_s": time.time() - t0}
            (folder / f"w{i}.json").write_text(json.dumps(row))
            print(f"ort:{spec:32s} w{i} ppl {np.exp(nll / n):8.4f} density {kept / visible:.3f} "
                  f"{row['wall_s']:6.1f} s", flush=True)
        del sess


def _reuse_torch(args, spec: str, folder: pathlib.Path, count: int) -> None:
    """Copy the torch research path's results for `spec` (same windows, same contract semantics)
    into the ONNX Runtime folder, marked engine "torch", so that a run adds only missing windows.
    """
    torch_folder = pathlib.Path(args.out) / args.text / str(args.context) / spec.replace(":", "_")
    for i in range(count):
        src, dst = torch_folder / f"w{i}.json", folder / f"w{i}.json"
        if src.exists() and not dst.exists():
            row = json.loads(src.read_text())
            dst.write_text(json.dumps({**row, "setting": f"ort:{spec}", "engine": "torch"}))


def _default_export(exporter: str):
    from graphs import exporters

    # An explicit --model avoids a re-export (about 6 minutes here) when the graphs cache key moved.
    return exporters.export("smollm2", exporter, attn="sdpa")


def ort_model(args, spec: str, source, kv: bool = False):
    """The session of `spec`'s rewritten model (written on first use) and its telemetry names.

    Args:
        args: parsed arguments (out, calibration curves for perhead settings).
        spec: a setting string (dense | naive:... | perhead:... | tradeoff:...).
        source: the original SmolLM2 ONNX export.
        kv: `source` is a KV-cache export; the model (a separate cache file) also outputs each
            site's block_indices (`<site>__block_indices`) for the needle diagnosis.

    Returns:
        (onnxruntime.InferenceSession, [(block_counts name, visible_counts name)] per site).
    """
    import onnx

    if spec.startswith("file:"):
        return _file_model(args, spec, source if kv else None)
    # Fitted thresholds depend on the calibration curves: their file names the model too.
    fitted = f"-{calib_file(args).stem}" if spec.startswith(("perhead", "tradeoff")) or "retrieval=" in spec else ""
    suffix = "-kv" if kv else ""
    path = pathlib.Path(args.out) / "ort" / "models" / f"smollm2-{spec.replace(':', '_')}{fitted}{suffix}.onnx"
    if not path.exists():
        _write_rewritten(spec, args, source, path, indices=kv)
    names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    counts = [n for n in names if n.endswith("__block_counts")]
    telemetry = [(c, c.replace("__block_counts", "__visible_counts")) for c in counts]
    return _ort_session(path), telemetry


def _file_model(args, spec: str, kv_source=None):
    """`file:NAME`: a model already holding ASA nodes (e.g. `asa-export calibrate` output, given as
    --asa-model NAME=PATH), copied with telemetry outputs; returns (session, telemetry).

    With `kv_source` (a KV-cache export of the same network, for `passkey --decode`) the model
    run is that export, rewritten, with NAME's router (attributes, head_thresholds, gate weights)
    carried over site by site (asa_export.router.transfer), plus each site's block_indices.
    """
    import onnx_ir as ir

    from asa_export import check, io

    name = spec.removeprefix("file:")
    known = dict(item.split("=", 1) for item in args.asa_model or [])
    suffix = "-kv" if kv_source is not None else ""
    path = pathlib.Path(args.out) / "ort" / "models" / f"file-{name}{suffix}.onnx"
    if not path.exists():
        if name not in known:
            raise AsaExportError(f"{spec}: pass --asa-model {name}=PATH (a model with ASA nodes)")
        model = ir.load(known[name]) if kv_source is None else kv_with_router(kv_source, known[name])
        nodes = [n for n in model.graph if n.op_type == "AdaptiveSparseAttention"]
        if not nodes:
            raise AsaExportError(f"{known[name]} has no AdaptiveSparseAttention node")
        check._add_telemetry_outputs(model, nodes)
        if kv_source is not None:
            _expose_block_indices(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        io.save_model(model, path)
        (path.parent / f"file-{name}{suffix}.source").write_text(str(pathlib.Path(known[name]).resolve()))
    counts = [o.name for o in ir.load(str(path)).graph.outputs if o.name.endswith("__block_counts")]
    return _ort_session(path), [(c, c.replace("__block_counts", "__visible_counts")) for c in counts]


def kv_with_router(kv_source, calibrated) -> "onnx_ir.Model":
    """The KV-cache export `kv_source` rewritten, with the router of the calibrated model at
    `calibrated` written onto its sites (matched by order, names and shapes; AsaExportError when
    they do not correspond).

    Args:
        kv_source: path of the original (not rewritten) KV-cache export.
        calibrated: path of a model written by `asa-export calibrate` from the same network.

    Returns:
        onnx_ir model (not saved).
    """
    import onnx_ir as ir

    from asa_export.passes.pipeline import RewriteOptions, rewrite_model
    from asa_export.router import transfer

    t0 = time.time()
    model = ir.load(str(kv_source))
    # Threshold 1 until the transfer: every router value then comes from the calibrated model.
    report = rewrite_model(model, RewriteOptions(threshold=1.0))
    names = transfer.transfer_routers(calibrated, model)
    print(f"rewrote {len(report.sites)} KV-cache sites, router of {calibrated} on {len(names)} "
          f"({time.time() - t0:.1f} s)", flush=True)
    return model


def _write_rewritten(spec: str, args, source, path: pathlib.Path, indices: bool = False) -> None:
    """Rewrite `source` at `spec`'s operating point with telemetry outputs; save to `path`
    (`indices`: also each site's block_indices output)."""
    import onnx_ir as ir

    from asa_export import check, io
    from asa_export.passes.pipeline import RewriteOptions, rewrite_model

    setting = parse_setting(spec, calib_file(args))
    if setting.router not in ("dense", "naive"):
        raise AsaExportError(f"{spec}: only contract-v1 settings run in ONNX Runtime (dense, naive, perhead, tradeoff)")
    t0 = time.time()
    model = ir.load(str(source))
    tau = 1.0 if setting.router == "dense" else setting.threshold
    report = rewrite_model(model, RewriteOptions(threshold=tau, sink_blocks=setting.sink_blocks,
                                                 local_blocks=setting.local_blocks))
    if setting.head_thresholds is not None:
        set_head_thresholds(model, report, setting.head_thresholds)
    check._add_telemetry_outputs(model, [n for n in model.graph if n.op_type == "AdaptiveSparseAttention"])
    if indices:
        _expose_block_indices(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.save_model(model, path)
    print(f"rewrote {len(report.sites)} sites ({spec}) -> {path} ({time.time() - t0:.1f} s)", flush=True)


def _expose_block_indices(model) -> None:
    """Make output 1 (block_indices [B, Hsel, NQ, NK]) of every 4-output ASA node a graph output
    named `<site>__block_indices` (the kept key blocks: which heads keep the needle's block)."""
    import onnx_ir as ir

    for node in model.graph:
        if node.op_type != "AdaptiveSparseAttention" or len(node.outputs) < 4:
            continue
        value = node.outputs[1]
        value.name = f"{node.name}__block_indices"
        value.type = ir.TensorType(ir.DataType.INT32)
        value.shape = ir.Shape([f"{node.name}_B", f"{node.name}_Hsel", f"{node.name}_NQ", f"{node.name}_NK"])
        model.graph.outputs.append(value)


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
    """ONNX Runtime session with the ASA library, 2 intra-op threads (the CPU's two cores)."""
    import onnxruntime

    from asa_export.runtime.ort import session

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3  # the telemetry outputs' free dimensions warn on every run
    return session(str(path), library=True, sess_options=opts)


def _feeds(sess, ids: np.ndarray) -> dict:
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
    return feeds


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - (np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)) + top)


def ort_forward(sess, telemetry, ids: np.ndarray) -> tuple[np.ndarray, int, int]:
    """One forward: logits [S, V] and the kept / visible block counts over all sites.

    Args:
        sess: session of a model from `ort_model`.
        telemetry: its (block_counts, visible_counts) output names.
        ids: int64 [S] token ids.

    Returns:
        (logits, kept, visible); density = kept / visible (contract definition).
    """
    wanted = [sess.get_outputs()[0].name] + [n for pair in telemetry for n in pair]
    out = sess.run(wanted, _feeds(sess, ids))
    kept = visible = 0
    for j in range(len(telemetry)):
        counts, vis = out[1 + 2 * j], out[2 + 2 * j]
        kept += int(counts.sum())
        visible += int(vis.sum()) * int(counts.shape[1])
    return out[0][0], kept, visible


def ort_window(sess, telemetry, ids: np.ndarray) -> tuple[float, int, int, int]:
    """Summed next-token NLL over a window and its block counts: (nll, tokens, kept, visible)."""
    logits, kept, visible = ort_forward(sess, telemetry, ids)
    target = ids[1:]
    # Row chunks: a float64 log-softmax over all 8K x 49K logits at once peaked at 13 GB RSS.
    nll = 0.0
    for s in range(0, len(target), 1024):
        logp = _log_softmax(logits[s:min(s + 1024, len(target))])
        nll -= float(logp[np.arange(len(logp)), target[s:s + len(logp)]].sum())
    return nll, len(target), kept, visible


# ------------------------------------------------------------------ passkey retrieval

def _encoder(tokenizer):
    """text -> ids of a transformers tokenizer, called the way this tool always did."""
    return lambda text: tokenizer(text).input_ids


def passkey_ids(tokenizer, filler_ids: np.ndarray, context: int, depth: float, key: str):
    """Prompt + answer token ids of `context` tokens in all, the needle at `depth` of the filler.

    Returns:
        (ids int64 [context], number of answer tokens at the end).
    """
    layout = passkey_layout(tokenizer, filler_ids, context, depth, key)
    return layout["ids"], layout["n_answer"]


def passkey_layout(tokenizer, filler_ids: np.ndarray, context: int, depth: float, key: str) -> dict:
    """`passkey_ids` with the needle's place: retrieval.passkey_prompt's dict (ids int64
    [context], n_answer, needle_start, needle_len, rows, needle; token offsets into ids)."""
    return retrieval.passkey_prompt(_encoder(tokenizer), filler_ids, context, depth, key)


def passkey_score(logits: np.ndarray, ids: np.ndarray, n_answer: int) -> dict:
    """Teacher-forced scoring of the answer tokens at the end of `ids`.

    `greedy` is true when the argmax at every answer position is the answer token, i.e. greedy
    decoding would emit exactly the passkey (for a dense model; see cmd_passkey).

    Returns:
        dict(greedy, logprob (sum over answer tokens), margin (min over answer positions of the
        correct logit minus the best other logit), first_wrong (index or -1)).
    """
    pos = np.arange(len(ids) - n_answer - 1, len(ids) - 1)
    target = ids[pos + 1]
    rows = logits[pos].astype(np.float64)
    correct = rows[np.arange(n_answer), target]
    others = rows.copy()
    others[np.arange(n_answer), target] = -np.inf
    margin = correct - others.max(axis=-1)
    wrong = np.nonzero(margin <= 0)[0]
    logp = _log_softmax(rows)[np.arange(n_answer), target]
    return {"greedy": bool(len(wrong) == 0), "logprob": float(logp.sum()), "margin": float(margin.min()),
            "first_wrong": int(wrong[0]) if len(wrong) else -1,
            "margins": [round(float(m), 4) for m in margin], "logprobs": [round(float(x), 4) for x in logp]}


def cmd_passkey(args) -> None:
    """Passkey retrieval through ONNX Runtime: dense vs ASA settings, one JSON per case.

    Filler: the KJV evaluation segment (last quarter), a different stretch per key; the needle at
    each depth; the prompt asks for the key. One forward over prompt + the correct answer scores
    it (teacher forcing): `greedy` = every answer token is the argmax. For ASA this is one
    forward over the whole sequence, as a prefill of prompt + answer, so the last query block's
    pooled query also sees the answer tokens (a recompute-per-token greedy decode would not).
    """
    from graphs import smollm2

    source = args.model or _default_export(args.exporter)
    tok = smollm2.load_tokenizer()
    filler = np.asarray(tok(segment(args, "kjv", "eval")).input_ids, dtype=np.int64)
    rng = np.random.default_rng(args.seed + 7)
    keys = [str(k) for k in rng.integers(10000, 100000, size=args.keys)]
    if args.decode:
        return cmd_passkey_decode(args, source, tok, filler, keys)
    for spec in args.settings:
        folder = pathlib.Path(args.out) / "passkey" / str(args.context) / spec.replace(":", "_")
        cases = [(d, j) for d in args.depths for j in range(args.keys)]
        todo = [c for c in cases if not (folder / f"d{c[0]:g}-k{c[1]}.json").exists()]
        if not todo:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        sess, telemetry = ort_model(args, spec, source)
        for depth, j in todo:
            start = j * args.context  # a different filler stretch per key
            ids, n_answer = passkey_ids(tok, filler[start:], args.context, depth, keys[j])
            t0 = time.time()
            logits, kept, visible = ort_forward(sess, telemetry, ids)
            row = {"setting": spec, "context": args.context, "depth": depth, "key": keys[j],
                   "kept": kept, "visible": visible, "wall_s": time.time() - t0,
                   **passkey_score(logits, ids, n_answer)}
            (folder / f"d{depth:g}-k{j}.json").write_text(json.dumps(row))
            print(f"passkey {spec:32s} ctx {args.context} depth {depth:.0%} key {keys[j]}: "
                  f"greedy {row['greedy']} logp {row['logprob']:.3f} margin {row['margin']:.2f} "
                  f"density {kept / visible:.3f} {row['wall_s']:.1f} s", flush=True)
        del sess


# ------------------------------------------------------------------ passkey, prefill + decode


def _kv_feeds(sess, ids: np.ndarray, past: dict, start: int) -> dict:
    """Feeds of one KV-cache step: `ids` at positions start.., `past` {input name: array}."""
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, start + len(ids)), dtype=np.int64),
             "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None]}
    return {**feeds, **past}


def kv_step(sess, telemetry, ids: np.ndarray, past: dict, start: int) -> dict:
    """One prefill (start 0, empty past) or decode step through a KV-cache model.

    Args:
        sess: session of an `ort_model(..., kv=True)` model.
        telemetry: its (block_counts, visible_counts) names, one pair per site in layer order.
        ids: int64 [Sq] new tokens.
        past: {past_key_values.* name: array [1, Hkv, start, D]}.
        start: position of ids[0].

    Returns:
        dict(logits [V] of the last row, past (the next step's past), kept, visible,
        last_blocks: per site the kept key blocks of the LAST query block, a list over heads
        of sets; this is the block list that predicts the next token).
    """
    names = [o.name for o in sess.get_outputs()]
    presents = [n for n in names if n.startswith("present.")]
    indices = [c.replace("__block_counts", "__block_indices") for c, _ in telemetry]
    wanted = [names[0]] + presents + [n for pair in telemetry for n in pair] + indices
    out = dict(zip(wanted, sess.run(wanted, _kv_feeds(sess, ids, past, start))))
    kept = sum(int(out[c].sum()) for c, _ in telemetry)
    visible = sum(int(out[v].sum()) * int(out[c].shape[1]) for c, v in telemetry)
    last = [[set(int(k) for k in row if k >= 0) for row in out[i][0, :, -1, :]] for i in indices]
    return {"logits": out[names[0]][0, -1], "kept": kept, "visible": visible, "last_blocks": last,
            "past": {n.replace("present.", "past_key_values."): out[n] for n in presents}}


def needle_drops(last_blocks: list, needle_blocks: set) -> dict:
    """Which (layer, head) lists miss the needle: {"none": {layer: [heads keeping none of the
    needle's key blocks]}, "part": {layer: [heads keeping some but not all]}} (layers with none
    omitted)."""
    drops = {"none": {}, "part": {}}
    for layer, heads in enumerate(last_blocks):
        for h, kept in enumerate(heads):
            hit = len(kept & needle_blocks)
            kind = "none" if hit == 0 else "part" if hit < len(needle_blocks) else None
            if kind:
                drops[kind].setdefault(layer, []).append(h)
    return drops


def _margin(logits: np.ndarray, token: int) -> float:
    others = logits.astype(np.float64).copy()
    others[token] = -np.inf
    return float(logits[token] - others.max())


def decode_answer(sess, telemetry, prefill: dict, start: int, answer: np.ndarray, forced: bool,
                  needle_blocks: set) -> dict:
    """Decode len(answer) tokens (Sq = 1 steps) after a prefill; forced feeds the answer tokens
    (per-token margins of the correct token), greedy feeds each step's argmax (what a user gets).

    Returns:
        dict(tokens (argmax per step), margins (correct token vs best other, per step),
        logprobs, kept, visible (decode steps only), drops (needle_drops per step; step 0 is
        the prefill's last query block)).
    """
    step, pos = prefill, start
    tokens, margins, logprobs, drops, kept, visible = [], [], [], [], 0, 0
    for t, target in enumerate(answer):
        logits = step["logits"]
        tokens.append(int(np.argmax(logits)))
        margins.append(round(_margin(logits, int(target)), 4))
        logprobs.append(round(float(_log_softmax(logits[None])[0, int(target)]), 4))
        drops.append(needle_drops(step["last_blocks"], needle_blocks))
        if t + 1 == len(answer):
            break
        feed = int(target) if forced else tokens[-1]
        step = kv_step(sess, telemetry, np.asarray([feed], dtype=np.int64), step["past"], pos)
        kept, visible, pos = kept + step["kept"], visible + step["visible"], pos + 1
    return {"tokens": tokens, "margins": margins, "logprobs": logprobs, "kept": kept,
            "visible": visible, "drops": drops}


def passkey_decode_case(sess, telemetry, layout: dict, tokenizer, split: int = 0) -> dict:
    """One passkey case the way users run it: prefill the prompt (without the answer) through
    the KV-cache model, then decode the answer token by token.

    `split` > 0 prefills all but the prompt's last `split` tokens and feeds those as Sq = 1
    steps (a runtime choice, no contract change): the row that predicts the first answer token
    is then routed with its own query instead of its 64-row block's mean.

    Returns:
        JSON-ready dict: greedy text and digits correct, forced per-token margins / log p, prefill
        and decode densities, needle drops at the prefill's last query block and each decode step.
    """
    ids, n = layout["ids"], layout["n_answer"]
    prompt, answer = ids[:-n], ids[-n:]
    bs = 64
    needle = set(range(layout["needle_start"] // bs, (layout["needle_start"] + layout["needle_len"] - 1) // bs + 1))
    layers = sum(1 for i in sess.get_inputs() if i.name.startswith("past_key_values.")) // 2
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
             for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    assert layers == len(telemetry), "one ASA site per layer expected"
    head = len(prompt) - split
    prefill = kv_step(sess, telemetry, prompt[:head], empty, 0)
    for pos in range(head, len(prompt)):
        step = kv_step(sess, telemetry, prompt[pos:pos + 1], prefill["past"], pos)
        prefill = {**step, "kept": prefill["kept"] + step["kept"], "visible": prefill["visible"] + step["visible"]}
    forced = decode_answer(sess, telemetry, prefill, len(prompt), answer, True, needle)
    wrong = [t for t, (a, b) in enumerate(zip(forced["tokens"], answer)) if a != b]
    greedy = forced if not wrong else decode_answer(sess, telemetry, prefill, len(prompt), answer, False, needle)
    text = tokenizer.decode(greedy["tokens"])
    key = tokenizer.decode(answer).strip()
    digits = sum(a == b for a, b in zip(text.strip()[:len(key)], key))
    return {"prefill_kept": prefill["kept"], "prefill_visible": prefill["visible"],
            "decode_kept": greedy["kept"], "decode_visible": greedy["visible"],
            "greedy_text": text, "retrieved": text.strip().startswith(key), "digits_correct": digits,
            "forced_all_argmax": not wrong, "margins": forced["margins"], "logprobs": forced["logprobs"],
            "logprob": float(sum(forced["logprobs"])), "margin": float(min(forced["margins"])),
            "needle_blocks": sorted(needle), "drops": forced["drops"]}


def cmd_passkey_decode(args, source, tok, filler, keys) -> None:
    """`passkey --decode`: every case prefilled then decoded (passkey_decode_case); one JSON per
    case under <out>/passkey_decode/<context>/<setting>/, resumable."""
    for spec in args.settings:
        split = f"-split{args.split}" if args.split else ""
        folder = pathlib.Path(args.out) / "passkey_decode" / str(args.context) / (spec.replace(":", "_") + split)
        cases = [(d, j) for d in args.depths for j in range(args.keys)]
        todo = [c for c in cases if not (folder / f"d{c[0]:g}-k{c[1]}.json").exists()]
        if not todo:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        sess, telemetry = ort_model(args, spec, source, kv=True)
        for depth, j in todo:
            layout = passkey_layout(tok, filler[j * args.context:], args.context, depth, keys[j])
            t0 = time.time()
            row = {"setting": spec, "context": args.context, "depth": depth, "key": keys[j], "split": args.split,
                   **passkey_decode_case(sess, telemetry, layout, tok, args.split), "wall_s": time.time() - t0}
            (folder / f"d{depth:g}-k{j}.json").write_text(json.dumps(row))
            pre = row["prefill_kept"] / row["prefill_visible"]
            misses = sum(len(v) for v in row["drops"][0]["none"].values())
            print(f"decode{split} {spec:32s} ctx {args.context} depth {depth:.0%} key {keys[j]}: "
                  f"{row['greedy_text']!r} digits {row['digits_correct']}/5 margins {row['margins']} "
                  f"prefill density {pre:.3f}, needle missed by {misses} heads at the last block "
                  f"{row['wall_s']:.1f} s", flush=True)
        del sess


def _result_rows(folder: pathlib.Path) -> list[dict]:
    """Every result JSON under `folder` (sorted by path)."""
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))]


def _passkey_groups(rows: list[dict], name) -> list:
    """[((context, name(row)), rows)], by context, dense first, then by name."""
    groups = {}
    for r in rows:
        groups.setdefault((r["context"], name(r)), []).append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "dense", kv[0][1]))


def _depth_cells(rows: list[dict], depths, field: str) -> list[str]:
    """Per depth "hits/cases" of the boolean `field`, "—" where no case ran."""
    cells = []
    for d in depths:
        at = [r for r in rows if r["depth"] == d]
        cells.append(f"{sum(r[field] for r in at)}/{len(at)}" if at else "—")
    return cells


def passkey_decode_table(out: pathlib.Path) -> None:
    """Print the prefill + decode passkey results per (context, setting[-splitN]).

    Columns: prefill density; greedy retrievals per depth and in all (the text a user gets starts
    with the key); digits = cases whose 5 digit tokens are all the argmax when the answer's
    previous tokens are fed (teacher-forced decode: the digits are known even where the leading
    space token loses); mean log p(answer); min margin of the first answer token and of the
    digits; needle misses = heads (of L x Hq) whose block list lacks every needle block, mean
    over cases, at the prefill's last query block and per decode step.
    """
    rows = _result_rows(out / "passkey_decode")
    if not rows:
        return
    depths = sorted({r["depth"] for r in rows})
    print("\nPasskey retrieval, prefill + decode through the KV-cache export (greedy text / forced digits):\n")
    print("| context | setting | density | " + " | ".join(f"depth {d:.0%}" for d in depths)
          + " | greedy | digits | mean log p | min margin first / digits | needle misses prefill / decode |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in depths) + " | --- | --- | --- | --- | --- |")
    def named(r):
        return r["setting"] + (f" split{r['split']}" if r.get("split") else "")

    for (ctx, name), rs in _passkey_groups(rows, named):
        cells = _depth_cells(rs, depths, "retrieved")
        dens = sum(r["prefill_kept"] for r in rs) / sum(r["prefill_visible"] for r in rs)
        digits = sum(min(r["margins"][1:]) > 0 for r in rs)
        miss0 = np.mean([sum(len(v) for v in r["drops"][0]["none"].values()) for r in rs])
        miss1 = np.mean([sum(len(v) for v in d["none"].values()) for r in rs for d in r["drops"][1:]])
        print(f"| {ctx} | {name} | {dens:.3f} | " + " | ".join(cells)
              + f" | {sum(r['retrieved'] for r in rs)}/{len(rs)} | {digits}/{len(rs)}"
              f" | {np.mean([r['logprob'] for r in rs]):.2f} | {min(r['margins'][0] for r in rs):.2f} / "
              f"{min(min(r['margins'][1:]) for r in rs):.2f} | {miss0:.0f} / {miss1:.0f} |")


def passkey_table(out: pathlib.Path) -> None:
    """Print the passkey results: per (context, setting) and depth, correct / cases."""
    rows = _result_rows(out / "passkey")
    if not rows:
        return
    depths = sorted({r["depth"] for r in rows})
    print("\nPasskey retrieval (teacher-forced greedy check; cases correct / run):\n")
    print("| context | setting | density | " + " | ".join(f"depth {d:.0%}" for d in depths)
          + " | all | mean log p(answer) | min margin |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in depths) + " | --- | --- | --- |")
    for (ctx, spec), rs in _passkey_groups(rows, lambda r: r["setting"]):
        cells = _depth_cells(rs, depths, "greedy")
        dens = sum(r["kept"] for r in rs) / sum(r["visible"] for r in rs)
        print(f"| {ctx} | {spec} | {dens:.3f} | " + " | ".join(cells)
              + f" | {sum(r['greedy'] for r in rs)}/{len(rs)} | {np.mean([r['logprob'] for r in rs]):.3f}"
              f" | {min(r['margin'] for r in rs):.2f} |")


# ------------------------------------------------------------------ retrieval heads


def cmd_retrieval(args) -> None:
    """Score every (layer, head) by the dense attention mass that the answer-predicting rows put
    on the needle, on passkey prompts built from the CALIBRATION text with their own keys (the
    evaluation prompts stay unseen); write {"scores": [L][Hq], ...} (retrieval_file)."""
    import torch

    from asa_export.router import research
    from graphs import smollm2

    found = {}

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        scale = float(scaling) if scaling else query.shape[-1] ** -0.5
        q, k = query[0].detach().float().numpy(), key[0].detach().float().numpy()
        found[module.layer_idx] = retrieval.needle_mass(q, k, scale, found["rows"], found["needle"])
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    research.register("asa_retrieval", capture)
    model, tok = load("asa_retrieval")
    filler = np.asarray(tok(segment(args, "kjv", "calib")).input_ids, dtype=np.int64)
    prompts = retrieval.passkey_prompts(_encoder(tok), filler, args.context, args.depths,
                                        args.keys, args.seed)
    keys = retrieval.passkey_keys(args.keys, args.seed)
    total, cases = 0.0, 0
    for layout in prompts:
        found.update(rows=layout["rows"], needle=layout["needle"])
        t0 = time.time()
        with torch.inference_mode():
            model.model(input_ids=torch.from_numpy(layout["ids"])[None])
        layers = sorted(k for k in found if isinstance(k, int))
        total, cases = total + np.stack([found[i] for i in layers]), cases + 1
        print(f"retrieval depth {layout['depth']:.0%} key {layout['key']}: {time.time() - t0:.1f} s",
              flush=True)
    scores = total / cases
    out = retrieval_file(calib_file(args))
    out.write_text(json.dumps({"context": args.context, "cases": cases, "keys": keys, "depths": args.depths,
                               "text": "kjv calibration segment (first half)",
                               "scores": [[round(float(x), 6) for x in row] for row in scores]}))
    order = retrieval.top_heads(scores, 20)
    print(f"wrote {out}; top 20 heads {order}")


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

def load_capturing():
    """SmolLM2 whose attention records each layer's (query, key, scale) as torch tensors in the
    returned list (cleared by the caller per window) and runs dense causal SDPA.

    Returns:
        (model, tokenizer, captured).
    """
    import torch

    from asa_export.router import research

    captured = []

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        captured.append((query.detach().clone(), key.detach().clone(), float(scaling)))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    research.register("asa_capture", capture)
    model, tok = load("asa_capture")
    return model, tok, captured


POOLINGS = ("mean", "lse", "max", "last")


def cmd_pooling(args) -> None:
    """Recall / density proxy of alternative poolings on calibration windows (dense forward)."""
    import torch

    from asa_export.contract import AsaAttributes, reference
    from asa_export.router import research, stats

    model, tok, captured = load_capturing()
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


def decode_list_overlap(q, k, scale: float, block: int, taus, steps: int) -> dict:
    """How much of each decode step's kept list the previous step's list already holds.

    The contract router (reference.router_probs / select_blocks; Sq = 1, select_per 1, sink 1,
    local 1) routes query row t against keys [0, t] for each of the last `steps` positions t of
    one sequence; consecutive steps' lists are compared per KV head.

    Args:
        q: float32 [Hq, S, D] (RoPE'd, as attention sees it).
        k: float32 [Hkv, S, D].
        scale: the score scale.
        block: block_size.
        taus: thresholds to route at.
        steps: positions routed (the first only seeds the comparison).

    Returns:
        {tau: counts} summed over steps and KV heads: kept (this step's kept blocks), visible,
        hit (kept by both steps), prev (kept by the previous step), and the same three for the
        blocks not forced by sink / local (kept_free, hit_free, prev_free).
    """
    import dataclasses

    from asa_export.contract import AsaAttributes, reference

    seq = q.shape[1]
    if not 2 <= steps <= seq:
        raise AsaExportError(f"steps must be between 2 and the window's {seq} tokens, got {steps}")
    base = AsaAttributes(scale=scale, causal=True, block_size=block, sink_blocks=1, local_blocks=1,
                         select_per=1)
    keys = ("kept", "visible", "hit", "prev", "kept_free", "hit_free", "prev_free")
    counts = {tau: dict.fromkeys(keys, 0) for tau in taus}
    previous = dict.fromkeys(taus)
    for t in range(seq - steps, seq):
        probs, visible = reference.router_probs(q[None, :, t:t + 1], k[None, :, :t + 1], base)
        free = ~reference.forced_blocks(base, 1, t + 1)[0]
        for tau in taus:
            attrs = dataclasses.replace(base, threshold=tau)
            keep = reference.select_blocks(probs, visible, attrs, 1, t + 1)[0, :, 0]  # [Hkv, NK]
            before = previous[tau]
            previous[tau] = keep
            if before is None:
                continue
            prev = np.zeros_like(keep)
            prev[:, :before.shape[1]] = before
            c = counts[tau]
            c["kept"] += int(keep.sum())
            c["visible"] += int(visible.sum()) * keep.shape[0]
            c["hit"] += int((keep & prev).sum())
            c["prev"] += int(prev.sum())
            c["kept_free"] += int((keep & free).sum())
            c["hit_free"] += int((keep & prev & free).sum())
            c["prev_free"] += int((prev & free).sum())
    return counts


def cmd_overlap(args) -> None:
    """Decode: recall and precision of the previous step's kept list as a prediction of this one's."""
    import torch

    from asa_export.router import research

    model, tok, captured = load_capturing()
    totals = {}
    for i, w in enumerate(windows(tok, segment(args, args.text, "eval"), args.context, args.windows, args.seed)):
        captured.clear()
        t0 = time.time()
        research.window_nll(model, torch.from_numpy(w)[None])
        for q, k, scale in captured:
            q, k = q[0].float().numpy(), k[0].float().numpy()
            for tau, c in decode_list_overlap(q, k, scale, args.block, args.taus, args.steps).items():
                total = totals.setdefault(tau, dict.fromkeys(c, 0))
                for key, value in c.items():
                    total[key] += value
        print(f"overlap window {i}: {time.time() - t0:.1f} s", flush=True)
    print(f"{args.text}, context {args.context}, block {args.block}, last {args.steps} positions of "
          f"{args.windows} window(s), every layer and KV head; select_per 1, sink 1, local 1")
    print("  tau  density  recall  precision  recall (non-forced)  precision (non-forced)")
    for tau, c in totals.items():
        print(f"{tau:5.2f}  {c['kept'] / c['visible']:7.3f}  {c['hit'] / c['kept']:6.3f}  "
              f"{c['hit'] / c['prev']:9.3f}  {c['hit_free'] / max(c['kept_free'], 1):19.3f}  "
              f"{c['hit_free'] / max(c['prev_free'], 1):22.3f}")


# ------------------------------------------------------------------ table


def _baseline(rows: dict, text: str, ctx: int, setting: str, wins: set):
    """The dense row a setting is compared with: the same engine's (ort:dense for ONNX Runtime
    rows) when it covers the windows, else the torch path's dense."""
    own = rows.get((text, ctx, "ort:dense")) if setting.startswith("ort:") else None
    if own and wins <= own["w"]:
        return own
    return rows.get((text, ctx, "dense"))


def aggregate(out: pathlib.Path) -> dict:
    """Sum the per-window JSON results per (text, context, setting).

    Returns:
        {(text, context, setting): dict(nll, tokens, kept, visible, n, wall, w (window set),
        per ({window: mean nll}))}.
    """
    rows = {}
    for path in sorted(out.rglob("w*.json")) + sorted(out.rglob("ort/**/*.json")):
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
    return rows


def delta(rows: dict, key: tuple):
    """Δ% perplexity of `key` against its dense baseline on the same windows, and the per-window
    Δ% list; (None, []) without a baseline covering its windows."""
    a = rows[key]
    dense = _baseline(rows, *key, a["w"])
    if not dense or not a["w"] <= dense["w"]:
        return None, []
    dense_ppl = np.exp(np.mean([dense["per"][w] for w in a["w"]]))  # windows have equal token counts
    per = [100 * (np.exp(a["per"][w] - dense["per"][w]) - 1) for w in sorted(a["w"])]
    return 100 * (np.exp(a["nll"] / a["tokens"]) / dense_ppl - 1), per


def cmd_table(args) -> None:
    """Print the aggregated results: density, perplexity, delta vs dense per (text, context)."""
    rows = aggregate(pathlib.Path(args.out))
    print("| text | context | setting | windows | density | perplexity | Δ% vs dense | Δ% per window (min..max) | s/window |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, a in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2].removeprefix("ort:") != "dense",
                                                           kv[0][2])):
        text, ctx, setting = key
        d, per = delta(rows, key)
        dtxt = f"{d:+.2f}" if d is not None else ""
        spread = f"{min(per):+.2f}..{max(per):+.2f}" if per else ""
        dens = f"{a['kept'] / a['visible']:.4f}" if a["visible"] else "n/a"
        ppl = np.exp(a["nll"] / a["tokens"])
        print(f"| {text} | {ctx} | {setting} | {a['n']} | {dens} | {ppl:.4f} | {dtxt} | {spread} | {a['wall'] / a['n']:.1f} |")


def family(setting: str) -> str:
    """Router family of a setting string, for the plot legend."""
    name = setting.removeprefix("ort:").split(":")[0]
    if "retrieval=" in setting:
        return "per-head τ + retrieval heads at τ 1"
    return {"naive": "global τ (contract v1)", "perhead": "per-head τ (contract v1)",
            "tradeoff": "per-head τ (contract v1)", "oracle": "oracle (ceiling)",
            "lse": "lse pooling (research)", "gate": "calibrated gate",
            "file": "calibrated (asa-export calibrate)"}.get(name, name)


def compile_regex(pattern: str, option: str) -> "re.Pattern":
    """re.compile with a clear AsaExportError naming the option for a bad expression."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise AsaExportError(f"{option} {pattern!r}: bad regular expression: {err}") from err


def family_overrides(specs) -> list:
    """'NAME=REGEX' strings -> [(NAME, compiled REGEX)] for `plot --family` (bad input: error)."""
    out = []
    for spec in specs or []:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise AsaExportError(f"--family wants NAME=REGEX, got {spec!r}")
        out.append((name, compile_regex(pattern, f"--family {name}=")))
    return out


def plot_family(setting: str, overrides: list) -> str:
    """The legend family of a row: the first `--family` regex that matches it, else `family`."""
    return next((name for name, rx in overrides if rx.search(setting)), family(setting))


def short_label(setting: str) -> str:
    """'ort:perhead:recall=0.97,local=2' -> 'r.97'; local other than 2 is appended ('l1')."""
    name, _, rest = setting.removeprefix("ort:").partition(":")
    if name == "file":
        return rest
    kv = dict(item.split("=") for item in rest.split(",") if item)
    value = next((kv[k] for k in ("recall", "tau", "cost", "density") if k in kv), "")
    head = {"perhead": "r", "naive": "τ", "oracle": "o", "lse": "lse", "tradeoff": "c", "gate": "g"}.get(name, name)
    extra = f"+R{kv['retrieval']}" if "retrieval" in kv else ""
    return (head + value.removeprefix("0") + extra
            + ("" if kv.get("local", "1") == "2" else f" l{kv.get('local', '1')}"))


def cmd_plot(args) -> None:
    """Δperplexity vs density, one panel per context (KJV): filled = ONNX Runtime rows with at
    least 8 windows (screening rows on fewer windows are left out), hollow = torch research-path
    rows (fewer windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate(pathlib.Path(args.out))
    overrides = family_overrides(args.family)
    if args.match:  # only the rows a comparison is about
        match = compile_regex(args.match, "--match")
        rows = {k: a for k, a in rows.items() if match.search(k[2]) or k[2].removeprefix("ort:") == "dense"}
    contexts = sorted({k[1] for k in rows if k[0] == args.text})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.8 * len(contexts), 3.6), squeeze=False)
    colors = {}
    for ax, ctx in zip(axes[0], contexts):
        for key, a in sorted(rows.items()):
            if key[:2] != (args.text, ctx) or not a["visible"] or key[2].removeprefix("ort:") == "dense":
                continue
            d, _ = delta(rows, key)
            if d is None or "tau1.0" in key[2] or (key[2].startswith("ort:") and a["n"] < 8):
                continue
            fam = plot_family(key[2], overrides)
            color = colors.setdefault(fam, f"C{len(colors)}")
            ort_row = key[2].startswith("ort:")
            x = a["kept"] / a["visible"]
            ax.scatter(x, d, s=28, color=color if ort_row else "none", edgecolors=color, label=fam)
            ax.annotate(short_label(key[2]), (x, d), fontsize=5.5, xytext=(3, 2), textcoords="offset points")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"SmolLM2-135M, KJV, context {ctx}", fontsize=9)
        ax.set_xlabel("density (kept / visible blocks)", fontsize=8)
        ax.set_ylabel("Δ perplexity vs dense (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    from matplotlib.lines import Line2D

    handles["filled: ONNX Runtime path"] = Line2D([], [], marker="o", ls="", color="k")
    handles["hollow: torch research path"] = Line2D([], [], marker="o", ls="", color="k", mfc="none")
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(args.to, dpi=80)
    print(f"wrote {args.to}")


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
    ort.add_argument("settings", nargs="+", help="dense | naive:tau=,local= | perhead:recall=,local= | ...")
    pk = sub.add_parser("passkey")
    pk.add_argument("settings", nargs="+")
    pk.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    pk.add_argument("--keys", type=int, default=2, help="passkeys per depth")
    pk.add_argument("--split", type=int, default=0,
                    help="with --decode: feed the prompt's last N tokens as Sq = 1 steps after the prefill")
    pk.add_argument("--decode", action="store_true",
                    help="prefill the prompt, then decode the answer token by token (Sq = 1) through a "
                    "KV-cache export (--model, e.g. `python -m graphs --family smollm2 --exporter dynamo23 "
                    "--attn sdpa --kv-cache`), as users run it; default: one teacher-forced forward")
    ort.add_argument("--reuse-torch", action="store_true",
                     help="take windows the torch path (`ppl`) already measured instead of rerunning them")
    for p in (ort, pk):
        p.add_argument("--asa-model", action="append", metavar="NAME=PATH",
                       help="a model with ASA nodes already (calibrated), evaluated as setting file:NAME; "
                       "repeatable")
        p.add_argument("--exporter", default="dynamo23")
        p.add_argument("--model", default=None, help="an existing SmolLM2 ONNX export (default: graphs cache)")
    ret = sub.add_parser("retrieval", help="score retrieval heads on calibration passkey prompts")
    ret.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ret.add_argument("--keys", type=int, default=2, help="passkeys per depth")
    ret.set_defaults(fn=cmd_retrieval)
    sub.add_parser("table")
    plot = sub.add_parser("plot")
    plot.add_argument("--to", default=str(REPO / "reports" / "router_ppl_vs_density.png"))
    plot.add_argument("--text", choices=("kjv", "pydoc"), default="kjv")
    plot.add_argument("--match", help="plot only the settings this regular expression finds")
    plot.add_argument("--family", action="append", metavar="NAME=REGEX",
                      help="legend family NAME for the settings REGEX finds (repeatable; first wins)")
    pool = sub.add_parser("pooling")
    ovl = sub.add_parser("overlap", help="decode: how much of each step's kept list the previous step's holds")
    ovl.add_argument("--steps", type=int, default=256, help="last positions of each window routed as Sq = 1")
    ovl.add_argument("--block", type=int, choices=(64, 128), default=64)
    ovl.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    thr = sub.add_parser("thresholds")
    thr.add_argument("setting")
    thr.add_argument("--to", required=True)
    cur = sub.add_parser("curves")
    cur.add_argument("--recalls", type=float, nargs="+", default=[0.9, 0.95, 0.97, 0.98, 0.99])
    for p in (cal, ppl, ort, cur, pool, thr, pk, ret, ovl):
        p.add_argument("--context", type=int, default=2048)
        p.add_argument("--windows", type=int, default=8)
        p.add_argument("--calib-windows", type=int, default=2)
        p.add_argument("--calib-context", type=int, default=None,
                       help="context of the calibration curves (default: --context)")
        p.add_argument("--text", choices=("kjv", "pydoc"), default="kjv")
    ppl.set_defaults(fn=cmd_ppl)
    cal.set_defaults(fn=cmd_calibrate)
    ort.set_defaults(fn=cmd_ort)
    pk.set_defaults(fn=cmd_passkey)
    cur.set_defaults(fn=cmd_curves)
    pool.set_defaults(fn=cmd_pooling)
    ovl.set_defaults(fn=cmd_overlap)
    thr.set_defaults(fn=cmd_thresholds)
    args = parser.parse_args(argv)
    if args.cmd == "plot":
        try:
            cmd_plot(args)
        except AsaExportError as exc:  # bad --match / --family
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "table":
        cmd_table(args)
        passkey_table(pathlib.Path(args.out))
        passkey_decode_table(pathlib.Path(args.out))
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
