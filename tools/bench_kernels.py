"""Benchmark of the CUDA kernel core against torch SDPA (cuDNN, flash) and FlexAttention.

One run on one GPU; the table is printed last (and written as JSON with --json).

    python tools/bench_kernels.py --seqs 4096 8192 32768 131072 --json $OUT/bench.json

Effective TFLOP/s = dense FLOPs / time, with dense FLOPs = 4 * B * Hq * Sq * Skv * D, halved for
causal (the FlashAttention benchmark convention), for dense and sparse runs alike. Sparse timings
include the router (asa_cuda_forward). Each density's threshold tau is found by bisection on the
router alone; FlexAttention gets the same kept blocks through BlockMask.from_kv_blocks (full
blocks plus causal partial diagonal blocks), never through a dense mask.

Decode (one query row per sequence, --decode-kv, --decode-batch 1 4 8 for several batch sizes)
against the fastest dense SDPA decode of the same batch; tok/s = batch / step time.
--decode-layers L also times both in one CUDA graph over L copies of the K/V (a model's layers),
so that no replay finds the previous replay's kept blocks in L2 (one replayed call re-reads the
same ~54 MB at 128K / 0.1, about the H100's 50 MB L2).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import pathlib
import re
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from asa_export.contract import AsaAttributes
from asa_export.runtime import torch_native, torch_op


def time_ms(fn, budget_s: float = 0.6, min_reps: int = 3, max_reps: int = 30) -> float:
    """Median of CUDA-event timings after one warm-up; repetitions fit the time budget."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture_graph(fn, error_mode: str = "relaxed"):
    """`fn` warmed up once on a side stream (lazy init, cuDNN plans), then captured in a CUDA
    graph; returns (graph, what the captured call returned: its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=error_mode):
        result = fn()
    return graph, result


def graph_ms(fn) -> float:
    """Median time of `fn` captured once in a CUDA graph and replayed: the per-step GPU time of a
    decode loop that launches through graphs (as serving stacks do), without Python/ctypes
    launch gaps. NaN (with the reason printed) when the capture fails."""
    try:
        graph, _ = capture_graph(fn)
        return time_ms(graph.replay)
    except Exception as exc:  # noqa: BLE001 - report and go on with the other columns
        print(f"  CUDA graph capture failed: {str(exc)[:160]}")
        return float("nan")


def graph_ms_per_call(fns) -> float:
    """graph_ms of all `fns` in one graph, divided by their count: with each fn on its own copy
    of the K/V (as a model's layers are), no call finds the previous replay's blocks in L2."""
    return graph_ms(lambda: [fn() for fn in fns]) / len(fns)


class AsaRunner:
    """Pre-allocated ASA call (params, workspace, outputs) so timing sees only the kernels."""

    def __init__(self, q, k, v, attrs: AsaAttributes, key_block_stats=None,
                 key_block_stats_blocks=None):
        self.q, self.k, self.v, self.attrs = q, k, v, attrs
        self.out = torch.empty_like(q[..., : v.shape[-1]])
        self.tele = [torch.empty(s, dtype=torch.int32, device=q.device)
                     for s in torch_op.telemetry_shapes(q, k, attrs)]
        self.params, self._keep = torch_op.make_params(
            q, k, v, self.out, self.tele, attrs, key_block_stats=key_block_stats,
            key_block_stats_blocks=key_block_stats_blocks)
        self.stats = key_block_stats
        self.lib = torch_op._library()
        size = self.lib.asa_cuda_workspace_size(ctypes.byref(self.params))
        self.ws = torch.empty(max(size, 1), dtype=torch.uint8, device=q.device)
        self.size = size

    def call(self, entry: str = "asa_cuda_forward"):
        stream = torch.cuda.current_stream().cuda_stream
        err = getattr(self.lib, entry)(ctypes.byref(self.params), ctypes.c_void_p(
            self.ws.data_ptr()), ctypes.c_size_t(self.size), ctypes.c_void_p(stream))
        if err:
            raise RuntimeError(self.lib.asa_last_error().decode())

    def cached_step(self, route_only: bool = False):
        """One decode step with caller-kept stats: refresh the last key block's row (where the
        new token landed), then route (+ attention)."""
        stream = torch.cuda.current_stream().cuda_stream
        last = self.stats.shape[2] - 1
        err = self.lib.asa_cuda_key_block_stats(ctypes.byref(self.params), ctypes.c_void_p(
            self.stats.data_ptr()), last, ctypes.c_void_p(stream))
        if err:
            raise RuntimeError(self.lib.asa_last_error().decode())
        self.call("asa_cuda_route" if route_only else "asa_cuda_forward")

    def density(self) -> float:
        counts, vis = self.tele[1], self.tele[2]
        return counts.sum().item() / (vis.sum().item() * counts.shape[1])


def find_tau(q, k, v, attrs: AsaAttributes, target: float, steps: int = 10):
    """Bisection on tau so the router's density lands near `target` (router only)."""
    if target >= 1.0:
        return 1.0
    lo, hi = 1e-4, 0.9999
    best = (float("inf"), hi)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        runner = AsaRunner(q, k, v, _with(attrs, threshold=mid))
        runner.call("asa_cuda_route")
        d = runner.density()
        best = min(best, (abs(d - target), mid))
        if d < target:
            lo = mid
        else:
            hi = mid
    return best[1]


