"""Host time per call of the torch binding's layers, against SDPA, at a shape where the GPU work
is small enough for the host to be the bound (SmolLM2-135M's heads: Hq 9, Hkv 3, D 64, bf16).

    python tools/bench_binding.py [--seq 256] [--model SmolLM2-135M [--compile]]

Each row: µs per call of a loop of launches (host; once the GPU is the bound, the launch queue
makes this the GPU time), to the final synchronize (host + GPU), and the host time of one call
launched on an idle GPU (median of 200: what a host-bound model pays per layer); then the GPU
kernels of one ASA call and one SDPA call (torch profiler). Needs a CUDA GPU and the kernel core
(ASA_CUDA_LIB or plugins/build); BENCHMARKS.md "Torch binding: host time per call".

With --model, the same question one level up: a random-weight model of that shape (bench_kernels'
MODEL_SHAPES) runs one prefill of --seq tokens with SDPA and with ASA (τ 0.4, once through each
host path of the binding: ctypes and the compiled one); per attention implementation it prints
the host launch time and the wall time of one forward started on an idle GPU, the host time
spent inside the attention function per call, the GPU kernel time per forward
(profiler sum; under the profiler also the GPU's busy time and the CUDA runtime calls), the
time of the forward captured in a CUDA graph and replayed (no host work: what a graph-launching
server pays), with --compile the time under torch.compile(mode="reduce-overhead") (Inductor
launching from CUDA graphs; the op enters through its fake implementation), and the functions
with the most host time (cProfile, 3 forwards). The --seq rows name the host path they time
(ASA_TORCH_NATIVE 0 or 1 while they run)."""
from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import os
import pathlib
import pstats
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from asa_export.contract import AsaAttributes  # noqa: E402
from asa_export.runtime import torch_native  # noqa: E402
from asa_export.runtime import torch_op as op  # noqa: E402


def per_call_us(fn, n: int = 2000) -> tuple[float, float]:
    """(host µs per call over a loop of n launches, µs per call up to the final synchronize)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - start) / n * 1e6


def one_call_host_us(fn, n: int = 200) -> float:
    """Median host µs of one call launched after a synchronize (an empty launch queue)."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[n // 2]


