#!/usr/bin/env python3
"""Attention-only microbenchmark of the ASA op on ONNX Runtime's CPU execution provider.

One attention layer of SmolLM2-135M's shape (Hq 9, Hkv 3, head dim 64, batch 1, causal prefill)
at contexts 1K / 2K / 4K, each a one-node (or one-subgraph) ONNX model run by ONNX Runtime with
2 intra-op threads:

    dense-onnx     MatMul(Q, Kᵀ)·scale + causal mask → Softmax → MatMul(P, V), K/V expanded to
                   the query heads (the shape of a plain export's attention)
    asa-function   the ASA node without our library: ONNX Runtime runs its model-local function
    asa-lib τ=1    the ASA node with libasa_ort.so, every visible block kept (dense, fused)
    asa-lib d≈0.4  the ASA node with libasa_ort.so, sparse: sink 1 block + a local band, τ tiny
    asa-lib d≈0.2  (so the kept set is the forced blocks); density is measured from the op's
                   block_counts / visible_counts outputs, and the router runs on every call

FLOP formula (effective, what the kept blocks cost at element level):
    4 · B · Hq · D · (S·(S+1)/2) · density      (QKᵀ and P·V, causal half, 2 FLOPs per MAC)

End to end (`--e2e`): prefill latency of SmolLM2-135M (real weights, dynamo opset 18 export
from graphs.export) for issue 5's four configurations: (a) the original export, (b) the original
after ONNX Runtime's transformer optimizer, (c) the rewritten model with libasa_ort.so at τ = 1,
(d) the rewritten model at a sparse operating point (`--sparse τ,sink,local`); density of (d)
from the op's telemetry over all layers; the optimizer's fused-op counts are reported.

    python tools/bench_ort_cpu.py                       # print the table
    python tools/bench_ort_cpu.py --write BENCHMARKS.md # also update the "CPU (ONNX Runtime)"
                                                        # section of that file
    python tools/bench_ort_cpu.py --e2e --seq 1024 2048 4096 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asa_export.contract import AsaAttributes  # noqa: E402
from asa_export.contract.function import build_function, make_node  # noqa: E402
from asa_export.runtime import ort as asa_ort  # noqa: E402

HQ, HKV, D, B = 9, 3, 64, 1
OPSET = 18
SECTION = "CPU (ONNX Runtime)"


def _vi(name, shape, elem=1):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def dense_model(seq: int) -> bytes:
    """Plain attention graph: K/V expanded to Hq heads, additive causal mask input."""
    from onnx import helper, numpy_helper

    g = HQ // HKV
    inits = [
        numpy_helper.from_array(np.array([B, HKV, 1, seq, D], np.int64), "kv5"),
        numpy_helper.from_array(np.array([B, HKV, g, seq, D], np.int64), "kvx"),
        numpy_helper.from_array(np.array([B, HQ, seq, D], np.int64), "kv4"),
        numpy_helper.from_array(np.array(1.0 / math.sqrt(D), np.float32), "scale"),
    ]
    nodes = []
    for name in ("key", "value"):
        nodes += [helper.make_node("Reshape", [name, "kv5"], [f"{name}5"]),
                  helper.make_node("Expand", [f"{name}5", "kvx"], [f"{name}x"]),
                  helper.make_node("Reshape", [f"{name}x", "kv4"], [f"{name}r"])]
    nodes += [
        helper.make_node("Transpose", ["keyr"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["query", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["qks"]),
        helper.make_node("Add", ["qks", "mask"], ["qkm"]),
        helper.make_node("Softmax", ["qkm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "valuer"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "dense_attention",
        [_vi("query", [B, HQ, seq, D]), _vi("key", [B, HKV, seq, D]),
         _vi("value", [B, HKV, seq, D]), _vi("mask", [1, 1, seq, seq])],
        [_vi("output", [B, HQ, seq, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]).SerializeToString()


def asa_model(seq: int, attrs: AsaAttributes) -> bytes:
    """One ASA node with its model-local function; outputs: output, block_counts, visible_counts."""
    from onnx import TensorProto, helper

    outputs = ["output", "", "block_counts", "visible_counts"]
    node = make_node(["query", "key", "value"], outputs, attrs, "asa_0")
    graph = helper.make_graph(
        [node], "asa_attention",
        [_vi("query", [B, HQ, seq, D]), _vi("key", [B, HKV, seq, D]),
         _vi("value", [B, HKV, seq, D])],
        [_vi("output", None)] +
        [helper.make_tensor_value_info(o, TensorProto.INT32, None) for o in outputs[2:]])
    fn = build_function(attrs, OPSET, (False, False, False), 4)
    return helper.make_model(graph, functions=[fn], ir_version=10, opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid("asa", 1)]).SerializeToString()


def _options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


# Idle time before each timed run of the attention-only benchmark. ONNX Runtime keeps a
# session's intra-op workers spinning for a while after `run` returns (measured here: a full core
# for ~40 ms), so without a pause the previous configuration's session competes with the timed
# one for the 2 cores. After the pause one untimed run of the same session wakes its own workers
# (inside a model, the ops before the attention keep them awake), then the timed run follows.
SETTLE_S = 0.2


def _time_interleaved(runs: list, repeats: int, settle: float = SETTLE_S) -> list[dict]:
    """Times every (session, feeds) of `runs` `repeats` times, round-robin, after one warm-up
    each, so that load from other processes falls on all configurations alike.

    Args:
        runs: (session, feeds) pairs.
        repeats: timed runs per pair.
        settle: seconds of sleep, then one untimed run, before each timed run (see SETTLE_S);
            0: neither.

    Returns:
        per run: best and median wall time (s) and the outputs of the last run.
    """
    outs = [sess.run(None, feeds) for sess, feeds in runs]
    wall = [[] for _ in runs]
    for _ in range(repeats):
        for i, (sess, feeds) in enumerate(runs):
            if settle > 0:
                time.sleep(settle)
                sess.run(None, feeds)
            t0 = time.perf_counter()
            outs[i] = sess.run(None, feeds)
            wall[i].append(time.perf_counter() - t0)
    return [dict(s=min(w), median=statistics.median(w), runs=w, out=o) for w, o in zip(wall, outs)]


def _feeds(seq: int, rng) -> dict[str, np.ndarray]:
    return {"query": rng.standard_normal((B, HQ, seq, D)).astype(np.float32),
            "key": rng.standard_normal((B, HKV, seq, D)).astype(np.float32),
            "value": rng.standard_normal((B, HKV, seq, D)).astype(np.float32)}


def _flops(seq: int, density: float) -> float:
    return 4.0 * B * HQ * D * (seq * (seq + 1) / 2) * density


def sparse_local_blocks(seq: int, block: int, target: float) -> int:
    """local_blocks (with 1 sink block) whose forced set has density closest to `target`."""
    nk = -(-seq // block)
    visible = sum(i + 1 for i in range(nk))
    best = min(range(1, nk), key=lambda lb: abs(
        sum(min(i + 1, 1 + lb) for i in range(nk)) / visible - target))
    return best


def _configs(seq: int, library) -> list[tuple[str, AsaAttributes, object]]:
    configs = [("asa-lib τ=1", AsaAttributes(causal=True), library)]
    for target in (0.4, 0.2):
        lb = sparse_local_blocks(seq, 64, target)
        configs.append((f"asa-lib sink 1 + local {lb}",
                        AsaAttributes(causal=True, threshold=1e-6, sink_blocks=1,
                                      local_blocks=lb), library))
    return configs


def run(seqs, threads: int, repeats: int, function_max_seq: int, library,
        dense_max_seq: int = 4096, settle: float = SETTLE_S) -> list[dict]:
    """Measure every configuration; returns one row per (seq, config)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    rows = []
    for seq in seqs:
        feeds = _feeds(seq, rng)
        names, runs, dens = [], [], []
        if seq <= dense_max_seq:  # it holds several [Hq, S, S] float tensors
            mask = np.triu(np.full((seq, seq), -np.inf, np.float32), k=1)[None, None]
            names.append("dense-onnx (MatMul/Softmax/MatMul)")
            runs.append((ort.InferenceSession(dense_model(seq), _options(threads),
                                              providers=["CPUExecutionProvider"]),
                         {**feeds, "mask": mask}))
            dens.append(None)
        configs = _configs(seq, library)
        if seq <= function_max_seq:
            configs.append(("asa-function (no library) τ=1", AsaAttributes(causal=True), False))
        for name, attrs, lib in configs:
            names.append(name)
            runs.append((asa_ort.session(asa_model(seq, attrs), library=lib,
                                         sess_options=_options(threads)), feeds))
            dens.append(attrs)
        results = _time_interleaved(runs, repeats, settle)
        ref_out = results[0]["out"][0] if dens[0] is None else None
        for name, attrs, res in zip(names, dens, results):
            out = res.pop("out")
            density = 1.0 if attrs is None else float(out[1].sum()) / float(out[2].sum() * HQ)
            if attrs is not None and attrs.threshold >= 1 and ref_out is not None:
                err = float(np.abs(out[0] - ref_out).max())
                assert err < 1e-3, f"{name} differs from dense attention by {err}"
            rows.append(dict(seq=seq, config=name, density=density, **res))
        del runs
    return rows