def _with(attrs: AsaAttributes, **kw) -> AsaAttributes:
    return dataclasses.replace(attrs, **kw)


def sdpa_ms(q, kk, vv, causal: bool, backend, gqa: bool = False) -> float:
    """SDPA time on one backend; gqa=True passes K/V with their Hkv heads (enable_gqa) instead of
    K/V expanded to Hq heads. NaN (reason printed) where the backend refuses the inputs."""
    from torch.nn.attention import sdpa_kernel
    fn = torch.nn.functional.scaled_dot_product_attention
    try:
        with sdpa_kernel(backend):
            return time_ms(lambda: fn(q, kk, vv, is_causal=causal, enable_gqa=gqa))
    except RuntimeError as exc:
        print(f"  SDPA {backend} failed: {str(exc)[:120]}")
        return float("nan")


def flex_block_mask(indices, counts, causal: bool, seq: int, block: int):
    """BlockMask from ASA's kept lists: diagonal blocks partial (causal), the rest full."""
    from torch.nn.attention.flex_attention import BlockMask
    nq = counts.shape[-1]
    nk = indices.shape[-1]
    kept = torch.zeros(*indices.shape[:-1], nk + 1, dtype=torch.bool, device=indices.device)
    kept.scatter_(-1, torch.where(indices >= 0, indices, nk).long(), True)
    kept = kept[..., :nk]
    diag = torch.zeros_like(kept)
    if causal:
        ar = torch.arange(min(nq, nk), device=kept.device)
        diag[..., ar, ar] = kept[..., ar, ar]
    full = kept & ~diag

    def lists(m):
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    num_p, idx_p = lists(diag)
    num_f, idx_f = lists(full)

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(num_p, idx_p, num_f, idx_f, BLOCK_SIZE=block,
                                    mask_mod=causal_mod if causal else None)


_FLEX = None


def flex_ms(q, k, v, block_mask) -> float:
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    try:
        return time_ms(lambda: _FLEX(q, k, v, block_mask=block_mask, enable_gqa=True))
    except Exception as exc:  # noqa: BLE001 - report and go on with the other columns
        print(f"  FlexAttention failed: {str(exc)[:160]}")
        return float("nan")


