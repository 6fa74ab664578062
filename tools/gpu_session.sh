#!/bin/bash
# One device call for the CUDA kernel core: build libasa_cuda.so (sm_90a + sm_80), run the GPU
# tests, run the kernel benchmark. Logs land under $OUT (the device tool brings them back).
#   tools/gpu_session.sh [all|test|bench|diag|decode|profile|host|fused] [extra bench_kernels.py args...]
# ASA_PREBUILT=path/libasa_cuda.so skips the build when that library loads here (built on the
# CPU machine with the same nvcc, carried in an ignored folder; saves device time); then the
# compile test is left to the CPU machine. BENCH_TAG names a second benchmark's logs.
set -o pipefail
OUT=${OUT:-/tmp/asa_gpu_out}
mkdir -p "$OUT"
MODE=${1:-all}
shift || true
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv | tee "$OUT/gpu.txt"
BUILD=plugins/build/cuda
start=$(date +%s)
# GPU tests; with ASA_PREBUILT the compile test is left to the CPU machine (header)
GPU_TESTS="tests/plugins/test_cuda_kernels.py tests/plugins/test_decode_cache.py tests/plugins/test_gate_native.py tests/plugins/test_chain_start.py"
TESTS="$GPU_TESTS tests/plugins/test_cuda_compile.py"
if [ -n "$ASA_PREBUILT" ] && [ -f "$ASA_PREBUILT" ] && ! ldd "$ASA_PREBUILT" | grep -q "not found"; then
  echo "prebuilt library: $ASA_PREBUILT"
  export ASA_CUDA_LIB=$PWD/$ASA_PREBUILT
  TESTS="$GPU_TESTS"
elif ! { cmake -S plugins -B $BUILD -G Ninja -DASA_WITH_CUDA=ON -DASA_WITH_CPU=OFF \
        -DCMAKE_CUDA_ARCHITECTURES="${ASA_ARCHS:-90a;80}" && cmake --build $BUILD -j 16; } \
        > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
else
  echo "build: $(( $(date +%s) - start )) s"
  export ASA_CUDA_LIB=$PWD/$BUILD/core/cuda/libasa_cuda.so
fi
# build_tool NAME OUT [nvcc args...]: tools/NAME.cu (which includes the kernel source it times)
# -> OUT, linked against the library in use; the compiler's output is appended to $OUT/tools.log
# (its tail printed when the build fails).
build_tool() {
  local name=$1 out=$2 libdir
  shift 2
  libdir=$(dirname "$ASA_CUDA_LIB")
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
    -Iplugins/core/include -Iplugins/core/cuda -Iplugins/core/common "$@" "tools/$name.cu" \
    -o "$out" -L"$libdir" -lasa_cuda -Xlinker -rpath="$libdir" >> "$OUT/tools.log" 2>&1 \
    || { echo "build of tools/$name.cu failed:"; tail -20 "$OUT/tools.log"; return 1; }
}
if [ "$MODE" = host ]; then
  # The torch binding's compiled host path, built ahead against this machine's torch: eager
  # calls without optional inputs take it from here on (the GPU tests included).
  python3 tools/build_plugins.py --no-ort --torch -j 16 > "$OUT/build_torch.log" 2>&1 \
    && tail -1 "$OUT/build_torch.log" || { tail -30 "$OUT/build_torch.log"; exit 1; }