def paired_ratio(base_runs: list[float], runs: list[float]) -> float:
    """Median over rounds of base time / time: runs of one round are adjacent in time, so a
    load burst from other processes moves both sides of most ratios (steadier than best / best
    on a shared machine)."""
    return statistics.median(b / t for b, t in zip(base_runs, runs))


def table(rows: list[dict]) -> str:
    lines = ["| S | configuration | density | best (ms) | median (ms) | "
             "GFLOP/s (eff., best) | vs dense-onnx | vs asa-lib τ=1 | vs τ=1, paired median |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        base = next((r for r in rows if r["seq"] == row["seq"] and r["config"].startswith("dense")),
                    None)
        lib1 = next((r for r in rows if r["seq"] == row["seq"] and r["config"] == "asa-lib τ=1"),
                    None)
        gflops = _flops(row["seq"], row["density"]) / row["s"] / 1e9
        vs_lib = f"{lib1['s'] / row['s']:.2f}×" if lib1 else "—"
        vs_dense = f"{base['s'] / row['s']:.2f}×" if base else "—"
        paired = f"{paired_ratio(lib1['runs'], row['runs']):.2f}×" if lib1 else "—"
        lines.append(f"| {row['seq']} | {row['config']} | {row['density']:.3f} | "
                     f"{row['s'] * 1e3:.1f} | {row['median'] * 1e3:.1f} | {gflops:.1f} | "
                     f"{vs_dense} | {vs_lib} | {paired} |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = re.search(r"Model name:\s*(.+)", out)
        flags = re.search(r"Flags:\s*(.+)", out)
        isa = "AVX-512" if flags and "avx512f" in flags.group(1) else (
            "AVX2" if flags and "avx2" in flags.group(1) else "SSE")
        return f"{name.group(1).strip() if name else platform.processor()} ({isa}), {os.cpu_count()} logical CPUs"
    except OSError:
        return platform.processor() or "unknown CPU"


def section(rows, args, command: str) -> str:
    import onnxruntime as ort

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join([
        f"## {SECTION}", "",
        "Attention-only microbenchmark: one causal prefill attention of SmolLM2-135M's shape "
        f"(B {B}, Hq {HQ}, Hkv {HKV}, D {D}, fp32), ONNX Runtime {ort.__version__} CPU execution "
        f"provider, {args.threads} intra-op threads, best and median wall time of {args.repeats} "
        f"runs after a warm-up, configurations interleaved run by run; before each timed run "
        f"{args.settle:g} s of idle, then one untimed run of the same session (ratios use the "
        "best run; the last column is the median over rounds of the τ=1 time / this time). "
        "Sparse rows force the kept set with 1 sink block + a local band (τ tiny) and include "
        "the router; density is measured from the op's telemetry outputs. "
        "Effective GFLOP/s = 4·B·Hq·D·S(S+1)/2·density / time.", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_model()}; 1-min load average at the end of the run: {load:.2f}",
        f"- kernel ISA level picked: {args.isa}",
        f"- command: `{command}`", "",
        table(rows), ""])


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the head of the '## CPU (ONNX Runtime)' section of `path`: its text
    up to the first '###' subsection (the subsections, e.g. end to end and precision, stay)."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |^### |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else (
        old.rstrip("\n") + "\n\n" + text + "\n")
    path.write_text(new)