def bench_prefill(args, seq: int, causal: bool, rows: list):
    from torch.nn.attention import SDPBackend
    B, Hq, Hkv, D = 1, args.heads_q, args.heads_kv, 128
    g = torch.Generator(device="cuda").manual_seed(seq)
    q = torch.randn(B, Hq, seq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, seq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, seq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    flops = torch_op.dense_flops(B, Hq, seq, seq, D, causal)
    # Each SDPA backend with K/V expanded to Hq heads and with enable_gqa (K/V as they are);
    # its column is the faster of the two.
    sdpa = {f"{name}{tag}": sdpa_ms(q, *kv_, causal, backend, gqa=bool(tag))
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("flash", SDPBackend.FLASH_ATTENTION))
            for tag, kv_ in (("", (kk, vv)), ("_gqa", (k, v)))}
    cudnn = min(sdpa["cudnn"], sdpa["cudnn_gqa"], key=lambda x: (math.isnan(x), x))
    flash = min(sdpa["flash"], sdpa["flash_gqa"], key=lambda x: (math.isnan(x), x))
    del kk, vv
    base = AsaAttributes(causal=causal, block_size=args.block_size, sink_blocks=1,
                         local_blocks=1)
    use_flex = args.flex and seq in args.flex_seqs
    for target in args.densities:
        tau = find_tau(q, k, v, base, target)
        runner = AsaRunner(q, k, v, _with(base, threshold=tau))
        asa = time_ms(runner.call)
        router = time_ms(lambda r=runner: r.call("asa_cuda_route"))
        density = runner.density()
        fx = float("nan")
        if use_flex:
            bm = flex_block_mask(runner.tele[0], runner.tele[1], causal, seq, args.block_size)
            fx = flex_ms(q, k, v, bm)
            del bm
        rows.append({"kind": "prefill", "seq": seq, "causal": causal, "target": target, "tau": tau,
                     "density": density, "asa_ms": asa, "tflops": flops / asa / 1e9,
                     "cudnn_ms": cudnn, "flash_ms": flash, "sdpa_ms": sdpa, "flex_ms": fx,
                     "router_ms": router, "router_pct": 100 * router / cudnn})
        print(json.dumps(rows[-1]), flush=True)
        del runner