def _timed(fn, acc: list):
    """fn, adding each call's host seconds to acc[0] and counting calls in acc[1]."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        acc[0] += time.perf_counter() - start
        acc[1] += 1
        return result
    return wrapper


def runtime_api_summary(forward) -> str:
    """One forward under the torch profiler: the GPU's busy time (union of kernel intervals)
    against the span from its first kernel start to its last kernel end, and the CUDA runtime
    calls with the most host time (count, host ms)."""
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        forward()
        torch.cuda.synchronize()
    api = {}
    kernels = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((e.time_range.start, e.time_range.end))
        elif e.name.startswith("cuda") and not e.name.startswith("cudaDeviceSynchronize"):
            count, total = api.get(e.name, (0, 0.0))
            api[e.name] = (count + 1, total + e.cpu_time_total)
    busy, last = 0.0, float("-inf")
    for start, end in sorted(kernels):  # union of kernel intervals
        busy += max(0.0, end - max(start, last))
        last = max(last, end)
    span = (last - min(s for s, _ in kernels)) if kernels else 0.0
    top = sorted(api.items(), key=lambda kv: -kv[1][1])[:4]
    calls = ", ".join(f"{n} {c}× {t / 1e3:.2f} ms" for n, (c, t) in top)
    return (f"profiled: GPU busy {busy / 1e3:.2f} of {span / 1e3:.2f} ms between first and last "
            f"kernel; runtime API {calls}")


def graph_replay_ms(forward) -> tuple[float, float]:
    """(median ms of the forward captured in one CUDA graph and replayed, max |replay output -
    eager output|); (nan, nan) with the reason printed when the capture fails."""
    eager = forward().last_hidden_state.float()
    try:
        graph, static = bk.capture_graph(forward, error_mode="global")
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"    CUDA graph capture failed: {str(exc)[:200]}")
        return float("nan"), float("nan")
    graph.replay()
    diff = (static.last_hidden_state.float() - eager).abs().max().item()
    return bk.time_ms(graph.replay), diff


def compiled_ms(model, ids, eager_out) -> tuple[float, float, float]:
    """(seconds to compile and record, median ms per forward, max |output - eager output|) of
    the model under torch.compile(mode="reduce-overhead") (Inductor, launched from CUDA graphs);
    nan with the reason printed when it fails."""
    nan = float("nan")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, mode="reduce-overhead")
        start = time.perf_counter()
        for _ in range(3):  # compile, warm up, record the graph
            out = compiled(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        diff = (out.last_hidden_state.float() - eager_out).abs().max().item()
        return seconds, bk.time_ms(lambda: compiled(input_ids=ids, use_cache=False)), diff
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"    torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}")
        return nan, nan, nan


# Attention implementations of --model: (label, transformers implementation, ASA_TORCH_NATIVE)
MODEL_IMPLS = (("SDPA", "sdpa", None), ("ASA, ctypes", "asa", "0"),
               ("ASA, compiled host path", "asa", "1"))


def model_forward(name: str, seq: int, compile_too: bool) -> None:
    """Host against GPU time of one prefill forward of a random-weight model, SDPA and ASA (both
    host paths of the binding)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    acc = [0.0, 0]
    bk._ASA_ATTRS[0] = AsaAttributes(causal=True, block_size=128, threshold=0.4)
    functions = {"sdpa": sdpa_attention_forward, "asa": bk._asa_attention}
    for impl, fn in functions.items():
        AttentionInterface.register(f"{impl}_timed", _timed(fn, acc))
    bk.register_attention()  # untimed "sdpa_causal" and "asa", for torch.compile
    untimed = {"sdpa": "sdpa_causal", "asa": "asa"}
    model, vocab = bk.random_model(name, seq)
    ids = torch.randint(0, vocab, (1, seq), device="cuda")
    forward = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}; {name}, S {seq}, bf16, ASA τ 0.4; ms per forward")
    for label, impl, native in MODEL_IMPLS:
        if native is not None:
            os.environ["ASA_TORCH_NATIVE"] = native
        if native == "1" and torch_native.module() is None:
            print(f"  {label}: not built ({torch_native.build_error})")
            continue
        print(f"  {label}")
        bk.set_attention(model, f"{impl}_timed")
        with torch.no_grad():
            for _ in range(3):
                forward()
            acc[:] = [0.0, 0]
            host, wall = [], []
            for _ in range(5):
                torch.cuda.synchronize()
                start = time.perf_counter()
                forward()
                host.append(time.perf_counter() - start)
                torch.cuda.synchronize()
                wall.append(time.perf_counter() - start)
            calls = max(acc[1], 1)
            gpu_ms = sum(bk.kernel_times_us(forward, reps=3).values()) / 1e3
            print(f"    host {min(host) * 1e3:7.2f}  wall {min(wall) * 1e3:7.2f}  "
                  f"GPU kernels {gpu_ms:7.2f}  attention function host "
                  f"{acc[0] / calls * 1e6:6.1f} µs/call")
            print("   ", runtime_api_summary(forward))
            graph, diff = graph_replay_ms(forward)
            print(f"    CUDA graph replay {graph:7.2f} ms per forward; replay output against "
                  f"eager: max |diff| {diff:.3g}")
            if compile_too and native != "1":  # a compiled model calls the op, not a host path
                bk.set_attention(model, untimed[impl])
                eager = forward().last_hidden_state.float()
                seconds, ms, cdiff = compiled_ms(model, ids, eager)
                print(f"    torch.compile(mode='reduce-overhead') {ms:7.2f} ms per forward "
                      f"(compile + record {seconds:.0f} s); output against eager: max |diff| "
                      f"{cdiff:.3g}")
                bk.set_attention(model, f"{impl}_timed")
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(3):
                forward()
            profile.disable()
            torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
        print("\n".join(line for line in text.getvalue().splitlines()[-16:] if line.strip()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--model", choices=sorted(bk.MODEL_SHAPES),
                        help="time one prefill forward of this model shape instead")
    parser.add_argument("--compile", action="store_true",
                        help="with --model, also time the model under torch.compile("
                             "mode='reduce-overhead') (compiles for a minute or more)")
    args = parser.parse_args(argv)
    if args.model:
        model_forward(args.model, args.seq, args.compile)
        return
    q = torch.randn(1, 9, args.seq, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 3, args.seq, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    attrs = AsaAttributes(causal=True, block_size=128, threshold=0.4)
    runner = bk.AsaRunner(q, k, v, attrs)
    lib = op._library()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # name: (call, ASA_TORCH_NATIVE while it is timed: "0" = the ctypes path, "1" = compiled)
    cases = {
        "SDPA (enable_gqa)": (lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), "0"),
        "torch.ops.asa.sparse_attention": (lambda: op.op_call(q, k, v, attrs), "0"),
        "torch_op.sparse_attention (eager wrapper)": (
            lambda: op.sparse_attention(q, k, v, attrs), "0"),
        "torch_op._forward": (
            lambda: op._forward(q, k, v, attrs, None, None, None, None, None), "0"),
        "torch_op._forward, params cache emptied first": (lambda: (
            op._PLAIN_PARAMS.clear(), op._forward(q, k, v, attrs, None, None, None, None, None)),
            "0"),
        "eager wrapper, compiled host path": (lambda: op.sparse_attention(q, k, v, attrs), "1"),
        "torch_op._native_forward": (lambda: op._native_forward(q, k, v, attrs), "1"),
        "C call with prebuilt params and workspace": (runner.call, "0"),
        "asa_cuda_workspace_size": (lambda: lib.asa_cuda_workspace_size(
            ctypes.byref(runner.params)), "0"),
    }
    if torch_native.module() is None:
        print("compiled host path not built:", torch_native.build_error)
        cases = {name: case for name, case in cases.items() if case[1] == "0"}
    print(f"{torch.cuda.get_device_name()}; S {args.seq}, Hq 9, Hkv 3, D 64, bf16; µs per call: "
          "host (launch loop), host + GPU (to the final synchronize), one call's host time")
    for name, (fn, native) in cases.items():
        os.environ["ASA_TORCH_NATIVE"] = native
        host, total = per_call_us(fn)
        print(f"  {name:45s} {host:8.1f} {total:8.1f} {one_call_host_us(fn):8.1f}")
    print("GPU kernels of one ASA call (µs):", bk.kernel_times_us(runner.call))
    print("GPU kernels of one SDPA call (µs):",
          bk.kernel_times_us(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)))


if __name__ == "__main__":
    main()