def kernel_isa(library) -> str:
    import ctypes

    core = REPO / "plugins/build/core/cpu/libasa_cpu.so"
    if not core.exists():
        return "unknown"
    lib = ctypes.CDLL(str(core))
    lib.asa_cpu_isa.restype = ctypes.c_char_p
    return lib.asa_cpu_isa().decode()


# ---------------------------------------------------------------------------------------------
# End to end: SmolLM2-135M prefill (real weights), issue 5's four configurations.

E2E_MODEL = ("smollm2", "dynamo", "sdpa")  # graphs.export(family, exporter, attn=...)
E2E_SECTION_MARK = "### End to end: SmolLM2-135M prefill"


def _count_ops(path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def ort_optimized(orig: Path, out: Path, model_type: str) -> dict:
    """ONNX Runtime's transformer optimizer on the original export (config (b)).

    Returns:
        model_type used, the fused-op counts of its report, and the attention-op counts.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(orig), model_type=model_type, num_heads=9, hidden_size=576,
                         opt_level=0, use_gpu=False)
    opt.save_model_to_file(str(out))
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    ops = _count_ops(out)
    attention = {k: v for k, v in ops.items() if "Attention" in k}
    return dict(model_type=model_type, fused=fused, attention_ops=attention,
                softmax=ops.get("Softmax", 0))


def rewritten(orig: Path, out: Path, head_thresholds: dict | None = None, **options) -> int:
    """Rewrite `orig` into `out` with RewriteOptions(**options); returns the ASA node count.

    Args:
        head_thresholds: optional {layer: [Hq] tau} written as each site's contract input 5.
    """
    import onnx_ir as ir

    from asa_export import io
    from asa_export.passes.pipeline import RewriteOptions, rewrite_model

    model = ir.load(str(orig))
    report = rewrite_model(model, RewriteOptions(**options))
    if head_thresholds is not None:
        sys.path.insert(0, str(REPO / "tools"))
        from eval_router import set_head_thresholds

        set_head_thresholds(model, report, head_thresholds)
    io.save_model(model, out)
    return sum(1 for n in model.graph if n.op_type == "AdaptiveSparseAttention")


def load_head_thresholds(path: Path) -> dict:
    """{layer: float32 [Hq]} from `eval_router.py thresholds --to FILE` output."""
    import json

    table = json.loads(Path(path).read_text())["head_thresholds"]
    return {int(layer): np.asarray(taus, np.float32) for layer, taus in table.items()}


def model_density(path: Path, feeds: dict, library) -> float:
    """Kept / visible key blocks over all ASA nodes of `path` for one feed (the op's telemetry)."""
    import types

    import onnx_ir as ir

    from asa_export import check

    result = types.SimpleNamespace(density=[], density_error="")
    check._measure_density(ir.load(str(path)), [feeds], result, library)
    if result.density_error:
        raise RuntimeError(result.density_error)
    kept = sum(d.kept for d in result.density)
    return kept / sum(d.visible for d in result.density)


def _time_one(path: Path, library, threads: int, feeds: dict, repeats: int, warmup: int) -> dict:
    """Open one session, run `warmup` untimed and `repeats` timed runs, close it.

    One session at a time: at 4K the original's S×S attention tensors fill ONNX Runtime's arenas
    (four sessions open held 21 GB of the 23 GB machine and were OOM-killed).

    Returns:
        dict(best, median, runs, logits (first output of the last run), load (1-min load average
        before the timed runs)).
    """
    sess = asa_ort.session(str(path), library=library, sess_options=_options(threads))
    for _ in range(warmup):
        out = sess.run(None, feeds)
    load = os.getloadavg()[0]
    wall = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sess.run(None, feeds)
        wall.append(time.perf_counter() - t0)
    del sess
    return dict(best=min(wall), median=statistics.median(wall), runs=wall, logits=out[0], load=load)


def text_feeds(feeds: dict, text: Path, seq: int) -> dict:
    """`feeds` with input_ids = the first `seq` tokens of the last quarter of `text` (SmolLM2's
    tokenizer): the router's density depends on the content, random token ids are not text."""
    from graphs import smollm2

    body = Path(text).read_text()
    ids = np.asarray(smollm2.load_tokenizer()(body[3 * len(body) // 4:]).input_ids[:seq], np.int64)
    if len(ids) < seq:
        raise SystemExit(f"{text}: only {len(ids)} tokens in its last quarter, need {seq}")
    return {**feeds, "input_ids": ids[None]}


def run_e2e(seqs, threads: int, repeats: int, library, workdir: Path, sparse: dict,
            model_type: str, warmup: int = 1, configs: str = "abcd", model: Path | None = None,
            text: Path | None = None) -> dict:
    """Prefill latency of (a) original, (b) ORT-optimized, (c) ASA τ=1, (d) ASA sparse.

    Configurations run one after another, one session open at a time (see `_time_one`).

    Returns:
        dict(rows=[{seq, config, median, best, runs, density, load}], optimizer=..., sparse=...).
    """
    import graphs
    from graphs.inputs import sample_inputs

    workdir.mkdir(parents=True, exist_ok=True)
    orig = Path(model or graphs.export(E2E_MODEL[0], E2E_MODEL[1], attn=E2E_MODEL[2]))
    paths = {"(a) original": orig, "(b) ORT transformer optimizer": workdir / "ort_opt.onnx",
             "(c) ASA library τ=1": workdir / "asa_tau1.onnx",
             "(d) ASA library sparse": workdir / "asa_sparse.onnx"}
    paths = {k: v for k, v in paths.items() if k[1] in configs}
    info = dict(optimizer=ort_optimized(orig, workdir / "ort_opt.onnx", model_type) if "b" in configs
                else None, sparse=sparse)
    if "c" in configs:
        rewritten(orig, paths["(c) ASA library τ=1"], threshold=1.0)
    if "d" in configs:
        rewritten(orig, paths["(d) ASA library sparse"], **sparse)
    rows = []
    for seq in seqs:
        feeds = sample_inputs(E2E_MODEL[0], str(orig), batch=1, seq=seq)
        if text is not None:
            feeds = text_feeds(feeds, text, seq)
        base = None
        for name, path in paths.items():
            lib = library if name.startswith(("(c)", "(d)")) else False
            r = _time_one(path, lib, threads, feeds, repeats, warmup)
            base = r["logits"] if base is None else base
            err = float(np.abs(r.pop("logits") - base).max())
            dens = model_density(path, feeds, library) if name.startswith("(d)") else 1.0
            rows.append(dict(seq=seq, config=name, density=dens, max_logit_diff=err, **r))
            print(f"S {seq} {name}: median {r['median']:.2f} s (runs {r['runs']}), density "
                  f"{dens:.3f}, max |Δlogit| vs first {err:.2e}, load {r['load']:.2f}", flush=True)
    info["rows"] = rows
    return info


def e2e_table(rows) -> str:
    lines = ["| S | configuration | density | median (s) | runs (s) | vs (a) | vs (b) | "
             "max abs Δlogits vs (a) | 1-min load |",
             "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        same = {r["config"][:3]: r for r in rows if r["seq"] == row["seq"]}
        va = f"{same['(a)']['median'] / row['median']:.2f}×" if "(a)" in same else "—"
        vb = f"{same['(b)']['median'] / row['median']:.2f}×" if "(b)" in same else "—"
        runs = ", ".join(f"{t:.2f}" for t in row["runs"])
        lines.append(f"| {row['seq']} | {row['config']} | {row['density']:.3f} | "
                     f"{row['median']:.2f} | {runs} | {va} | {vb} | "
                     f"{row['max_logit_diff']:.1e} | {row['load']:.1f} |")
    return "\n".join(lines)


def e2e_section(info, args, command: str, load_before: float) -> str:
    import onnxruntime as ort

    load = os.getloadavg()[0]
    opt = info["optimizer"]
    sp = info["sparse"]
    per_head = (f"per-head thresholds from `{args.sparse_thresholds}` (contract input 5, replacing "
                f"the global τ)" if args.sparse_thresholds else f"threshold {sp['threshold']}")
    return "\n".join([
        E2E_SECTION_MARK, "",
        f"Prefill latency (one forward pass over the whole prompt, logits out), batch 1, "
        f"SmolLM2-135M real weights, dynamo opset 18 export (sdpa path), ONNX Runtime "
        f"{ort.__version__} CPU execution provider, {args.threads} intra-op threads, "
        f"graph optimizations on; one session open at a time: per configuration "
        f"{args.e2e_warmup} warm-up run(s), then the median of {args.e2e_repeats} timed runs.", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_model()}; 1-min load average before / after: {load_before:.2f} / "
        f"{load:.2f} (the 2 cores are shared with other jobs; per-row load in the table)",
        f"- command: `{command}`",
        (f"- (b): `onnxruntime.transformers.optimizer.optimize_model(model_type=\"{opt['model_type']}\", "
         f"num_heads=9, hidden_size=576, opt_level=0)`; fused operators: {opt['fused'] or 'none'}; "
         f"attention ops after it: {opt['attention_ops'] or 'none'} (Softmax left: {opt['softmax']})"
         if opt else "- (b): not run"),
        f"- (d): {per_head}, sink {sp['sink_blocks']}, local {sp['local_blocks']}, "
        f"block {sp.get('block_size', 64)}; density = kept / visible key blocks over all 30 "
        "layers and heads, measured from the op's telemetry on the same input", "",
        e2e_table(info["rows"]), ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--function-max-seq", type=int, default=2048,
                    help="largest S for the function-body row (it materialises S×S tensors)")
    ap.add_argument("--dense-max-seq", type=int, default=4096,
                    help="largest S for the dense-onnx row (memory: several Hq×S×S tensors)")
    ap.add_argument("--settle", type=float, default=SETTLE_S,
                    help="seconds of idle, then one untimed run of the same session, before each "
                         "timed attention-only run, so that the previous session's spinning "
                         "intra-op workers are not timed and the timed session's own are awake "
                         "(0: neither)")
    ap.add_argument("--library", type=Path, default=None, help="libasa_ort.so (default: found)")
    ap.add_argument("--write", type=Path, help="update this markdown file's CPU section")
    ap.add_argument("--e2e", action="store_true",
                    help="run the SmolLM2-135M end-to-end prefill benchmark instead of the "
                         "attention-only one (--write then updates only its subsection)")
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--e2e-dir", type=Path, default=REPO / ".cache/bench_ort_cpu")
    ap.add_argument("--optimizer-model-type", default="gpt2",
                    help="model_type for ONNX Runtime's transformer optimizer")
    ap.add_argument("--sparse", default="0.98,1,2",
                    help="(d)'s threshold,sink_blocks,local_blocks")
    ap.add_argument("--sparse-thresholds", type=Path, default=None,
                    help="(d)'s per-head thresholds JSON (`eval_router.py thresholds --to`)")
    ap.add_argument("--e2e-model", type=Path, default=None,
                    help="the original SmolLM2 export (default: graphs.export's cache)")
    ap.add_argument("--e2e-text", type=Path, default=None,
                    help="token ids from this text's last quarter (e.g. KJV) instead of random ids")
    ap.add_argument("--e2e-warmup", type=int, default=1, help="untimed runs per configuration")
    ap.add_argument("--e2e-configs", default="abcd", help="subset of the configurations a, b, c, d")
    args = ap.parse_args(argv)
    library = args.library or asa_ort.library_path()
    if library is None:
        print("libasa_ort.so not built: run `python tools/build_plugins.py`", file=sys.stderr)
        return 1
    args.isa = kernel_isa(library)
    command = "python tools/bench_ort_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.e2e:
        tau, sink, local = args.sparse.split(",")
        sparse = dict(threshold=float(tau), sink_blocks=int(sink), local_blocks=int(local))
        if args.sparse_thresholds:
            sparse["head_thresholds"] = load_head_thresholds(args.sparse_thresholds)
        load_before = os.getloadavg()[0]
        info = run_e2e(args.seq, args.threads, args.e2e_repeats, library, args.e2e_dir, sparse,
                       args.optimizer_model_type, args.e2e_warmup, args.e2e_configs, args.e2e_model,
                       args.e2e_text)
        text = e2e_section(info, args, command.strip(), load_before)
        print(text)
        if args.write:
            write_subsection(args.write, text)
        return 0
    rows = run(args.seq, args.threads, args.repeats, args.function_max_seq, library,
               args.dense_max_seq, args.settle)
    text = section(rows, args, command.strip())
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


def write_subsection(path: Path, text: str) -> None:
    """Replace (or append at the end of the CPU section) the end-to-end subsection."""
    old = path.read_text()
    pattern = re.compile(rf"^{re.escape(E2E_SECTION_MARK)}.*?(?=^##? |^### |\Z)", re.S | re.M)
    if pattern.search(old):
        path.write_text(pattern.sub(lambda _: text + "\n", old))
        return
    sec = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    m = sec.search(old)
    if not m:
        raise SystemExit(f"no '## {SECTION}' section in {path}")
    path.write_text(old[:m.end()].rstrip("\n") + "\n\n" + text + "\n\n" + old[m.end():])


if __name__ == "__main__":
    sys.exit(main())