def decode_inputs(kv: int, batch: int, heads_q: int, heads_kv: int, dim: int = 128):
    """One decode step's q [B, Hq, 1, D] and K/V [B, Hkv, kv, D], bf16, seeded by `kv`."""
    g = torch.Generator(device="cuda").manual_seed(kv + 1)
    q = torch.randn(batch, heads_q, 1, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, heads_kv, kv, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, heads_kv, kv, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def bench_decode(args, kv: int, batch: int, rows: list):
    from torch.nn.attention import SDPBackend
    B, Hq, Hkv = batch, args.heads_q, args.heads_kv
    q, k, v = decode_inputs(kv, B, Hq, Hkv)
    kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    # Dense baselines: K/V expanded to Hq heads (cudnn, flash), and K/V read once per group
    # through enable_gqa (*_gqa; decode is memory bound, so this is the one to beat).
    backends = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION))
    dense = {}
    for name, backend in backends[:2]:
        dense[name] = sdpa_ms(q, kk, vv, False, backend)
    for name, backend in backends:
        dense[f"{name}_gqa"] = sdpa_ms(q, k, v, False, backend, gqa=True)
    best_name = min((x for x in dense if not math.isnan(dense[x])), key=dense.get)
    dense_graph = dense_layers = float("nan")
    if args.decode_graphs:
        from torch.nn.attention import sdpa_kernel
        fn = torch.nn.functional.scaled_dot_product_attention
        backend = dict(backends)[best_name.removesuffix("_gqa")]
        gqa = best_name.endswith("_gqa")
        kg, vg = (k, v) if gqa else (kk, vv)
        with sdpa_kernel(backend):
            dense_graph = graph_ms(lambda: fn(q, kg, vg, enable_gqa=gqa))
            if args.decode_layers > 1:
                copies = [(kg.clone(), vg.clone()) for _ in range(args.decode_layers - 1)]
                dense_layers = graph_ms_per_call(
                    [lambda a=a, b=b: fn(q, a, b, enable_gqa=gqa) for a, b in [(kg, vg), *copies]])
                del copies
    del kk, vv
    base = AsaAttributes(causal=True, block_size=args.block_size, select_per=1)
    for target in args.densities:
        tau = find_tau(q, k, v, base, target)
        runner = AsaRunner(q, k, v, _with(base, threshold=tau))
        ms = time_ms(runner.call)
        router = time_ms(lambda r=runner: r.call("asa_cuda_route"))
        best_dense = dense[best_name]
        # Caller-kept key block stats (SPEC.md "Acceleration"): per step = refresh of the last
        # block's row + route + attention; the lists must equal the stateless call's.
        stats = torch_op.key_block_stats(k, base)
        cached = AsaRunner(q, k, v, _with(base, threshold=tau), key_block_stats=stats)
        cached.cached_step()
        same = all(torch.equal(a, b) for a, b in zip(runner.tele, cached.tele))
        cms = time_ms(cached.cached_step)
        # Variant: the router pools the last (partial) block itself (key_block_stats_blocks =
        # NK - 1), one C call per step; the caller refreshes a row only when its block fills up
        # (every block_size steps, not timed).
        partial = AsaRunner(q, k, v, _with(base, threshold=tau), key_block_stats=stats,
                            key_block_stats_blocks=stats.shape[2] - 1)
        partial.call()
        same = same and all(torch.equal(a, b) for a, b in zip(runner.tele, partial.tele))
        pms = time_ms(partial.call)
        crouter = time_ms(lambda r=cached: r.cached_step(route_only=True))
        graphs = {}
        if args.decode_graphs:
            graphs = {"graph_asa_ms": graph_ms(runner.call),
                      "graph_cached_ms": graph_ms(cached.cached_step),
                      "graph_partial_ms": graph_ms(partial.call),
                      "graph_cached_router_ms": graph_ms(
                          lambda r=cached: r.cached_step(route_only=True)),
                      "graph_dense_ms": dense_graph}
            graphs["graph_cached_speedup"] = dense_graph / graphs["graph_cached_ms"]
            graphs["graph_partial_speedup"] = dense_graph / graphs["graph_partial_ms"]
            if args.decode_layers > 1:
                # The same step on L copies of q, K/V and statistics (same lists, other
                # addresses), against the dense call on L copies.
                layers = [partial] + [
                    AsaRunner(q.clone(), k.clone(), v.clone(), partial.attrs,
                              key_block_stats=stats.clone(),
                              key_block_stats_blocks=stats.shape[2] - 1)
                    for _ in range(args.decode_layers - 1)]
                graphs["layers"] = args.decode_layers
                graphs["graph_layers_ms"] = graph_ms_per_call([r.call for r in layers])
                graphs["graph_layers_dense_ms"] = dense_layers
                graphs["graph_layers_speedup"] = dense_layers / graphs["graph_layers_ms"]
                del layers
        if args.decode_kernels:
            graphs["kernels_us"] = kernel_times_us(partial.call)
        if args.decode_streams:
            graphs["streams_ms"] = streams_ms(partial)
        rows.append({"kind": "decode", "seq": kv, "batch": B, "target": target, "tau": tau,
                     "density": runner.density(), "asa_ms": ms, "tok_s": B / ms * 1e3,
                     "dense_tok_s": B / best_dense * 1e3, "cudnn_ms": dense["cudnn"],
                     "flash_ms": dense["flash"], "dense_ms": dict(dense), "best_dense": best_name,
                     "speedup": best_dense / ms, "router_ms": router,
                     "cached_ms": cms, "cached_router_ms": crouter,
                     "cached_tok_s": B / cms * 1e3, "cached_speedup": best_dense / cms,
                     "cached_lists_equal": same, "cached_last_pooled_ms": pms,
                     "cached_last_pooled_speedup": best_dense / pms, **graphs})
        print(json.dumps(rows[-1]), flush=True)


def streams_ms(step: AsaRunner) -> dict:
    """Can the attention run under the router? Graph-replayed ms of the step's router alone, an
    attention + merge alone (over lists routed beforehand by a second runner of the same inputs,
    as if predicted), the one-call step (the two in series), and router and attention on two
    streams in one graph, with the router's stream at the same or at a higher priority."""
    other = AsaRunner(step.q, step.k, step.v, step.attrs, key_block_stats=step.stats.clone(),
                      key_block_stats_blocks=step.params.key_block_stats_blocks)
    other.call()  # its lists: what its attention reads below

    def both(router_priority: int):  # priority -1 is higher than the default 0
        streams = [torch.cuda.Stream(priority=router_priority), torch.cuda.Stream()]

        def fn():
            main = torch.cuda.current_stream()
            for s, work in zip(streams, (lambda: step.call("asa_cuda_route"),
                                         lambda: other.call("asa_cuda_attention"))):
                s.wait_stream(main)
                with torch.cuda.stream(s):
                    work()
            for s in streams:
                main.wait_stream(s)
        return fn

    return {"router": graph_ms(lambda: step.call("asa_cuda_route")),
            "attention": graph_ms(lambda: other.call("asa_cuda_attention")),
            "series": graph_ms(step.call),
            "both": graph_ms(both(0)),
            "both, router high priority": graph_ms(both(-1))}


