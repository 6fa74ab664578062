"""Host time per call of the torch binding's layers, against SDPA, at a shape where the GPU work
is small enough for the host to be the bound (SmolLM2-135M's heads: Hq 9, Hkv 3, D 64, bf16).

    python tools/bench_binding.py [--seq 256] [--model SmolLM2-135M]

Each row: µs per call of a loop of launches (host; once the GPU is the bound, the launch queue
makes this the GPU time), to the final synchronize (host + GPU), and the host time of one call
launched on an idle GPU (median of 200: what a host-bound model pays per layer); then the GPU
kernels of one ASA call and one SDPA call (torch profiler). Needs a CUDA GPU and the kernel core
(ASA_CUDA_LIB or plugins/build); BENCHMARKS.md "Torch binding: host time per call".

With --model, the same question one level up: a random-weight model of that shape (bench_kernels'
MODEL_SHAPES) runs one prefill of --seq tokens with SDPA and with ASA (τ 0.4); per attention
implementation it prints the host launch time and the wall time of one forward started on an idle
GPU, the host time spent inside the attention function per call, the GPU kernel time per forward
(profiler sum; under the profiler also the GPU's busy time and the CUDA runtime calls), the
time of the forward captured in a CUDA graph and replayed (no host work: what a graph-launching
server pays), and the functions with the most host time (cProfile, 3 forwards)."""
from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
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


def model_forward(name: str, seq: int) -> None:
    """Host against GPU time of one prefill forward of a random-weight model, SDPA and ASA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    acc = [0.0, 0]
    bk._ASA_ATTRS[0] = AsaAttributes(causal=True, block_size=128, threshold=0.4)
    impls = {"sdpa_timed": sdpa_attention_forward, "asa_timed": bk._asa_attention}
    for impl, fn in impls.items():
        AttentionInterface.register(impl, _timed(fn, acc))
    model, vocab = bk.random_model(name, seq)
    ids = torch.randint(0, vocab, (1, seq), device="cuda")
    forward = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}; {name}, S {seq}, bf16, ASA τ 0.4; ms per forward")
    for impl in impls:
        bk.set_attention(model, impl)
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
            print(f"  {impl:10s} host {min(host) * 1e3:7.2f}  wall {min(wall) * 1e3:7.2f}  "
                  f"GPU kernels {gpu_ms:7.2f}  attention function host "
                  f"{acc[0] / calls * 1e6:6.1f} µs/call")
            print("   ", runtime_api_summary(forward))
            graph, diff = graph_replay_ms(forward)
            print(f"    CUDA graph replay {graph:7.2f} ms per forward; replay output against "
                  f"eager: max |diff| {diff:.3g}")
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
    args = parser.parse_args(argv)
    if args.model:
        model_forward(args.model, args.seq)
        return
    q = torch.randn(1, 9, args.seq, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 3, args.seq, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    attrs = AsaAttributes(causal=True, block_size=128, threshold=0.4)
    runner = bk.AsaRunner(q, k, v, attrs)
    lib = op._library()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    cases = {
        "SDPA (enable_gqa)": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True),
        "torch.ops.asa.sparse_attention": lambda: op.op_call(q, k, v, attrs),
        "torch_op.sparse_attention (eager wrapper)": lambda: op.sparse_attention(q, k, v, attrs),
        "torch_op._forward": lambda: op._forward(q, k, v, attrs, None, None, None, None, None),
        "torch_op._forward, params cache emptied first": lambda: (
            op._PLAIN_PARAMS.clear(), op._forward(q, k, v, attrs, None, None, None, None, None)),
        "torch_op._native_forward (ASA_TORCH_NATIVE=1)": lambda: op._native_forward(q, k, v, attrs),
        "C call with prebuilt params and workspace": runner.call,
        "asa_cuda_workspace_size": lambda: lib.asa_cuda_workspace_size(
            ctypes.byref(runner.params)),
    }
    if torch_native.module() is None:
        print("compiled host path not built:", torch_native.build_error)
        del cases["torch_op._native_forward (ASA_TORCH_NATIVE=1)"]
    print(f"{torch.cuda.get_device_name()}; S {args.seq}, Hq 9, Hkv 3, D 64, bf16; µs per call: "
          "host (launch loop), host + GPU (to the final synchronize), one call's host time")
    for name, fn in cases.items():
        host, total = per_call_us(fn)
        print(f"  {name:45s} {host:8.1f} {total:8.1f} {one_call_host_us(fn):8.1f}")
    print("GPU kernels of one ASA call (µs):", bk.kernel_times_us(runner.call))
    print("GPU kernels of one SDPA call (µs):",
          bk.kernel_times_us(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)))


if __name__ == "__main__":
    main()