fi
if [ "$MODE" = all ] || [ "$MODE" = test ] || [ "$MODE" = host ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -rf $TESTS \
    2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  python3 tools/bench_kernels.py --json "$OUT/bench${BENCH_TAG}.json" "$@" 2>&1 \
    | tee "$OUT/bench${BENCH_TAG}.log" \
    | grep -v '^{'
fi
if [ "$MODE" = diag ]; then
  # Memory and race checks of the core's kernels on small tests, then per-kernel router times.
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool --kernel-regex kns=asa --print-limit 20 \
      python3 -m pytest -q -p no:cacheprovider tests/plugins/test_cuda_kernels.py \
      -k "${DIAG_TESTS:-head_thresholds or s97_d64 or decode16_packed}" 2>&1 | tee "$OUT/sanitizer_$tool.log" \
      | grep -E "ERROR SUMMARY|passed|failed|Error|Race|hazard" | head -20
  done
  [ "${DIAG_NCU:-1}" = 0 ] && exit 0
  timeout 150 ncu --clock-control none --kernel-name regex:"pool|select|prefix|attn|merge|logits|feature|project" \
    --metrics gpu__time_duration.sum python3 tools/bench_kernels.py --profile-router \
    > "$OUT/ncu_router.log" 2>&1
  grep -E "pool|select|attn|merge|logits|feature|project|gpu__time" "$OUT/ncu_router.log" | head -60
fi
if [ "$MODE" = decode ]; then
  # Decode A/B (BENCHMARKS.md optimization step 34): chained launches (ASA_CUDA_PDL) on and off,
  # one process each, with per-kernel times and launch grids (read those from the ASA_CUDA_PDL=0
  # run: a chained kernel's time includes its wait for the previous one).
  for pdl in 1 0; do
    ASA_CUDA_PDL=$pdl timeout 100 python3 tools/bench_kernels.py --seqs --decode-kv 131072 32768 \
      --densities 0.1 0.4 --decode-kernels > "$OUT/decode_pdl$pdl.log" 2>&1
    echo "== ASA_CUDA_PDL=$pdl"; grep -v '^{' "$OUT/decode_pdl$pdl.log" | sed -n '/CUDA graph replay/,$p'
  done
fi
if [ "$MODE" = profile ]; then
  # Where the decode step's time goes (BENCHMARKS.md optimization steps 35–37, 40):
  # select_kernel's SM clocks per phase (tools/select_phases.cu) at 128K / τ 0.1 and 32K / τ 0.4,
  # the opt-in route_decode_kernel's phases (tools/route_phases.cu), the split-KV attention's
  # per-CTA timeline (tools/attn_timeline.cu), then ncu on the one-call decode step at
  # 128K / density 0.1 (caches flushed between kernels, as ncu does).
  : > "$OUT/phases.log"
  # run_tool NAME SECONDS "KV TAU"...: build_tool NAME /tmp/NAME, then run it once per argument
  # pair, each run at most SECONDS.
  run_tool() {
    local name=$1 limit=$2
    shift 2
    build_tool "$name" "/tmp/$name"
    for a in "$@"; do timeout "$limit" "/tmp/$name" $a >> "$OUT/phases.log" 2>&1; done
  }
  run_tool select_phases 30 "131072 0.1" "32768 0.4"
  # The fused decode router's phases (global timer) per cluster size.
  run_tool route_phases 60 "131072 0.1" "32768 0.1"
  # The split-KV decode attention's and merge's milestones per CTA (global timer).
  run_tool attn_timeline 60 "131072 0.1" "131072 0.4" "32768 0.1"
  cat "$OUT/phases.log"
  timeout 200 ncu --profile-from-start off --clock-control none --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SourceCounters -c 5 \
    python3 tools/bench_kernels.py --profile-decode-step --decode-kv 131072 --densities 0.1 \
    > "$OUT/ncu_decode.log" 2>&1
  grep -E "^  [a-z].*kernel|Duration|DRAM Throughput|decode step profiled" "$OUT/ncu_decode.log" \
    | sed -E 's/\(AsaParams.*\) \(/ (/' | cut -c1-110
fi
if [ "$MODE" = fused ]; then
  # The opt-in one-launch decode router (ASA_CUDA_FUSED_ROUTE=1; BENCHMARKS.md optimization steps
  # 36, 37, 51) and the opt-in fused decode step built on it (ASA_CUDA_FUSED_DECODE=1, step 52):
  # the GPU tests with the fused router as the decode router (the fused step's tests set their
  # own variables), the phases of both (OLD_ROUTER=path/router.cu also times another router.cu,
  # e.g. `git show <rev>:plugins/core/cuda/router.cu`), then the decode step with the separate
  # router, the fused router and the fused step, one process each, alternating twice.
  ASA_CUDA_FUSED_ROUTE=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -rf \
    tests/plugins/test_cuda_kernels.py tests/plugins/test_decode_cache.py -k "decode or exact or fused" \
    2>&1 | grep -v DEBUG > "$OUT/tests_fused.log"
  tests_status=$?
  tail -8 "$OUT/tests_fused.log"
  # A fused step that failed its tests or hung (the timeout) is not benchmarked: its arms would
  # spend the call's time on timeouts.
  arms="separate router step"
  if [ $tests_status -eq 124 ] || grep -q "FAILED.*fused_decode_step" "$OUT/tests_fused.log"; then
    echo "fused step failed or hung in its tests: not benchmarked"
    arms="separate router"
  fi
  build_tool route_phases /tmp/route_phases
  timeout 60 /tmp/route_phases 131072 0.1 > "$OUT/route_phases.log" 2>&1
  # the router at C = 16 and the fused step (the other cluster sizes stay in the log)
  awk '/^C = 16/,/density/; /^fused step/,0' "$OUT/route_phases.log"
  if [ -n "$OLD_ROUTER" ]; then  # included from tools/, so the path is made absolute
    build_tool route_phases /tmp/route_phases_old -DROUTER_CU="\"$(realpath "$OLD_ROUTER")\""
    echo "== $OLD_ROUTER"
    timeout 40 /tmp/route_phases_old 131072 0.1 > "$OUT/route_phases_old.log" 2>&1
    awk '/^C = 16/,/density/' "$OUT/route_phases_old.log"
  fi
  for run in 1 2; do
    for arm in $arms; do
      log="$OUT/decode_${arm}_run$run"
      echo "== decode with the $arm arm, run $run"
      ASA_CUDA_FUSED_ROUTE=$([ $arm = router ] && echo 1 || echo 0) \
        ASA_CUDA_FUSED_DECODE=$([ $arm = step ] && echo 1 || echo 0) \
        timeout 90 python3 tools/bench_kernels.py --seqs \
        --decode-kv 131072 32768 --densities 0.1 0.4 --json "$log.json" > "$log.log" 2>&1
      grep -v '^{' "$log.log" | tail -12
    done
  done
fi
if [ "$MODE" = host ]; then
  # Host time of the torch binding (BENCHMARKS.md "SmolLM2-135M at 8K in the model"): per call at
  # SmolLM2's heads (both host paths, the params cache emptied or not), then one 8K prefill
  # forward of the SmolLM2-shaped model: host, wall, GPU busy, runtime calls, CUDA-graph replay,
  # torch.compile(mode="reduce-overhead").
  timeout 90 python3 tools/bench_binding.py --seq 256 > "$OUT/binding_256.log" 2>&1
  grep -v Warn "$OUT/binding_256.log" | grep -v _warn_once
  timeout 300 python3 tools/bench_binding.py --model SmolLM2-135M --seq 8192 --compile \
    > "$OUT/model_smollm2_8192.log" 2>&1
  grep -E "^  [A-Z]|host |profiled|graph|compile|failed|Error" "$OUT/model_smollm2_8192.log"
fi