def short_kernel_name(name: str) -> str:
    """`void asa::cuda::(anonymous namespace)::select_kernel<float>(AsaParams, ...)` -> `select_kernel`."""
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    match = re.match(r"[\w:]+", name)
    return match.group(0).split("::")[-1] if match else name


def kernel_times_us(fn, reps: int = 50) -> dict:
    """Mean GPU time per call of each kernel that `fn` launches (torch profiler over a warm
    loop), keyed by short kernel name and launch grid, in microseconds."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = pathlib.Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    totals: dict = {}
    for e in events:
        if e.get("cat") != "kernel":
            continue
        grid = "x".join(str(g) for g in e.get("args", {}).get("grid", []))
        key = f"{short_kernel_name(e['name'])}[{grid}]"
        totals[key] = totals.get(key, 0.0) + e.get("dur", 0.0) / reps
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


MODEL_SHAPES = {
    # name: (hidden, layers, heads, kv heads, head dim, intermediate, vocab)
    "SmolLM2-135M": (576, 30, 9, 3, 64, 1536, 49152),
    "Llama-3-8B": (4096, 32, 32, 8, 128, 14336, 128256),
}
_DENSITY_LOG: list = [None]  # [0]: a list while one forward logs the ASA nodes' density


def _asa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   **kwargs):
    """transformers attention function running the ASA op (causal, no padding)."""
    attrs = _ASA_ATTRS[0]
    if scaling:
        attrs = dataclasses.replace(attrs, scale=float(scaling))
    out, _, counts, vis = torch_op.sparse_attention(query, key, value, attrs)
    log = _DENSITY_LOG[0]
    if log is not None:  # only in the untimed forward that measures the density
        log.append((counts.sum(), vis.sum() * counts.shape[1]))
    return out.transpose(1, 2).contiguous(), None


_ASA_ATTRS = [AsaAttributes(causal=True, block_size=128)]


def random_model(name: str, max_positions: int, device: str = "cuda"):
    """A random-weight bf16 transformers LlamaModel of MODEL_SHAPES[name] in eval mode;
    returns (model, vocab size)."""
    from transformers import LlamaConfig, LlamaModel
    hidden, layers, heads, kv, hd, inter, vocab = MODEL_SHAPES[name]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hd, intermediate_size=inter,
                      vocab_size=vocab, max_position_embeddings=max_positions)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaModel(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model, vocab


def set_attention(model, impl: str) -> None:
    """Make every layer of `model` run the attention function registered as `impl`."""
    model.config._attn_implementation = impl
    for layer in model.layers:
        layer.self_attn.config._attn_implementation = impl


def register_attention() -> None:
    """Register the model rows' attention functions with transformers: "asa" (the op through the
    torch binding) and "sdpa_causal", transformers' own SDPA function under a name of ours: like
    "asa" it then gets no mask tensor and calls SDPA with is_causal. Under the built-in name
    "sdpa", transformers materializes an [S, S] causal mask while a CUDA graph is being captured
    (its is_tracing), which takes SDPA off its flash / cuDNN kernels (session 18, H100: the 8K
    SmolLM2 forward took 38 ms from a graph against 21 ms eager)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register("asa", _asa_attention)
    AttentionInterface.register("sdpa_causal", sdpa_attention_forward)


def bench_models(args, rows: list):
    """Prefill latency and peak memory of random-weight Llama-shaped models, SDPA vs ASA."""
    register_attention()
    for name in args.models:
        model, vocab = random_model(name, max(args.model_seqs))
        for seq in args.model_seqs:
            ids = torch.randint(0, vocab, (1, seq), device="cuda")
            for label, impl, tau in (("sdpa dense", "sdpa_causal", None), ("asa 0.4", "asa", 0.4),
                                     ("asa 0.1", "asa", 0.1)):
                set_attention(model, impl)
                if tau is not None:
                    _ASA_ATTRS[0] = AsaAttributes(causal=True, block_size=128, threshold=tau)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                log: list = []
                forward = lambda m=model, x=ids: m(input_ids=x, use_cache=False)  # noqa: E731
                try:
                    with torch.no_grad():
                        if impl == "asa":  # one untimed forward logs the density
                            _DENSITY_LOG[0] = log
                            try:
                                forward()
                            finally:
                                _DENSITY_LOG[0] = None
                        ms = time_ms(forward, budget_s=0.1, min_reps=2, max_reps=3)
                except Exception as exc:  # noqa: BLE001 - keep the other rows
                    print(f"  {name} {seq} {label} failed: {str(exc)[:200]}")
                    ms = float("nan")
                peak = torch.cuda.max_memory_allocated() / 2**30
                graph = float("nan")  # the forward launched from one CUDA graph (no host work)
                if seq <= args.model_graph_max_seq and not math.isnan(ms):
                    with torch.no_grad():
                        graph = graph_ms(forward)
                    torch.cuda.empty_cache()
                dens = (sum(c.item() for c, _ in log) /
                        max(1, sum(v.item() for _, v in log))) if log else 1.0
                rows.append({"kind": "model", "model": name, "seq": seq, "config": label, "ms": ms,
                             "graph_ms": graph, "peak_gib": peak, "density": dens,
                             "host_path": "compiled" if torch_native.enabled() else "ctypes"})
                print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()


def profile_once():
    """One forward of decode (KV 128K, select_per 1) and prefill (32K causal), tau 0.3, then
    one decode step with caller-kept key block stats (refresh + forward)."""
    for sq, skv, sel in ((1, 131072, 1), (32768, 32768, 0)):
        q = torch.randn(1, 32, sq, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, skv, 128, device="cuda", dtype=torch.bfloat16)
        attrs = AsaAttributes(causal=True, block_size=128, threshold=0.3, select_per=sel)
        AsaRunner(q, k, k, attrs).call()
        if sq == 1:
            stats = torch_op.key_block_stats(k, attrs)
            AsaRunner(q, k, k, attrs, key_block_stats=stats).cached_step()
    torch.cuda.synchronize()


def profile_decode_step(kv: int, target: float):
    """The one-call decode step of bench_decode (KV `kv`, density near `target`, caller-kept
    stats with the last block pooled by the router): 20 warm-up calls, then three between
    cudaProfilerStart / Stop, for `ncu --profile-from-start off` (BENCHMARKS.md step 35)."""
    q, k, v = decode_inputs(kv, 1, 32, 8)
    base = AsaAttributes(causal=True, block_size=128, select_per=1)
    attrs = _with(base, threshold=find_tau(q, k, v, base, target))
    stats = torch_op.key_block_stats(k, base)
    runner = AsaRunner(q, k, v, attrs, key_block_stats=stats,
                       key_block_stats_blocks=stats.shape[2] - 1)
    for _ in range(20):
        runner.call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _ in range(3):
        runner.call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"decode step profiled: KV {kv}, tau {attrs.threshold:.4f}, density "
          f"{runner.density():.3f}")


def print_table(rows: list, gpu: str, args):
    print(f"\nGPU: {gpu}; torch {torch.__version__}; D=128 bf16; Hq={args.heads_q} "
          f"Hkv={args.heads_kv}; prefill B=1; decode B in its column (one query row per "
          "sequence, tok/s = B / step time)")
    print("TFLOP/s = 4*B*Hq*S*S*D (/2 causal) / time; x-columns = baseline time / ASA time; "
          "SDPA = the faster of K/V expanded to Hq heads and enable_gqa")
    print(f"{'S':>7} {'mode':>6} {'dens':>5} {'ASA ms':>9} {'TFLOP/s':>8} {'xcuDNN':>7} "
          f"{'xflash':>7} {'xFlex':>6} {'rout ms':>8} {'rout%':>6}")
    for r in rows:
        if r["kind"] != "prefill":
            continue
        print(f"{r['seq']:>7} {'causal' if r['causal'] else 'full':>6} {r['density']:>5.2f} "
              f"{r['asa_ms']:>9.3f} {r['tflops']:>8.1f} {r['cudnn_ms'] / r['asa_ms']:>7.2f} "
              f"{r['flash_ms'] / r['asa_ms']:>7.2f} {r['flex_ms'] / r['asa_ms']:>6.2f} "
              f"{r['router_ms']:>8.3f} {r['router_pct']:>6.2f}")
    models = [r for r in rows if r["kind"] == "model"]
    if models:
        print(f"\nmodel prefill, ms per forward: eager (ASA's host path: {models[0]['host_path']}) "
              "and launched from one CUDA graph; x = the SDPA row's time / this row's")
        print(f"{'model':>13} {'S':>7} {'config':>10} {'dens':>5} {'ms':>10} {'x':>6} "
              f"{'graph ms':>10} {'x':>6} {'peak GiB':>9}")
        for r in models:
            base = next(b for b in models if (b["model"], b["seq"], b["config"]) ==
                        (r["model"], r["seq"], "sdpa dense"))
            print(f"{r['model']:>13} {r['seq']:>7} {r['config']:>10} {r['density']:>5.2f} "
                  f"{r['ms']:>10.1f} {base['ms'] / r['ms']:>6.2f} {r['graph_ms']:>10.1f} "
                  f"{base['graph_ms'] / r['graph_ms']:>6.2f} {r['peak_gib']:>9.2f}")
    dec = [r for r in rows if r["kind"] == "decode"]

    def lead(r: dict) -> str:  # the columns every decode row starts with: B, KV, density
        return f"{r['batch']:>3} {r['seq']:>7} {r['density']:>5.2f} "

    if dec:
        print("\ndense decode baselines (ms; *_gqa = K/V not expanded, enable_gqa; the speedups "
              "below are against the one marked * of the same B and KV): " +
              "; ".join(f"B {r['batch']} KV {r['seq']}: " + ", ".join(
                  f"{n}{'*' if n == r['best_dense'] else ''} {t:.3f}"
                  for n, t in r["dense_ms"].items())
                        for r in dec if r["target"] == dec[0]["target"]))
        print("\ncached = caller-kept key block stats: refresh of the last block + route "
              "(+ attention)")
        print(f"\n{'B':>3} {'KV':>7} {'dens':>5} {'ASA ms':>8} {'rout ms':>8} {'tok/s':>9} "
              f"{'dense tok/s':>11} {'speedup':>7} {'cached ms':>9} {'c.rout':>7} "
              f"{'c.tok/s':>8} {'c.speedup':>9} {'same':>5}")
        for r in dec:
            print(lead(r) + f"{r['asa_ms']:>8.3f} {r['router_ms']:>8.3f} "
                  f"{r['tok_s']:>9.0f} "
                  f"{r['dense_tok_s']:>11.0f} {r['speedup']:>7.2f} {r['cached_ms']:>9.3f} "
                  f"{r['cached_router_ms']:>7.3f} {r['cached_tok_s']:>8.0f} "
                  f"{r['cached_speedup']:>9.2f} {str(r['cached_lists_equal']):>5}")
        print("\ncached, last block pooled by the router (one call per step), ms / speedup:")
        for r in dec:
            print(lead(r) + f"{r['cached_last_pooled_ms']:>9.3f} "
                  f"{r['cached_last_pooled_speedup']:>9.2f}")
        if any("graph_cached_ms" in r for r in dec):
            print("\nCUDA graph replay (launch gaps removed), ms: ASA stateless, ASA cached "
                  "(refresh+route+attention), cached router, ASA one call with the last block "
                  "pooled by the router, fastest dense (graph); speedups = dense / cached, "
                  "dense / one call")
            for r in dec:
                if "graph_cached_ms" in r:
                    print(lead(r) + f"{r['graph_asa_ms']:>8.3f} "
                          f"{r['graph_cached_ms']:>8.3f} {r['graph_cached_router_ms']:>8.3f} "
                          f"{r.get('graph_partial_ms', float('nan')):>8.3f} "
                          f"{r['graph_dense_ms']:>8.3f} {r['graph_cached_speedup']:>7.2f} "
                          f"{r.get('graph_partial_speedup', float('nan')):>7.2f}")
        if any("graph_layers_ms" in r for r in dec):
            L = next(r["layers"] for r in dec if "layers" in r)
            print(f"\nCUDA graph of {L} layers (each call on its own copy of the K/V, so no replay "
                  "starts with its blocks in L2), ms per layer: ASA one call, fastest dense; "
                  "speedup")
            for r in dec:
                if "graph_layers_ms" in r:
                    print(lead(r) + f"{r['graph_layers_ms']:>8.3f} "
                          f"{r['graph_layers_dense_ms']:>8.3f} {r['graph_layers_speedup']:>7.2f}")
        if any("streams_ms" in r for r in dec):
            print("\nrouter and attention on two streams (graph replay, ms): router alone, "
                  "attention + merge alone (lists routed beforehand), in series (one call), "
                  "both on two streams, both with the router's stream at high priority")
            for r in dec:
                if "streams_ms" in r:
                    print(lead(r) + " ".join(f"{t:>8.3f}" for t in r["streams_ms"].values()))
        if any("kernels_us" in r for r in dec):
            print("\nkernels of the one-call step (us per call, torch profiler):")
            for r in dec:
                if "kernels_us" in r:
                    print(lead(r) + ", ".join(
                        f"{n} {t:.1f}" for n, t in r["kernels_us"].items()))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="*", default=[4096, 8192, 32768, 131072])
    parser.add_argument("--modes", nargs="+", default=["causal", "full"])
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.4, 0.1])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--flex-seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--decode-kv", type=int, nargs="*", default=[32768, 131072])
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[1],
                        help="decode batch sizes (one query row per sequence)")
    parser.add_argument("--decode-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also time decode steps replayed from CUDA graphs")
    parser.add_argument("--decode-layers", type=positive_int, default=1, metavar="L",
                        help="also time the one-call decode step and the dense decode in a graph "
                             "over L copies of the K/V (as L layers), per layer: no replay then "
                             "finds its kept blocks in L2 (L = 8 copies 4.3 GB at 128K, batch 1)")
    parser.add_argument("--decode-kernels", action="store_true",
                        help="also time each kernel of the one-call decode step (torch profiler)")
    parser.add_argument("--decode-streams", action="store_true",
                        help="also time the one-call step's router and an attention over "
                             "routed lists on two streams at once (BENCHMARKS.md step 50)")
    parser.add_argument("--models", nargs="*", default=[], choices=sorted(MODEL_SHAPES))
    parser.add_argument("--model-seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--model-graph-max-seq", type=int, default=32768, metavar="S",
                        help="also time each model forward of at most S tokens captured in one "
                             "CUDA graph and replayed (no host work; peak memory is eager's)")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--profile-router", action="store_true",
                        help="one forward each of decode 128K and prefill 32K (for ncu), no table")
    parser.add_argument("--profile-decode-step", action="store_true",
                        help="the one-call decode step at the first --decode-kv and --densities "
                             "(pass e.g. --decode-kv 131072 --densities 0.1) between "
                             "cudaProfilerStart/Stop, for ncu --profile-from-start off")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.profile_router:
        profile_once()
        return
    if args.profile_decode_step:
        profile_decode_step(args.decode_kv[0] if args.decode_kv else 131072,
                            args.densities[0])
        return
    gpu = torch.cuda.get_device_name()
    rows: list = []
    bench_models(args, rows)
    for batch in args.decode_batch:
        for kv in args.decode_kv:
            bench_decode(args, kv, batch, rows)
            torch.cuda.empty_cache()
    for seq in args.seqs:
        for mode in args.modes:
            bench_prefill(args, seq, mode == "causal", rows)
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows},
                                        indent=1))
    print_table(rows, gpu, args)


if __name__ == "__main__":
    main()
